"""Module names of SD1.5, SD2.1 and SDXL UNets: diffusers ↔ original (LDM) ↔ kohya flat names.

Canonical names in this library are diffusers paths prefixed with the model part
(``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``). ComfyUI's own weights use LDM
paths (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), and kohya files flatten either with
underscores (``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``).

The LDM ↔ diffusers mapping depends only on the block layout (levels, res blocks per level, which
levels have attention), so ``UNetLayout`` covers the presets and the small test UNets alike.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Optional, Tuple

from .errors import ArchitectureMismatchError, LoraFormatError


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """Block structure of an SD-family UNet, enough to translate module names both ways."""

    levels: int
    res_blocks: int
    down_attention: Tuple[bool, ...]  # per level, top (full resolution) first
    up_attention: Tuple[bool, ...]  # per diffusers up block (deepest first)
    mid_attention: bool = True

    def __post_init__(self):
        if len(self.down_attention) != self.levels or len(self.up_attention) != self.levels:
            raise ArchitectureMismatchError(f"inconsistent UNet layout {self}")


LAYOUTS = {
    "sd15": UNetLayout(4, 2, (True, True, True, False), (False, True, True, True), True),
    "sd21": UNetLayout(4, 2, (True, True, True, False), (False, True, True, True), True),
    "sdxl": UNetLayout(3, 2, (False, True, True), (True, True, False), True),
}

CONTEXT_WIDTH_TO_ARCHITECTURE = {768: "sd15", 1024: "sd21", 2048: "sdxl"}

_RESNET_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}

_TOP_LEVEL_LDM_TO_DIFFUSERS = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_TOP_LEVEL_DIFFUSERS_TO_LDM = {v: k for k, v in _TOP_LEVEL_LDM_TO_DIFFUSERS.items()}
_TOP_LEVEL_DIFFUSERS_TO_LDM.update({"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"})


def layout_for(architecture: str) -> UNetLayout:
    if architecture not in LAYOUTS:
        raise ArchitectureMismatchError(
            f"no UNet layout preset for architecture {architecture!r}; pass the layout of the model "
            f"(infer_layout_from_ldm_keys / infer_layout_from_diffusers_config) or use one of {sorted(LAYOUTS)}"
        )
    return LAYOUTS[architecture]


def infer_layout_from_ldm_keys(keys: Iterable[str]) -> UNetLayout:
    """The layout of a full LDM UNet state dict (``diffusion_model.`` prefix optional)."""
    keys = [k.split("diffusion_model.", 1)[-1] for k in keys]
    inputs = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    if not inputs:
        raise ArchitectureMismatchError("no input_blocks keys: not an SD-family UNet state dict")
    downsamplers = sorted({int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    levels = len(downsamplers) + 1
    res_blocks = (max(inputs) + 1) // levels - 1
    down = []
    for level in range(levels):
        first = 1 + level * (res_blocks + 1)
        down.append(any(k.startswith(f"input_blocks.{first}.1.") for k in keys))
    up = []
    for level in range(levels):
        first = level * (res_blocks + 1)
        up.append(any(k.startswith(f"output_blocks.{first}.1.") and ".conv." not in k for k in keys))
    mid = any(k.startswith("middle_block.1.") and "transformer" in k or k.startswith("middle_block.1.proj_in") for k in keys)
    return UNetLayout(levels, res_blocks, tuple(down), tuple(up), mid)


def infer_layout_from_diffusers_config(config) -> UNetLayout:
    """The layout of a diffusers ``UNet2DConditionModel`` config (dict or FrozenDict)."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise ArchitectureMismatchError("UNets with different res blocks per level are not supported")
        layers = layers[0]
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return UNetLayout(
        len(down_types),
        int(layers),
        tuple("CrossAttn" in t for t in down_types),
        tuple("CrossAttn" in t for t in up_types),
        mid_type is not None and "CrossAttn" in mid_type,
    )


