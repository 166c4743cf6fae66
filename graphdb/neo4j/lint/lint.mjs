// Offline Cypher lint with Neo4j's official parser and semantic analysis (@neo4j-cypher/language-support).
//
// stdin:  JSON, either [{name, query, parameters?}] or {queries: [...], schema: {...}}.
//         `parameters` (a list of names) declares the parameters one statement may use; without it the
//         schema's parameters apply. `schema` may declare labels, relationshipTypes, propertyKeys, parameters.
// stdout: JSON [{name, severity: "error"|"warning"|"info"|"hint", message, line, column, offset}], one entry per
//         diagnostic (an empty list means every statement is clean). Exit 0 unless the input is unreadable.
//
// Procedure and function signatures come from the package's bundled Neo4j 5 registry, so a misspelled or
// mis-called procedure is an error too. Procedures are narrowed to those a statement names, which keeps
// semantic analysis fast; an unknown name is still reported as "not present".
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

// The package's ESM build uses extension-less imports that Node cannot resolve; its CJS build works.
const require = createRequire(import.meta.url);
const { lintCypherQuery, testData } = require('@neo4j-cypher/language-support');

const CYPHER_VERSION = 'CYPHER 5';
const SEVERITY = { 1: 'error', 2: 'warning', 3: 'info', 4: 'hint' };

function readInput() {
  const raw = JSON.parse(readFileSync(0, 'utf8'));
  if (Array.isArray(raw)) return { queries: raw, schema: {} };
  return { queries: raw.queries ?? [], schema: raw.schema ?? {} };
}

function procedureRegistry(query) {
  const all = testData.mockSchema.procedures[CYPHER_VERSION] ?? {};
  const registry = {};
  for (const match of query.matchAll(/\bCALL\s+([A-Za-z_][\w.]*)/gi)) {
    if (all[match[1]]) registry[match[1]] = all[match[1]];
  }
  return { [CYPHER_VERSION]: registry };
}

function toParameters(names) {
  return Object.fromEntries((names ?? []).map((n) => [n, null]));
}

function lintGroup(items, dbSchema) {
  // One document of `;`-separated statements lints about twice as fast as one call per statement.
  // Diagnostics are attributed by offset; a group with any error is re-linted one statement at a time so
  // that a broken statement cannot blame its neighbours.
  const starts = [];
  let doc = '';
  for (const item of items) {
    if (doc) doc += ';\n';
    starts.push(doc.length);
    doc += item.query;
  }
  const found = lintCypherQuery(doc, dbSchema);
  if (items.length > 1 && found.some((d) => d.severity === 1)) {
    return items.flatMap((item) => lintGroup([item], dbSchema));
  }
  return found.map((d) => {
    const offset = d.offsets?.start ?? 0;
    let i = starts.length - 1;
    while (i > 0 && starts[i] > offset) i -= 1;
    const before = doc.slice(starts[i], offset);
    const lines = before.split('\n');
    return {
      name: items[i].name,
      severity: SEVERITY[d.severity] ?? String(d.severity),
      message: d.message,
      line: lines.length,
      column: lines[lines.length - 1].length + 1,
      offset: offset - starts[i],
    };
  });
}

const { queries, schema } = readInput();
const groups = new Map(); // statements sharing one parameter declaration are linted together
for (const item of queries) {
  const parameters = [...(item.parameters ?? schema.parameters ?? [])].sort();
  const key = JSON.stringify(parameters);
  if (!groups.has(key)) groups.set(key, { parameters, items: [] });
  groups.get(key).items.push(item);
}
const diagnostics = [];
for (const { parameters, items } of groups.values()) {
  const dbSchema = {
    labels: schema.labels ?? [],
    relationshipTypes: schema.relationshipTypes ?? [],
    propertyKeys: schema.propertyKeys ?? [],
    parameters: toParameters(parameters),
    functions: testData.mockSchema.functions,
    procedures: procedureRegistry(items.map((item) => item.query).join('\n')),
    defaultLanguage: CYPHER_VERSION,
  };
  diagnostics.push(...lintGroup(items, dbSchema));
}
process.stdout.write(JSON.stringify(diagnostics));
