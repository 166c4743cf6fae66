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
    if family.arch not in ("sd15", "sdxl"):
        raise IncompatibleExpert(f"no one-to-one original layout for family {family.name!r}")
    out: dict[str, LdmKey] = {}
    unet_blocks = _unet_block_prefixes(configs["unet"]) if "unet" in diffusers_keys else []
    for component, keys in diffusers_keys.items():
        if component not in ("unet", "vae", "text_encoder"):
            continue  # SDXL's OpenCLIP encoder fuses q|k|v: see openclip_segments
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

    if family.arch != "sd15":
        raise IncompatibleExpert(f"whole-dict conversion is only written for SD1.5, not {family.name!r}")
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
    unet_p, vae_p = family.prefixes.get("unet", "\0"), family.prefixes.get("vae", "\0")
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
    if component is None or component not in ("unet", "vae", "text_encoder"):
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


# ---------------------------------------------------------------- row-segment layouts (SDXL te2, FLUX)
#
# Some original layouts fuse tensors diffusers keeps apart (OpenCLIP's ``in_proj_weight`` = q|k|v, FLUX's
# ``qkv`` and ``linear1`` = q|k|v|mlp) or order rows differently (FLUX's final modulation stores
# shift|scale, diffusers scale|shift). A :class:`Segment` says that rows ``diff_rows`` of one diffusers
# tensor are rows ``orig_rows`` of one original tensor (``None``: all rows), so merges read either side
# lazily, row slice by row slice, and never hold a converted copy of a whole model.


@dataclass(frozen=True)
class Segment:
    """Rows ``diff_rows`` of diffusers ``component``/``key`` are rows ``orig_rows`` of ``original``
    (``transpose``: the original stores the transpose, as OpenCLIP's ``text_projection``)."""

    original: str
    component: str
    key: str
    orig_rows: tuple[int, int] | None = None
    diff_rows: tuple[int, int] | None = None
    transpose: bool = False
    conv_1x1: bool = False


_OPENCLIP_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                   ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))


def openclip_segments(prefix: str, n_layers: int, hidden: int) -> list[Segment]:
    """SDXL's second text encoder (OpenCLIP ViT-bigG layout) ↔ ``CLIPTextModelWithProjection``.

    Mirrors diffusers' ``convert_open_clip_checkpoint`` (which only reads); tests compare both.
    """
    c = "text_encoder_2"
    segs = [
        Segment(prefix + "positional_embedding", c, "text_model.embeddings.position_embedding.weight"),
        Segment(prefix + "token_embedding.weight", c, "text_model.embeddings.token_embedding.weight"),
        Segment(prefix + "ln_final.weight", c, "text_model.final_layer_norm.weight"),
        Segment(prefix + "ln_final.bias", c, "text_model.final_layer_norm.bias"),
        Segment(prefix + "text_projection", c, "text_projection.weight", transpose=True),
    ]
    for i in range(n_layers):
        orig, diff = f"{prefix}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for o, d in _OPENCLIP_LAYER:
            segs += [Segment(f"{orig}{o}{p}", c, f"{diff}{d}{p}") for p in ("weight", "bias")]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = (j * hidden, (j + 1) * hidden)
            segs.append(Segment(f"{orig}attn.in_proj_weight", c, f"{diff}self_attn.{proj}.weight", rows))
            segs.append(Segment(f"{orig}attn.in_proj_bias", c, f"{diff}self_attn.{proj}.bias", rows))
    return segs