def ldm_to_diffusers(name: str, layout: UNetLayout) -> str:
    """``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` → ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``."""
    original = name
    name = name.split("diffusion_model.", 1)[-1]
    for ldm, diffusers in _TOP_LEVEL_LDM_TO_DIFFUSERS.items():
        if name == ldm or name.startswith(ldm + "."):
            return diffusers + name[len(ldm):]
    n = layout.res_blocks
    match = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.?(\d+)?\.?(.*)$", name)
    if not match:
        raise LoraFormatError(f"not an LDM UNet module name: {original!r}")
    block, first, second, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    if block == "middle_block":
        # middle_block.<first>.<rest>: resnet, attention, resnet (or resnet, resnet)
        rest = ".".join(p for p in (second, rest) if p)
        if layout.mid_attention:
            prefix = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[first]
        else:
            prefix = {0: "mid_block.resnets.0", 1: "mid_block.resnets.1"}[first]
        return _inner(prefix, rest, resnet="resnets" in prefix)
    part = int(second) if second is not None else 0
    if block == "input_blocks":
        level, position = divmod(first - 1, n + 1)
        if position == n:  # downsampler
            return _join(f"down_blocks.{level}.downsamplers.0.conv", rest.replace("op", "", 1).lstrip("."))
        if part == 0:
            return _inner(f"down_blocks.{level}.resnets.{position}", rest, resnet=True)
        return _inner(f"down_blocks.{level}.attentions.{position}", rest, resnet=False)
    level, position = divmod(first, n + 1)
    if part == 0:
        return _inner(f"up_blocks.{level}.resnets.{position}", rest, resnet=True)
    if part == 1 and layout.up_attention[level]:
        return _inner(f"up_blocks.{level}.attentions.{position}", rest, resnet=False)
    # the upsampler: output_blocks.<last>.(1|2).conv
    return _join(f"up_blocks.{level}.upsamplers.0", rest)


def diffusers_to_ldm(name: str, layout: UNetLayout) -> str:
    """The inverse of :func:`ldm_to_diffusers`."""
    original = name
    for diffusers, ldm in _TOP_LEVEL_DIFFUSERS_TO_LDM.items():
        if name == diffusers or name.startswith(diffusers + "."):
            return ldm + name[len(diffusers):]
    n = layout.res_blocks
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.?(.*)$", name)
    mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.?(.*)$", name)
    if mid:
        kind, index, rest = mid.group(1), int(mid.group(2)), mid.group(3)
        if kind == "attentions":
            return _join("middle_block.1", rest)
        position = 0 if index == 0 else (2 if layout.mid_attention else 1)
        return _join(f"middle_block.{position}", _resnet_rest_to_ldm(rest))
    if not match:
        raise LoraFormatError(f"not a diffusers UNet module name: {original!r}")
    block, level, kind, index, rest = match.group(1), int(match.group(2)), match.group(3), int(match.group(4)), match.group(5)
    if block == "down_blocks":
        if kind == "downsamplers":
            rest = rest[len("conv"):].lstrip(".") if rest.startswith("conv") else rest
            return _join(f"input_blocks.{1 + level * (n + 1) + n}.0.op", rest)
        first = 1 + level * (n + 1) + index
        if kind == "resnets":
            return _join(f"input_blocks.{first}.0", _resnet_rest_to_ldm(rest))
        return _join(f"input_blocks.{first}.1", rest)
    if kind == "upsamplers":
        part = 2 if layout.up_attention[level] else 1
        return _join(f"output_blocks.{level * (n + 1) + n}.{part}", rest)
    first = level * (n + 1) + index
    if kind == "resnets":
        return _join(f"output_blocks.{first}.0", _resnet_rest_to_ldm(rest))
    return _join(f"output_blocks.{first}.1", rest)


def _join(prefix: str, rest: str) -> str:
    return f"{prefix}.{rest}" if rest else prefix


