"""Property-based fuzzing of the untrusted inputs (a derandomised sample; ``benchmarks/fuzz.py`` runs
thousands): crawled pages, weight-file headers, LoRA key sets and LLM replies never crash the project with
anything but its own clear errors. ``EXAMPLES`` pins each crash the fuzzer found (fixed since)."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings

from tests.fuzz.targets import TARGETS, run_case

CASES = 60
FUZZ = settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _safetensors(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


EXAMPLES: dict[str, list[Any]] = {
    # json.loads raised RecursionError (not ValueError) on a deeply nested page: the spider crashed
    "civitai_page": [b"[" * 100_000 + b"]" * 100_000],
    # a relative or scheme-less rel="next" link became Request("0"): ValueError: Missing scheme
    "hf_page": [(b"[]", '<0>; rel="next"'), (b"[]", '<file:///etc/passwd>; rel="next"')],
    # __metadata__ that is not a string map: TypeError in dict(); a dtype that is a list: unhashable
    "safetensors_header": [_safetensors({"x": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                                         "__metadata__": True}, b"\0" * 4),
                           _safetensors({"__metadata__": {"format": 1}}),
                           _safetensors({"x": {"dtype": [[]], "shape": [], "data_offsets": [0, 4]}}, b"\0" * 4)],
    # a JSON "\ud800" escape (a lone surrogate) crashed the content hash's UTF-8 encoding
    "civitai_version": [{"id": 5, "modelId": 7, "name": "\ud800 fox", "files": [{"\udfff": 1}]}],
    "hf_record": [({"id": "someone/model", "author": "\ud800"}, "---\nlicense: mit\n---\n\ud800")],
    "lora_keys": [
        # a scalar LoKr factor: IndexError in the shape formula
        {"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": ("F16", []),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1_a": ("F16", [48, 4]),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1_b": ("F16", [4, 32]),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2_a": ("F16", [48, 4]),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2_b": ("F16", [])},
        # a LoKr w1 with more dimensions than w2: AssertionError
        {"lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1_a": ("F16", [48, 4]),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1_b": ("F16", [4, 1, 0]),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2_a": ("F16", [48, 4]),
         "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2_b": ("F16", [4, 24])},
        # diffusers factors whose ranks disagree, or a 1-d factor: ValueError / IndexError
        {"unet.mid_block.attentions.0.proj_in.lora.down.weight": ("F32", [4, 48]),
         "unet.mid_block.attentions.0.proj_in.lora.up.weight": ("F32", [48, 5])},
        {"unet.mid_block.attentions.0.proj_in.lora.down.weight": ("F32", [4]),
         "unet.mid_block.attentions.0.proj_in.lora.up.weight": ("F32", [48, 4])},
        {"unet.mid_block.attentions.0.proj_in.lora.down.weight": ("F32", [0, 48]),
         "unet.mid_block.attentions.0.proj_in.lora.up.weight": ("F32", [48, 0])},
    ],
}


def _fuzz(name: str):
    strategy, _ = TARGETS[name]

    def check(value) -> None:
        run_case(name, value)

    for value in EXAMPLES.get(name, []):
        check = example(value)(check)
    return FUZZ(given(strategy)(check))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_no_crash(name: str) -> None:
    _fuzz(name)()


def test_a_crash_is_reported() -> None:
    """The harness itself: an exception other than the project's own errors fails the run."""
    with pytest.raises(TypeError):
        run_case("safetensors_header", None)  # not bytes: the target's own write fails