def flux_segments(prefix: str, n_double: int, n_single: int, inner: int, mlp: int,
                  guidance: bool) -> list[Segment]:
    """FLUX.1 transformer, original BFL layout ↔ diffusers ``FluxTransformer2DModel``.

    Written by hand because diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes the
    full width (3072) and only reads; tests compare both on full-width probe tensors.
    """
    c = "transformer"
    segs: list[Segment] = []

    def pair(orig: str, diff: str) -> None:
        segs.extend(Segment(f"{prefix}{orig}.{p}", c, f"{diff}.{p}") for p in ("weight", "bias"))

    def split(orig: str, diffs: list[str], sizes: list[int]) -> None:
        start = 0
        for diff, size in zip(diffs, sizes, strict=True):
            rows = (start, start + size)
            segs.extend(Segment(f"{prefix}{orig}.{p}", c, f"{diff}.{p}", rows) for p in ("weight", "bias"))
            start += size

    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if guidance:
        embedders.append(("guidance_in", "guidance_embedder"))
    for orig, diff in embedders:
        pair(f"{orig}.in_layer", f"time_text_embed.{diff}.linear_1")
        pair(f"{orig}.out_layer", f"time_text_embed.{diff}.linear_2")
    pair("txt_in", "context_embedder")
    pair("img_in", "x_embedder")
    for i in range(n_double):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        pair(o + "img_mod.lin", d + "norm1.linear")
        pair(o + "txt_mod.lin", d + "norm1_context.linear")
        split(o + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], [inner] * 3)
        split(o + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], [inner] * 3)
        for side, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            segs.append(Segment(f"{prefix}{o}{side}_attn.norm.query_norm.scale", c, f"{d}attn.{q}.weight"))
            segs.append(Segment(f"{prefix}{o}{side}_attn.norm.key_norm.scale", c, f"{d}attn.{k}.weight"))
        pair(o + "img_mlp.0", d + "ff.net.0.proj")
        pair(o + "img_mlp.2", d + "ff.net.2")
        pair(o + "txt_mlp.0", d + "ff_context.net.0.proj")
        pair(o + "txt_mlp.2", d + "ff_context.net.2")
        pair(o + "img_attn.proj", d + "attn.to_out.0")
        pair(o + "txt_attn.proj", d + "attn.to_add_out")
    for i in range(n_single):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        pair(o + "modulation.lin", d + "norm.linear")
        split(o + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"],
              [inner, inner, inner, mlp])
        segs.append(Segment(f"{prefix}{o}norm.query_norm.scale", c, f"{d}attn.norm_q.weight"))
        segs.append(Segment(f"{prefix}{o}norm.key_norm.scale", c, f"{d}attn.norm_k.weight"))
        pair(o + "linear2", d + "proj_out")
    pair("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):  # the original stores shift|scale, diffusers scale|shift
        orig = f"{prefix}final_layer.adaLN_modulation.1.{p}"
        segs.append(Segment(orig, c, f"norm_out.linear.{p}", (inner, 2 * inner), (0, inner)))
        segs.append(Segment(orig, c, f"norm_out.linear.{p}", (0, inner), (inner, 2 * inner)))
    return segs


def _count(keys: list[str] | set[str], pattern: str) -> int:
    import re

    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def flux_segments_from_original(keys: list[str], shape: Any, prefix: str) -> list[Segment]:
    """FLUX segments for an original-layout key set (``shape(key)`` gives stored shapes)."""
    inner = int(shape(prefix + "img_in.weight")[0])
    mlp = int(shape(prefix + "double_blocks.0.img_mlp.0.weight")[0]) if prefix + "double_blocks.0.img_mlp.0.weight" \
        in set(keys) else 4 * inner
    stripped = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    return flux_segments(prefix, _count(stripped, r"double_blocks\.(\d+)\."), _count(stripped, r"single_blocks\.(\d+)\."),
                         inner, mlp, any(k.startswith("guidance_in.") for k in stripped))


def flux_segments_from_diffusers(keys: list[str], shape: Any, prefix: str = "") -> list[Segment]:
    """FLUX segments for a diffusers transformer key set (the original side named with ``prefix``)."""
    inner = int(shape("x_embedder.weight")[0])
    mlp = int(shape("transformer_blocks.0.ff.net.0.proj.weight")[0]) if "transformer_blocks.0.ff.net.0.proj.weight" \
        in set(keys) else 4 * inner
    return flux_segments(prefix, _count(keys, r"transformer_blocks\.(\d+)\."),
                         _count(keys, r"single_transformer_blocks\.(\d+)\."), inner, mlp,
                         any(k.startswith("time_text_embed.guidance_embedder.") for k in keys))


def openclip_segments_from_original(keys: list[str], shape: Any, prefix: str) -> list[Segment]:
    hidden = int(shape(prefix + "positional_embedding")[1])
    stripped = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    return openclip_segments(prefix, _count(stripped, r"transformer\.resblocks\.(\d+)\."), hidden)


def openclip_segments_from_diffusers(keys: list[str], shape: Any, prefix: str) -> list[Segment]:
    hidden = int(shape("text_model.embeddings.position_embedding.weight")[1])
    return openclip_segments(prefix, _count(keys, r"text_model\.encoder\.layers\.(\d+)\."), hidden)


def original_from_segments(segs: list[Segment], tensors: dict[tuple[str, str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Assemble original-layout tensors from diffusers tensors keyed ``(component, key)`` (pure)."""
    import torch

    groups: dict[str, list[Segment]] = {}
    for seg in segs:
        if (seg.component, seg.key) in tensors:
            groups.setdefault(seg.original, []).append(seg)
    out: dict[str, torch.Tensor] = {}
    for name, items in groups.items():
        parts = []
        for seg in sorted(items, key=lambda x: x.orig_rows[0] if x.orig_rows else 0):
            t = tensors[(seg.component, seg.key)]
            if seg.diff_rows is not None:
                t = t[seg.diff_rows[0]:seg.diff_rows[1]]
            if seg.transpose:
                t = t.T
            if seg.conv_1x1 and t.dim() == 2:
                t = t[:, :, None, None]
            parts.append(t)
        out[name] = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)).contiguous()
    return out
