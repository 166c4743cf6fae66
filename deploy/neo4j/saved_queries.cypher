// Saved exploration queries for Neo4j Browser (drag this file onto the Favorites pane, or paste one
// statement). Each statement starts with a `// name` line; set parameters first, e.g.
//   :param expert_id => 'civitai:128713'
//   :param prompt_id => 'v1:portrait-003'
//   :param generation_id => '5f2c9a1e-...'
// CI lints every statement here with Neo4j's parser (graphdb/neo4j/lint.py).

// Expert neighbourhood
// The expert with its base model, tags, creator, similar experts and best reference prompts.
MATCH (e:Expert {id: $expert_id})
OPTIONAL MATCH link = (e)-[:BASED_ON|TAGGED|CREATED_BY|SIMILAR_TO]-()
WITH e, collect(link) AS links
OPTIONAL MATCH cap = (e)-[c:CAPABILITY]->(:RefPrompt)
WITH e, links, cap ORDER BY c.score DESC
RETURN e, links, collect(cap)[0..10] AS best_capabilities;

// Top experts per reference prompt
// The five best-scoring experts of every reference prompt (table).
MATCH (e:Expert)-[c:CAPABILITY]->(p:RefPrompt)
WITH p, e, c ORDER BY c.score DESC
WITH p, collect({id: e.id, name: e.name, kind: e.kind, score: c.score})[0..5] AS top
RETURN p.category AS category, p.id AS prompt, p.text AS text, top
ORDER BY category, prompt;

// Top experts for one reference prompt
// Graph view of the ten best experts of $prompt_id.
MATCH (e:Expert)-[c:CAPABILITY]->(p:RefPrompt {id: $prompt_id})
RETURN p, c, e
ORDER BY c.score DESC
LIMIT 10;

// What a generation used
// The experts merged for $generation_id with their coefficients and base models.
MATCH (g:Generation {id: $generation_id})-[u:USED]->(e:Expert)
OPTIONAL MATCH (e)-[b:BASED_ON]->(m:BaseModel)
RETURN g, u, e, b, m
ORDER BY u.coefficient DESC;

// Latest generations
// The twenty most recent generations and the experts each one used (table).
MATCH (g:Generation)
OPTIONAL MATCH (g)-[u:USED]->(e:Expert)
WITH g, collect({expert: e.name, id: e.id, coefficient: u.coefficient}) AS used
RETURN g.id AS generation, g.created_at AS created_at, g.prompt AS prompt, used
ORDER BY created_at DESC
LIMIT 20;

// Uncalibrated experts
// Experts never calibrated, most popular first: the calibration backlog.
MATCH (e:Expert)
WHERE e.calibrated_at IS NULL
RETURN e.id AS id, e.name AS name, e.kind AS kind, e.base_family AS family, e.popularity AS popularity
ORDER BY popularity DESC, id
LIMIT 100;

// Most similar experts
// The strongest SIMILAR_TO links of the whole graph (table).
MATCH (a:Expert)-[s:SIMILAR_TO]->(b:Expert)
RETURN a.name AS expert, a.id AS expert_id, b.name AS similar, b.id AS similar_id, s.score AS score
ORDER BY score DESC
LIMIT 50;

// Experts similar to one expert
// Graph view of $expert_id and its SIMILAR_TO neighbours in both directions.
MATCH (e:Expert {id: $expert_id})-[s:SIMILAR_TO]-(n:Expert)
RETURN e, s, n;

// Experts per base model
// How many checkpoints and adapters each base-model family has.
MATCH (e:Expert)-[:BASED_ON]->(b:BaseModel)
RETURN b.name AS base_model, e.kind AS kind, count(e) AS experts
ORDER BY base_model, kind;