def _inner(prefix: str, rest: str, resnet: bool) -> str:
    if resnet:
        for ldm, diffusers in _RESNET_LDM_TO_DIFFUSERS.items():
            if rest == ldm or rest.startswith(ldm + "."):
                return _join(prefix, diffusers + rest[len(ldm):])
    return _join(prefix, rest)


def _resnet_rest_to_ldm(rest: str) -> str:
    for diffusers, ldm in _RESNET_DIFFUSERS_TO_LDM.items():
        if rest == diffusers or rest.startswith(diffusers + "."):
            return ldm + rest[len(diffusers):]
    return rest


# -- kohya flat names ------------------------------------------------------------------------

# Multi-word names that must survive the underscore round trip, longest first.
_COMPOUND_NAMES = sorted(
    [
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "time_embedding", "linear_1", "linear_2",
        "add_embedding", "conv_in", "conv_out", "conv_norm_out", "text_model", "self_attn", "q_proj",
        "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
        "position_embedding", "text_projection", "input_blocks", "output_blocks", "middle_block",
        "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
        "to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora",
    ],
    key=lambda s: -s.count("_"),
)
_COMPOUND_TOKENS = [tuple(c.split("_")) for c in _COMPOUND_NAMES]

KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
}


def dotted_from_flat(flat: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`` → dotted module path."""
    parts = flat.split("_")
    out = []
    i = 0
    while i < len(parts):
        for tokens in _COMPOUND_TOKENS:
            if tuple(parts[i:i + len(tokens)]) == tokens:
                out.append("_".join(tokens))
                i += len(tokens)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def is_ldm_path(path: str) -> bool:
    head = path.split(".", 1)[0]
    return head in ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


def kohya_to_canonical(kohya_name: str, layout: Optional[UNetLayout] = None) -> str:
    """``lora_unet_…`` / ``lora_te_…`` / ``lora_te1_…`` / ``lora_te2_…`` → canonical dotted name.

    Kohya names built from LDM paths (``lora_unet_input_blocks_…``, which ComfyUI also accepts)
    need ``layout`` to become diffusers paths.
    """
    for prefix, part in KOHYA_PREFIXES.items():
        if kohya_name.startswith(prefix):
            path = dotted_from_flat(kohya_name[len(prefix):])
            if part == "unet" and is_ldm_path(path):
                if layout is None:
                    raise LoraFormatError(
                        f"{kohya_name!r} uses original (LDM) block names; the UNet layout is needed to read it"
                    )
                path = ldm_to_diffusers(path, layout)
            return f"{part}.{path}"
    raise LoraFormatError(f"not a kohya LoRA module name: {kohya_name!r}")


def canonical_to_kohya(canonical: str, architecture: str = "sd15") -> str:
    """Canonical dotted name → kohya flat name (``lora_te1_``/``lora_te2_`` for SDXL)."""
    part, _, path = canonical.partition(".")
    flat = path.replace(".", "_")
    if part == "unet":
        return f"lora_unet_{flat}"
    if part == "text_encoder":
        return f"lora_te1_{flat}" if architecture == "sdxl" else f"lora_te_{flat}"
    if part == "text_encoder_2":
        return f"lora_te2_{flat}"
    raise LoraFormatError(f"not a canonical module name (unet./text_encoder./text_encoder_2.): {canonical!r}")


def canonical_to_native(canonical: str, layout: UNetLayout) -> str:
    """Canonical UNet name → ComfyUI native ``diffusion_model.<LDM path>``."""
    part, _, path = canonical.partition(".")
    if part != "unet":
        raise LoraFormatError(f"native (LDM) names exist for UNet modules only, not {canonical!r}")
    return "diffusion_model." + diffusers_to_ldm(path, layout)


def native_to_canonical(native: str, layout: UNetLayout) -> str:
    if not native.startswith("diffusion_model."):
        raise LoraFormatError(f"not a ComfyUI native UNet module name: {native!r}")
    return "unet." + ldm_to_diffusers(native[len("diffusion_model."):], layout)
