"""Build ``calibration/data/refset_v1.json`` from real user prompts (run by hand, never at test time).

Usage::

    python -m calibration.build_refset [--fixtures ../shared/fixtures/prompts] [--out calibration/data/refset_v1.json]

Sources (provenance and licences in ``../shared/fixtures/MANIFEST.md`` section 3):

* DiffusionDB user prompts sampled by ImageReward (``imagereward/refl_data.json``, ``benchmark-prompts.json``).
* PartiPrompts (``partiprompts/PartiPrompts.tsv``) with its ``Category`` and ``Challenge`` columns.

Selection is rule-based and reproducible: every category has a table row saying which dataset(s) to draw
from, a keyword regex a prompt must match (DiffusionDB) or the Parti category/challenge it must carry, and
words that disqualify it. Candidates pass a length bound and a safety blocklist, are deduplicated (exact
and near-duplicate by token Jaccard), and are taken in the order of a keyed SHA-256 of their text, so the
same inputs always give the same set. Each prompt records its dataset, file and row.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "prompts"
DEFAULT_OUT = Path(__file__).with_name("data") / "refset_v1.json"
ORDER_KEY = "diffgraph-refset-v1"
PER_CATEGORY = 6
NEAR_DUPLICATE = 0.5  # token Jaccard at or above this is the same prompt for our purpose

DATASETS = {
    "diffusiondb": {
        "name": "DiffusionDB (sampled by THUDM/ImageReward @ c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb)",
        "licence": "CC0-1.0 (prompts); Apache-2.0 (ImageReward repo)",
    },
    "partiprompts": {
        "name": "PartiPrompts (google-research/parti @ 5a657978134374ce28973948331b319adef164bd)",
        "licence": "no LICENSE file in the copy taken (commonly cited as Apache-2.0)",
    },
}

# Unsafe or off-purpose words: calibration images must be fine to render and look at.
BLOCKLIST = re.compile(
    r"\b(nude|naked|nsfw|sexy|sex|erotic\w*|lingerie|bikini|topless|breasts?|busty|cleavage|seductive|"
    r"hentai|porn\w*|gore|gory|blood\w*|corpse|dead|kill\w*|murder|nazi|hitler|trump|biden|putin|"
    r"swastika|suicide|drugs?|cocaine|weed|riots?|horror|creepy|scary|terrifying|monster)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Rule:
    """How one category is filled: ``n_ddb`` DiffusionDB prompts by keyword, ``n_parti`` Parti prompts."""

    category: str
    include: str = ""  # regex a DiffusionDB prompt must match
    exclude: str = ""  # regex that disqualifies a prompt (both datasets)
    parti_categories: tuple[str, ...] = ()
    parti_challenges: tuple[str, ...] = ()
    parti_include: str = ""  # regex a Parti prompt must match (keeps broad Parti categories on topic)
    n_ddb: int = 3
    n_parti: int = 3


RULES: tuple[Rule, ...] = (
    Rule("portrait", include=r"\bportrait of (a|an|the)? ?\w*\s?(woman|man|girl|boy|lady|old man|knight|queen|king)\b",
         exclude=r"\b(cat|dog|robot|skull|bust)\b", parti_categories=("People",),
         parti_include=r"\b(portrait|face|woman|man|girl|boy|person)\b", n_ddb=4, n_parti=2),
    Rule("photoreal", include=r"\b(photograph|photo|dslr|35 ?mm|photorealistic|kodak|canon|nikon|bokeh)\b",
         exclude=r"\b(painting|illustration|anime|manga|drawing|cartoon|render|creature|alien|furry|fursuit\w*)\b", n_ddb=6, n_parti=0),
    Rule("anime", include=r"\b(anime|manga|studio ghibli|makoto shinkai|kyoto animation|pixiv)\b",
         n_ddb=6, n_parti=0),
    Rule("illustration", include=r"\b(illustration|watercolou?r|storybook|children's book|gouache)\b",
         exclude=r"\b(anime|manga|photo|photograph|photorealistic)\b", parti_categories=("Illustrations",),
         parti_challenges=("Style & Format",), n_ddb=3, n_parti=3),
    Rule("landscape", include=r"\b(landscape|mountains?|valley|waterfall|meadow|canyon|lake|seascape)\b",
         exclude=r"\b(portrait|city|building|castle|spaceship)\b", parti_categories=("Outdoor Scenes",),
         parti_include=r"\b(mountains?|lake|river|field|forest|beach|ocean|desert|hills|valley|waterfall|sunset|"
                       r"snow|canyon|island)\b", n_ddb=3, n_parti=3),
    Rule("architecture", include=r"\b(architecture|architectural|cathedral|skyscraper|building|temple|interior)\b",
         exclude=r"\b(portrait|spaceship|car|ferrari)\b", parti_categories=("Indoor Scenes", "World Knowledge"),
         parti_include=r"\b(building|house|tower|bridge|church|cathedral|castle|temple|room|kitchen|library|"
                       r"skyscraper|pyramid|palace)\b", n_ddb=4, n_parti=2),
    Rule("animals", include=r"\b(cat|dog|fox|owl|wolf|tiger|lion|bird|horse|rabbit|bear|deer)\b",
         exclude=r"\b(anthropomorphic|furry|woman|girl|man|ears|bird'?s? ?-?eye|bird view|castle|paddington)\b",
         parti_categories=("Animals",), parti_challenges=("Basic", "Simple Detail", "Fine-grained Detail"),
         n_ddb=3, n_parti=3),
    Rule("fantasy", include=r"\b(fantasy|dragon|wizard|elf|elven|sorcer\w+|fairy|mythical|enchanted)\b",
         exclude=r"\b(sci-?fi|cyberpunk|spaceship)\b", parti_challenges=("Imagination",),
         parti_include=r"\b(dragon|unicorn|castle|wizard|magic\w*|fairy|knight|flying|floating)\b", n_ddb=4, n_parti=2),
    Rule("sci-fi", include=r"\b(sci-?fi|science fiction|cyberpunk|spaceship|spacecraft|futuristic|mecha|android)\b",
         exclude=r"\b(fantasy|dragon)\b", n_ddb=6, n_parti=0),
    Rule("product", include=r"\b(product (photo|shot|render|photography)|packaging|advertisement|commercial)\b",
         exclude=r"\b(portrait|woman|man|console gaming)\b", parti_categories=("Artifacts",),
         parti_challenges=("Basic", "Simple Detail", "Fine-grained Detail"),
         parti_include=r"\b(bottle|watch|chair|lamp|phone|shoe|sneakers?|bag|cup|mug|hat|camera|headphones|guitar|"
                       r"vase|clock|backpack|laptop|teapot|sofa|couch|glasses)\b", n_ddb=1, n_parti=5),
    Rule("food", include=r"\b(food|cake|burger|pizza|sushi|bread|fruit|soup|dessert|noodles|spaghetti)\b",
         exclude=r"\b(portrait|logo)\b", parti_categories=("Food & Beverage",), n_ddb=2, n_parti=4),
    Rule("abstract", include=r"\babstract\b", exclude=r"\b(portrait|face|photo)\b",
         parti_categories=("Abstract", "Arts"), n_ddb=3, n_parti=3),
    Rule("typography", parti_challenges=("Writing & Symbols",),
         parti_include=r"(\"|'|\b(word|words|text|letters|lettering|sign|says|written)\b)", n_ddb=0, n_parti=6),
    Rule("vehicles", include=r"\b(car|truck|motorcycle|train|ship|airplane|bicycle)\b",
         exclude=r"\b(spaceship|portrait)\b", parti_categories=("Vehicles",), n_ddb=2, n_parti=4),
)


@dataclass(frozen=True)
class Candidate:
    dataset: str
    file: str
    row: int
    source_id: str
    text: str
    parti_category: str = ""
    parti_challenge: str = ""


def _tokens(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def _order(text: str) -> str:
    return hashlib.sha256(f"{ORDER_KEY}:{text}".encode()).hexdigest()


def _clean(text: str) -> str:
    return " ".join(text.split()).strip(" ,")


def _length_ok(text: str, lo: int, hi: int) -> bool:
    words = len(text.split())
    return lo <= len(text) <= hi and 2 <= words <= 45 and text.isascii()


def load_diffusiondb(root: Path) -> list[Candidate]:
    out: list[Candidate] = []
    for name, text_key, id_key in (("refl_data.json", "text", "image"), ("benchmark-prompts.json", "prompt", "id")):
        rows = json.loads((root / "imagereward" / name).read_text())
        for i, row in enumerate(rows):
            text = _clean(str(row[text_key]))
            if _length_ok(text, 25, 240):
                out.append(Candidate("diffusiondb", f"imagereward/{name}", i, str(row[id_key]), text))
    return out


def load_parti(root: Path) -> list[Candidate]:
    out: list[Candidate] = []
    with (root / "partiprompts" / "PartiPrompts.tsv").open(newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh, delimiter="\t")):
            text = _clean(row["Prompt"])
            if _length_ok(text, 8, 240):
                # row numbers are 1-based data rows after the header, as in a spreadsheet minus one
                out.append(Candidate("partiprompts", "partiprompts/PartiPrompts.tsv", i + 1, "",
                                     text, row["Category"], row["Challenge"]))
    return out


def _eligible(rule: Rule, c: Candidate) -> bool:
    if BLOCKLIST.search(c.text) or (rule.exclude and re.search(rule.exclude, c.text, re.IGNORECASE)):
        return False
    if c.dataset == "diffusiondb":
        return bool(rule.include) and re.search(rule.include, c.text, re.IGNORECASE) is not None
    if c.parti_challenge == "Writing & Symbols" and "Writing & Symbols" not in rule.parti_challenges:
        return False  # text rendering is its own category
    if rule.parti_include and not re.search(rule.parti_include, c.text, re.IGNORECASE):
        return False
    cat_ok = not rule.parti_categories or c.parti_category in rule.parti_categories
    chal_ok = not rule.parti_challenges or c.parti_challenge in rule.parti_challenges
    return cat_ok and chal_ok


def select(ddb: list[Candidate], parti: list[Candidate]) -> list[dict[str, object]]:
    """Apply ``RULES`` in order; a prompt is used at most once and never near-duplicates a chosen one."""
    chosen: list[tuple[Rule, Candidate]] = []
    seen: list[frozenset[str]] = []

    def take(rule: Rule, pool: list[Candidate], n: int) -> int:
        got = 0
        for c in sorted((c for c in pool if _eligible(rule, c)), key=lambda c: _order(c.text)):
            if got == n:
                break
            toks = _tokens(c.text)
            if any(len(toks & s) / max(1, len(toks | s)) >= NEAR_DUPLICATE for s in seen):
                continue
            chosen.append((rule, c))
            seen.append(toks)
            got += 1
        return got

    for rule in RULES:
        got = take(rule, parti, rule.n_parti) if rule.n_parti else 0
        # a short Parti pool is topped up from DiffusionDB (and the reverse), so every category is full
        got += take(rule, ddb, rule.n_ddb + (rule.n_parti - got)) if rule.include else 0
        if got < PER_CATEGORY:
            got += take(rule, parti, PER_CATEGORY - got) if rule.parti_categories or rule.parti_challenges else 0
        if got != PER_CATEGORY:
            raise SystemExit(f"category {rule.category!r}: only {got} prompts pass the rules")

    prompts: list[dict[str, object]] = []
    counters: dict[str, int] = {}
    for rule, c in chosen:
        counters[rule.category] = counters.get(rule.category, 0) + 1
        prompts.append({
            "id": f"{rule.category}-{counters[rule.category]:02d}",
            "category": rule.category,
            "text": c.text,
            "dataset": c.dataset,
            "file": c.file,
            "row": c.row,
            "source_id": c.source_id,
            "parti_category": c.parti_category,
            "parti_challenge": c.parti_challenge,
        })
    return prompts


def build(fixtures: Path) -> dict[str, object]:
    prompts = select(load_diffusiondb(fixtures), load_parti(fixtures))
    return {
        "name": "diffgraph-refset",
        "generation": 1,
        "built_by": "python -m calibration.build_refset",
        "datasets": DATASETS,
        "rules": [r.__dict__ | {"parti_categories": list(r.parti_categories),
                                "parti_challenges": list(r.parti_challenges)} for r in RULES],
        "prompts": prompts,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    data = build(args.fixtures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    cats = sorted({p["category"] for p in data["prompts"]})  # type: ignore[union-attr]
    print(f"wrote {len(data['prompts'])} prompts over {len(cats)} categories to {args.out}")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
