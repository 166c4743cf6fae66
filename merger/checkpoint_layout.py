"""Key layouts of SD1.5-family weights: diffusers component keys ↔ the original (LDM) single-file keys.

Reading original files into diffusers modules uses diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, see :func:`convert_ldm_to_diffusers`).
diffusers ships no inverse, so :func:`ldm_key_map` derives the diffusers → original names from the
component configs with the prefix tables of diffusers' ``convert_diffusers_to_original_stable_diffusion.py``
script, generalised from its hard-coded 4 levels × 2 layers to any ``block_out_channels`` /
``layers_per_block``. The map is a bijection, so one table serves both directions for streaming; tests
check it against the diffusers converters tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from merger.errors import IncompatibleExpert
from merger.families import Family

if TYPE_CHECKING:
    import torch

_UNET_TOP = (  # (original, diffusers)
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
)
_UNET_RESNET = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
)
_VAE_ATTN = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)
_VAE_CONV_ATTN = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


@dataclass(frozen=True)
class LdmKey:
    """Where one original-layout tensor lives in diffusers: component, key, and whether the original
    stores it as a 1×1 conv (VAE attention projections) while diffusers stores a linear weight."""

    component: str
    key: str
    conv_1x1: bool = False


def _unet_block_prefixes(config: dict[str, Any]) -> list[tuple[str, str]]:
    n_levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise IncompatibleExpert("per-block layers_per_block is not supported for single-file conversion")
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    pairs: list[tuple[str, str]] = []
    for i in range(n_levels):
        down_attn = "CrossAttn" in down_types[i]
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn:
                pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < n_levels - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        up_attn = "CrossAttn" in up_types[i]
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn:
                pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n_levels - 1:
            pairs.append(
                (f"output_blocks.{(layers + 1) * i + layers}.{2 if up_attn else 1}.", f"up_blocks.{i}.upsamplers.0.")
            )
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """One diffusers UNet key in the original layout (without the ``model.diffusion_model.`` prefix)."""
    return _unet_key_to_ldm(key, _unet_block_prefixes(config))


def _unet_key_to_ldm(key: str, blocks: list[tuple[str, str]]) -> str:
    for ldm, hf in _UNET_TOP:
        if key.startswith(hf):
            return ldm + key[len(hf):]
    for ldm, hf in blocks:
        if key.startswith(hf):
            rest = key[len(hf):]
            if ".resnets." in hf:
                for ldm_part, hf_part in _UNET_RESNET:
                    if rest.startswith(hf_part):
                        rest = ldm_part + rest[len(hf_part):]
                        break
            return ldm + rest
    raise IncompatibleExpert(f"UNet key {key!r} has no original-layout name")


def _vae_prefixes(config: dict[str, Any]) -> list[tuple[str, str]]:
    n_levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    pairs: list[tuple[str, str]] = []
    for i in range(n_levels):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(layers)]
        if i < n_levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{n_levels - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
        pairs += [
            (f"decoder.up.{n_levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
            for j in range(layers + 1)
        ]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid.block_{j + 1}.", f"{part}.mid_block.resnets.{j}.") for j in range(2)]
        pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
        pairs.append((f"{part}.norm_out.", f"{part}.conv_norm_out."))
    return pairs


def vae_key_to_ldm(key: str, config: dict[str, Any]) -> tuple[str, bool]:
    """One diffusers VAE key in the original layout (no prefix) and whether it is a 1×1-conv attention weight."""
    for ldm, hf in _vae_prefixes(config):
        if key.startswith(hf):
            rest = key[len(hf):]
            if ".attentions." in hf:
                conv = rest in _VAE_CONV_ATTN
                for ldm_part, hf_part in _VAE_ATTN:
                    if rest.startswith(hf_part):
                        return ldm + ldm_part + rest[len(hf_part):], conv
            return ldm + rest.replace("conv_shortcut.", "nin_shortcut."), False
    return key, False  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def ldm_key_map(family: Family, configs: dict[str, dict[str, Any]],
                diffusers_keys: dict[str, list[str]]) -> dict[str, LdmKey]:
    """Map every original-layout key of the merged components to its diffusers location.

    Args:
        family (`Family`): only SD1.5 layouts are implemented.
        configs (`dict`): component → its diffusers ``config.json`` (UNet and VAE need theirs).
        diffusers_keys (`dict`): component → its diffusers state-dict keys.

    Raises:
        IncompatibleExpert: a family without a layout conversion, or a key with no original name.
    """
    if family.name != "sd15":
        raise IncompatibleExpert(f"layout conversion for family {family.name!r} is not implemented yet; "
                                 "use experts in the same layout as the base")
    out: dict[str, LdmKey] = {}
    unet_blocks = _unet_block_prefixes(configs["unet"]) if "unet" in diffusers_keys else []
    for component, keys in diffusers_keys.items():
        prefix = family.prefixes[component]
        for key in keys:
            conv = False
            if component == "unet":
                name = _unet_key_to_ldm(key, unet_blocks)
            elif component == "vae":
                name, conv = vae_key_to_ldm(key, configs["vae"])
            else:  # transformers 5 saves CLIP without the "text_model." level the original layout has
                name = "text_model." + key.removeprefix("text_model.")
            full = prefix + name
            if full in out:
                raise IncompatibleExpert(f"two {component} keys map to the original key {full!r}")
            out[full] = LdmKey(component, key, conv)
    return out


def to_ldm_tensor(tensor: torch.Tensor, where: LdmKey) -> torch.Tensor:
    """A diffusers tensor shaped as the original layout stores it."""
    return tensor[:, :, None, None] if where.conv_1x1 and tensor.dim() == 2 else tensor


def to_diffusers_tensor(tensor: torch.Tensor, where: LdmKey) -> torch.Tensor:
    """An original-layout tensor shaped as diffusers stores it."""
    return tensor[:, :, 0, 0] if where.conv_1x1 and tensor.dim() == 4 else tensor


def convert_diffusers_to_ldm(family: Family, configs: dict[str, dict[str, Any]],
                             state_dicts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole diffusers component state dicts → one original-layout state dict (pure; inputs untouched)."""
    mapping = ldm_key_map(family, configs, {c: list(sd) for c, sd in state_dicts.items()})
    return {name: to_ldm_tensor(state_dicts[w.component][w.key], w) for name, w in mapping.items()}


