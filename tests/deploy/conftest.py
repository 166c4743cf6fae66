"""Deploy test helpers: the tiny zoo registered as local experts in an embedded graph."""

from __future__ import annotations

import hashlib
from pathlib import Path

from core.settings import Settings
from core.types import Expert, ExpertFile, ExpertKind, MergePlan, PlannedExpert
from tests.local_files import import_local_files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def local_expert(path: Path, kind: ExpertKind, name: str, embedding: list[float] | None = None) -> Expert:
    """An expert of source ``local`` whose primary file is ``path`` (hash recorded, like a crawl would)."""
    digest = _sha256(path)
    return Expert(
        id=f"local:{digest[:16]}",
        source="local",
        source_version_id=digest[:16],
        name=name,
        kind=kind,
        base_model="SD 1.5",
        base_family="sd15",
        skill=f"{name}: a tiny test expert",
        files=[ExpertFile(name=path.name, url=path.resolve().as_uri(), sha256=digest,
                          size_bytes=path.stat().st_size, format="SafeTensor", primary=True)],
        embedding=embedding,
        content_hash=digest,
    )


def zoo_experts(zoo, corrupt_dir: Path) -> dict[str, Expert]:
    """Two checkpoints, two LoRAs and one LoRA whose file is not a weight file (hash-valid garbage)."""
    corrupt_dir.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt_dir / "corrupt-lora.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"not\": json at all" + bytes(range(256)) * 8)
    return {
        "ckpt0": local_expert(zoo.checkpoints[0], ExpertKind.checkpoint, "tiny checkpoint 0"),
        "ckpt1": local_expert(zoo.checkpoints[1], ExpertKind.checkpoint, "tiny checkpoint 1"),
        "lora0": local_expert(zoo.loras_kohya[0], ExpertKind.lora, "tiny lora 0"),
        "lora1": local_expert(zoo.loras_kohya[1], ExpertKind.lora, "tiny lora 1"),
        "corrupt": local_expert(corrupt, ExpertKind.lora, "corrupt lora"),
    }


def register(settings: Settings, experts: dict[str, Expert]) -> None:
    from graphdb.store import store_session

    with store_session(settings) as store:
        store.upsert_experts(list(experts.values()))
    import_local_files(settings, list(experts.values()))



def explicit_plan(experts: dict[str, Expert], ckpt: str = "ckpt0", lora: str | None = "lora0") -> dict:
    """An explicit MergePlan (JSON) using one checkpoint and optionally one LoRA."""
    plan = MergePlan(
        base_family="sd15",
        checkpoints=[PlannedExpert(expert_id=experts[ckpt].id, name=experts[ckpt].name,
                                   kind=ExpertKind.checkpoint, coefficient=0.6)],
        loras=[PlannedExpert(expert_id=experts[lora].id, name=experts[lora].name, kind=ExpertKind.lora,
                             coefficient=0.8)] if lora else [],
    )
    return plan.model_dump(mode="json")
