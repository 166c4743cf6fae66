"""Tucker (CP) cores used by LyCORIS for convolutions: rebuild the full kernel from a core and two factors."""

from __future__ import annotations

import torch


def rebuild_tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``einsum("i j ..., i p, j r -> p r ...")``: core ``(r1, r2, kh, kw)``, ``wa (r1, out)``, ``wb (r2, in)``."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core.float(), wa.float(), wb.float())


def rebuild_tucker_from_conv(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """LoCon's ``lora_up (out, r, 1, 1)``, ``lora_down (r, in, 1, 1)``, ``lora_mid (r, r, kh, kw)`` → ``(out, in, kh, kw)``."""
    up2 = up.float().reshape(up.shape[0], up.shape[1])
    down2 = down.float().reshape(down.shape[0], down.shape[1])
    return torch.einsum("m n ..., i m, n j -> i j ...", mid.float(), up2, down2)