def convert_ldm_to_diffusers(family: Family, configs: dict[str, dict[str, Any]],
                             checkpoint: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """One original-layout state dict → per-component diffusers state dicts, with diffusers' converters."""
    from diffusers.loaders import single_file_utils as sfu

    if family.name != "sd15":
        raise IncompatibleExpert(f"layout conversion for family {family.name!r} is not implemented yet")
    out: dict[str, dict[str, torch.Tensor]] = {}
    if "unet" in configs:
        out["unet"] = sfu.convert_ldm_unet_checkpoint(dict(checkpoint), configs["unet"])
    if "vae" in configs:
        out["vae"] = sfu.convert_ldm_vae_checkpoint(dict(checkpoint), configs["vae"])
    if "text_encoder" in family.components:
        prefix = family.prefixes["text_encoder"]
        out["text_encoder"] = sfu.convert_ldm_clip_checkpoint(
            {k: v for k, v in checkpoint.items() if k.startswith(prefix)}, remove_prefix=prefix
        )
    return out


def infer_ldm_configs(keys: list[str] | set[str], family: Family) -> dict[str, dict[str, Any]]:
    """The few config fields the key tables need, read off an original-layout file's own keys.

    UNet: ``n`` levels have ``n - 1`` downsamplers (``input_blocks.*.0.op``) and ``n·(layers + 1)`` output
    blocks; a level has attention when its first block has a ``.1.`` submodule. VAE: levels and resnets per
    level are counted from ``encoder.down.<i>.block.<j>``.
    """
    unet_p, vae_p = family.prefixes["unet"], family.prefixes["vae"]
    unet_keys = [k[len(unet_p):] for k in keys if k.startswith(unet_p)]
    vae_keys = [k[len(vae_p):] for k in keys if k.startswith(vae_p)]
    configs: dict[str, dict[str, Any]] = {}
    if unet_keys:
        ops = {k.split(".")[1] for k in unet_keys if k.startswith("input_blocks.") and ".0.op." in k}
        outputs = {k.split(".")[1] for k in unet_keys if k.startswith("output_blocks.")}
        n = len(ops) + 1
        layers = len(outputs) // n - 1
        if layers < 1 or len(outputs) != n * (layers + 1):
            raise IncompatibleExpert("cannot read the UNet structure from this file's keys")
        has = lambda prefix: any(k.startswith(prefix) for k in unet_keys)  # noqa: E731
        configs["unet"] = {
            "block_out_channels": [0] * n,
            "layers_per_block": layers,
            "down_block_types": ["CrossAttnDownBlock2D" if has(f"input_blocks.{(layers + 1) * i + 1}.1.")
                                 else "DownBlock2D" for i in range(n)],
            "up_block_types": ["CrossAttnUpBlock2D" if has(f"output_blocks.{(layers + 1) * i}.1.")
                               else "UpBlock2D" for i in range(n)],
        }
    if vae_keys:
        levels = {k.split(".")[2] for k in vae_keys if k.startswith("encoder.down.")}
        blocks = {k.split(".")[4] for k in vae_keys if k.startswith("encoder.down.0.block.")}
        configs["vae"] = {"block_out_channels": [0] * len(levels), "layers_per_block": len(blocks)}
    return configs


def ldm_key_to_diffusers(key: str, family: Family, configs: dict[str, dict[str, Any]],
                         _tables: dict[str, list[tuple[str, str]]] | None = None) -> LdmKey | None:
    """The diffusers location of one original-layout key (None for keys outside the merged components).

    The inverse of :func:`ldm_key_map`'s naming; text-encoder keys come back without ``text_model.``
    (transformers 5 naming).
    """
    component = family.component_of(key)
    if component is None:
        return None
    rest = key[len(family.prefixes[component]):]
    if component == "text_encoder":
        return LdmKey(component, rest.removeprefix("text_model."))
    tables = _tables if _tables is not None else ldm_tables(configs)
    if component == "unet":
        for ldm, hf in tables["unet"]:
            if rest.startswith(ldm):
                tail = rest[len(ldm):]
                if ".resnets." in hf:
                    for ldm_part, hf_part in _UNET_RESNET:
                        if tail.startswith(ldm_part):
                            tail = hf_part + tail[len(ldm_part):]
                            break
                return LdmKey(component, hf + tail)
        return None
    for ldm, hf in tables["vae"]:
        if rest.startswith(ldm):
            tail = rest[len(ldm):]
            if ".attentions." in hf:
                for ldm_part, hf_part in _VAE_ATTN:
                    if tail.startswith(ldm_part):
                        new_tail = hf_part + tail[len(ldm_part):]
                        return LdmKey(component, hf + new_tail, new_tail in _VAE_CONV_ATTN)
            return LdmKey(component, hf + tail.replace("nin_shortcut.", "conv_shortcut."))
    return LdmKey(component, rest)


def ldm_tables(configs: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """Prefix tables (original, diffusers) per component, longest original prefix first."""
    tables: dict[str, list[tuple[str, str]]] = {}
    if "unet" in configs:
        tables["unet"] = sorted([*_UNET_TOP, *_unet_block_prefixes(configs["unet"])], key=lambda p: -len(p[0]))
    if "vae" in configs:
        tables["vae"] = sorted(_vae_prefixes(configs["vae"]), key=lambda p: -len(p[0]))
    return tables
