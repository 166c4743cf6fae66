"""One per-process ``Generator`` (``merger.generate.shared_generator``), shared by calibration and generation,
keyed by the settings a Generator reads."""

from __future__ import annotations

from calibration.calibrate import _generator as calibration_generator
from deploy.generation import _generator as generation_generator
from merger.generate import shared_generator


def test_one_generator_per_configuration(settings) -> None:
    first = shared_generator(settings)
    assert calibration_generator(settings) is first and generation_generator(settings) is first
    # settings the Generator does not read keep it (and its built pipelines)
    assert shared_generator(settings.model_copy(update={"gen_steps": settings.gen_steps + 5})) is first
    other = shared_generator(settings.model_copy(update={"base_models": {"sd15": "/elsewhere/base.safetensors"}}))
    assert other is not first and other.settings.base_models == {"sd15": "/elsewhere/base.safetensors"}
    assert shared_generator(settings) is not first  # one at a time: the old configuration's was let go
