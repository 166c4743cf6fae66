"""Pure normalisers (no I/O, inputs never mutated): raw source records → ``Expert`` fields.

Pipelines wrap them and count the anomalies they report in the crawl stats.
"""

from crawler.normalize.base_model import KNOWN_FAMILIES, normalize_base_model
from crawler.normalize.civitai import normalize_civitai
from crawler.normalize.files import normalize_civitai_files, normalize_hf_files, select_primary
from crawler.normalize.hashing import civitai_content_hash, content_hash, hf_content_hash
from crawler.normalize.huggingface import normalize_huggingface, split_model_card
from crawler.normalize.kind import normalize_kind
from crawler.normalize.license import normalize_civitai_license, normalize_hf_license
from crawler.normalize.stats import normalize_stats
from crawler.normalize.text import first_sentences, html_to_text
from crawler.normalize.words import normalize_tags, normalize_trained_words

__all__ = [
    "KNOWN_FAMILIES",
    "civitai_content_hash",
    "content_hash",
    "first_sentences",
    "hf_content_hash",
    "html_to_text",
    "normalize_base_model",
    "normalize_civitai",
    "normalize_civitai_files",
    "normalize_civitai_license",
    "normalize_hf_files",
    "normalize_hf_license",
    "normalize_huggingface",
    "normalize_kind",
    "normalize_stats",
    "normalize_tags",
    "normalize_trained_words",
    "select_primary",
    "split_model_card",
]
