"""Licence and usage-permission fields."""

from __future__ import annotations

from dataclasses import dataclass

from crawler.normalize.text import clean_line


@dataclass(frozen=True)
class LicenseInfo:
    license: str = ""
    allow_commercial_use: str = ""
    allow_derivatives: bool = True
    allow_no_credit: bool = True


def normalize_civitai_license(model: dict) -> LicenseInfo:
    """Civitai permissions: ``allowCommercialUse`` is a string (2023) or a list (2024+) of
    ``Image``/``Rent``/``RentCivit``/``Sell``; stored as a sorted comma list, ``None`` when nothing is allowed."""
    raw = model.get("allowCommercialUse")
    if isinstance(raw, list):
        values = sorted({clean_line(v, 32) for v in raw if isinstance(v, str) and v})
        commercial = ",".join(values) or "None"
    elif isinstance(raw, str) and raw:
        commercial = clean_line(raw, 128)
    else:
        commercial = ""
    return LicenseInfo(
        license=clean_line(model.get("license") or "", 128),
        allow_commercial_use=commercial,
        allow_derivatives=model.get("allowDerivatives") is not False,
        allow_no_credit=model.get("allowNoCredit") is not False,
    )


def normalize_hf_license(card: dict, tags: list[str]) -> LicenseInfo:
    """Hub licence: the model card's ``license`` key, else a ``license:`` tag."""
    raw = card.get("license")
    if isinstance(raw, list):
        raw = raw[0] if raw else ""
    if not raw:
        raw = next((t.split(":", 1)[1] for t in tags if isinstance(t, str) and t.startswith("license:")), "")
    return LicenseInfo(license=clean_line(raw, 128))
