"""Module names of SD1.5, SD2.1 and SDXL UNets: diffusers ↔ original (LDM) ↔ kohya flat names.

Canonical names in this library are diffusers paths prefixed with the model part
(``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``). ComfyUI's own weights use LDM
paths (``diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q``), and kohya files flatten
diffusers paths with underscores (``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``).

The LDM ↔ diffusers mapping depends only on the block layout (res blocks per level, which levels
have transformers, whether the middle block has one), so ``UNetLayout`` covers the presets and any
small test UNet alike. Nothing here imports ComfyUI; the mapping was checked against
``comfy.utils.unet_to_diffusers`` in the tests.

Public API:
- ``UNetLayout`` (``UNetLayout.build(res_blocks, down_depth, up_depth=None, mid_depth=1)``),
  ``LAYOUTS`` / ``layout_for(name)`` for ``sd15``, ``sd21``, ``sdxl``;
- ``infer_layout_from_ldm_keys(keys)``, ``infer_layout_from_diffusers_config(config)``,
  ``infer_layout_from_ldm_config(unet_config)`` (ComfyUI's ``model_config.unet_config``);
- ``ldm_to_diffusers(name, layout)``, ``diffusers_to_ldm(name, layout)``;
- ``canonical_to_kohya`` / ``kohya_to_canonical``, ``canonical_to_native`` / ``native_to_canonical``,
  ``dotted_from_flat`` (kohya flat path → dotted path), ``normalize_text_encoder_path``;
- ``layout_to_json`` / ``layout_from_json`` (how a non-preset layout travels in file metadata).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from .errors import ArchitectureMismatchError, LoraFormatError


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """Block structure of an SD-family UNet, enough to translate module names both ways.

    ``res_blocks``: res blocks per down level, top (full resolution) level first; an up level has
    one more. ``down_depth``: transformer blocks per attention in each down level (0 = no attention).
    ``up_depth``: the same per diffusers up block (deepest level first). ``mid_depth``: transformer
    blocks in the middle attention; 0 means a middle block without attention (ComfyUI's
    ``transformer_depth_middle = -1``: one res block only).
    """

    res_blocks: Tuple[int, ...]
    down_depth: Tuple[int, ...]
    up_depth: Tuple[int, ...]
    mid_depth: int = 1

    def __post_init__(self):
        if not (len(self.res_blocks) == len(self.down_depth) == len(self.up_depth) >= 1):
            raise ArchitectureMismatchError(
                f"inconsistent UNet layout {self}: res_blocks, down_depth and up_depth need one entry per level")
        if min(self.res_blocks) < 1 or min(self.down_depth + self.up_depth + (self.mid_depth,)) < 0:
            raise ArchitectureMismatchError(f"inconsistent UNet layout {self}: negative or zero sizes")

    @classmethod
    def build(cls, res_blocks: Union[int, Sequence[int]], down_depth: Sequence[int],
              up_depth: Optional[Sequence[int]] = None, mid_depth: int = 1) -> "UNetLayout":
        """A layout from per-level lists; ``res_blocks`` may be one int, ``up_depth`` defaults to
        ``down_depth`` reversed (as in SD1.5, SD2.1 and SDXL)."""
        down_depth = tuple(int(d) for d in down_depth)
        if isinstance(res_blocks, int):
            res_blocks = (res_blocks,) * len(down_depth)
        up = tuple(reversed(down_depth)) if up_depth is None else tuple(int(d) for d in up_depth)
        return cls(tuple(int(r) for r in res_blocks), down_depth, up, int(mid_depth))

    @property
    def levels(self) -> int:
        return len(self.res_blocks)

    @property
    def down_attention(self) -> Tuple[bool, ...]:
        return tuple(d > 0 for d in self.down_depth)

    @property
    def up_attention(self) -> Tuple[bool, ...]:
        return tuple(d > 0 for d in self.up_depth)

    @property
    def mid_attention(self) -> bool:
        return self.mid_depth > 0

    def up_res_blocks(self, up_level: int) -> int:
        """Res blocks in diffusers up block ``up_level`` (deepest first)."""
        return self.res_blocks[self.levels - 1 - up_level] + 1

    def input_block_start(self, level: int) -> int:
        """Index of the first LDM ``input_blocks`` entry of a down level (0 is conv_in)."""
        return 1 + sum(n + 1 for n in self.res_blocks[:level])

    def output_block_start(self, up_level: int) -> int:
        """Index of the first LDM ``output_blocks`` entry of a diffusers up block."""
        return sum(self.up_res_blocks(u) for u in range(up_level))


LAYOUTS = {
    "sd15": UNetLayout.build(2, (1, 1, 1, 0)),
    "sd21": UNetLayout.build(2, (1, 1, 1, 0)),
    "sdxl": UNetLayout.build(2, (0, 2, 10), mid_depth=10),
}
"""Layouts of the released models (SD2.1 differs from SD1.5 in widths only, not in names)."""

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
_TOP_LEVEL_DIFFUSERS_TO_LDM.update({"class_embedding.linear_1": "label_emb.0.0",
                                    "class_embedding.linear_2": "label_emb.0.2"})


def layout_for(architecture: str) -> UNetLayout:
    """The preset layout of ``sd15``, ``sd21`` or ``sdxl``."""
    if architecture not in LAYOUTS:
        raise ArchitectureMismatchError(
            f"no UNet layout preset for architecture {architecture!r}; pass the layout of the model "
            f"(infer_layout_from_ldm_keys / infer_layout_from_diffusers_config) or use one of {sorted(LAYOUTS)}"
        )
    return LAYOUTS[architecture]


def layout_to_json(layout: UNetLayout) -> str:
    return json.dumps(dataclasses.asdict(layout))


def layout_from_json(text: str) -> UNetLayout:
    try:
        raw = json.loads(text)
        return UNetLayout(tuple(raw["res_blocks"]), tuple(raw["down_depth"]), tuple(raw["up_depth"]),
                          int(raw["mid_depth"]))
    except (ValueError, KeyError, TypeError) as error:
        raise LoraFormatError(f"unreadable UNet layout in metadata: {text[:200]!r} ({error})") from None


# -- inferring layouts -----------------------------------------------------------------------

def _depth_at(keys: List[str], prefix: str) -> int:
    """Transformer blocks under ``prefix`` (0 when there is no attention there)."""
    depth = 0
    found = False
    pattern = re.compile(re.escape(prefix) + r"(?:transformer_blocks\.(\d+)\.)?")
    for key in keys:
        if key.startswith(prefix):
            found = True
            match = pattern.match(key)
            if match and match.group(1) is not None:
                depth = max(depth, int(match.group(1)) + 1)
    return depth if depth else (1 if found else 0)


def infer_layout_from_ldm_keys(keys: Iterable[str]) -> UNetLayout:
    """The layout of a full LDM UNet state dict (``diffusion_model.`` / ``model.diffusion_model.`` prefix optional)."""
    keys = [k.split("diffusion_model.", 1)[-1] for k in keys]
    inputs = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    if not inputs:
        raise ArchitectureMismatchError("no input_blocks keys: not an SD-family UNet state dict")
    downsamplers = sorted({int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))})
    ends = downsamplers + [max(inputs) + 1]  # one past each level's last res block
    res_blocks, starts, start = [], [], 1
    for end in ends:
        res_blocks.append(end - start)
        starts.append(start)
        start = end + 1
    if min(res_blocks) < 1:
        raise ArchitectureMismatchError(f"cannot read the UNet layout: input blocks {sorted(inputs)}")
    down_depth = [max(_depth_at(keys, f"input_blocks.{s + i}.1.") for i in range(n))
                  for s, n in zip(starts, res_blocks)]
    layout = UNetLayout.build(res_blocks, down_depth, mid_depth=0)
    up_depth = []
    for up in range(layout.levels):
        s = layout.output_block_start(up)
        up_depth.append(max(_depth_at([k for k in keys if ".conv." not in k], f"output_blocks.{s + i}.1.")
                            for i in range(layout.up_res_blocks(up))))
    mid = _depth_at(keys, "middle_block.1.") if any(k.startswith("middle_block.2.") for k in keys) else 0
    return UNetLayout(tuple(res_blocks), tuple(down_depth), tuple(up_depth), mid)


def infer_layout_from_ldm_config(unet_config) -> UNetLayout:
    """The layout from ComfyUI's ``model_config.unet_config`` (num_res_blocks, transformer_depth …)."""
    levels = len(unet_config["channel_mult"])
    res = list(unet_config["num_res_blocks"])
    if len(res) != levels:
        res = [res[0]] * levels
    # ComfyUI: transformer_depth has one entry per input res block (top level first);
    # transformer_depth_output one per output block, also top level first (it is popped from the end).
    depth_in = list(unet_config.get("transformer_depth") or [0] * sum(res))
    depth_out = list(unet_config.get("transformer_depth_output") or [0] * sum(n + 1 for n in res))
    down, position = [], 0
    for n in res:
        down.append(max(depth_in[position:position + n], default=0))
        position += n
    up, end = [], len(depth_out)
    for n in reversed(res):  # diffusers up blocks run deepest level first
        up.append(max(depth_out[end - n - 1:end], default=0))
        end -= n + 1
    middle = unet_config.get("transformer_depth_middle")
    middle = depth_in[-1] if middle is None else int(middle)
    return UNetLayout(tuple(res), tuple(down), tuple(up), max(middle, 0))


def infer_layout_from_diffusers_config(config) -> UNetLayout:
    """The layout of a diffusers ``UNet2DConditionModel`` config (dict or FrozenDict)."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(down_types)
    layers = config.get("layers_per_block", 2)
    res = [int(layers)] * levels if isinstance(layers, int) else [int(n) for n in layers]
    per_level = config.get("transformer_layers_per_block", 1)
    if isinstance(per_level, int):
        per_level = [per_level] * levels
    per_level = [max(d) if isinstance(d, (list, tuple)) else int(d) for d in per_level]
    down = [d if "CrossAttn" in t else 0 for d, t in zip(per_level, down_types)]
    reverse = config.get("reverse_transformer_layers_per_block")
    up_per_level = ([max(d) if isinstance(d, (list, tuple)) else int(d) for d in reverse]
                    if reverse else list(reversed(per_level)))
    up = [d if "CrossAttn" in t else 0 for d, t in zip(up_per_level, up_types)]
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in (None, "UNetMidBlock2DCrossAttn"):
        raise ArchitectureMismatchError(f"mid block {mid_type!r} has no LDM equivalent in SD-family UNets")
    mid = per_level[-1] if mid_type == "UNetMidBlock2DCrossAttn" else 0
    return UNetLayout(tuple(res), tuple(down), tuple(up), mid)


# -- diffusers <-> LDM -----------------------------------------------------------------------

def ldm_to_diffusers(name: str, layout: UNetLayout) -> str:
    """``input_blocks.1.1.transformer_blocks.0.attn1.to_q``
    → ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``."""
    original = name
    name = name.split("diffusion_model.", 1)[-1]
    for ldm, diffusers in _TOP_LEVEL_LDM_TO_DIFFUSERS.items():
        if name == ldm or name.startswith(ldm + "."):
            return diffusers + name[len(ldm):]
    match = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?(?:\.(.*))?$", name)
    if not match:
        raise LoraFormatError(f"not an LDM UNet module name: {original!r}")
    block, first, second, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4) or ""
    if block == "middle_block":
        rest = _join(second or "", rest) if second is not None else rest
        prefixes = ({0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}
                    if layout.mid_attention else {0: "mid_block.resnets.0", 1: "mid_block.resnets.1"})
        if first not in prefixes:
            raise LoraFormatError(f"{original!r} does not exist in a UNet of layout {layout}")
        return _inner(prefixes[first], rest, resnet="resnets" in prefixes[first])
    if second is None:
        raise LoraFormatError(f"not an LDM UNet module name: {original!r}")
    part = int(second)
    if block == "input_blocks":
        for level in range(layout.levels):
            start = layout.input_block_start(level)
            position = first - start
            if 0 <= position < layout.res_blocks[level]:
                if part == 0:
                    return _inner(f"down_blocks.{level}.resnets.{position}", rest, resnet=True)
                if part == 1 and layout.down_attention[level]:
                    return _join(f"down_blocks.{level}.attentions.{position}", rest)
            elif position == layout.res_blocks[level] and level < layout.levels - 1 and part == 0:
                if rest == "op" or rest.startswith("op."):
                    return _join(f"down_blocks.{level}.downsamplers.0.conv", rest[len("op"):].lstrip("."))
        raise LoraFormatError(f"{original!r} does not exist in a UNet of layout {layout}")
    for up in range(layout.levels):
        start = layout.output_block_start(up)
        position = first - start
        if 0 <= position < layout.up_res_blocks(up):
            if part == 0:
                return _inner(f"up_blocks.{up}.resnets.{position}", rest, resnet=True)
            if part == 1 and layout.up_attention[up]:
                return _join(f"up_blocks.{up}.attentions.{position}", rest)
            is_last = position == layout.up_res_blocks(up) - 1
            if is_last and up < layout.levels - 1 and part == (2 if layout.up_attention[up] else 1):
                return _join(f"up_blocks.{up}.upsamplers.0", rest)
    raise LoraFormatError(f"{original!r} does not exist in a UNet of layout {layout}")


def diffusers_to_ldm(name: str, layout: UNetLayout) -> str:
    """The inverse of :func:`ldm_to_diffusers`."""
    original = name
    for diffusers, ldm in _TOP_LEVEL_DIFFUSERS_TO_LDM.items():
        if name == diffusers or name.startswith(diffusers + "."):
            return ldm + name[len(diffusers):]
    mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", name)
    if mid:
        kind, index, rest = mid.group(1), int(mid.group(2)), mid.group(3) or ""
        if kind == "attentions" and index == 0 and layout.mid_attention:
            return _join("middle_block.1", rest)
        if kind == "resnets" and index in (0, 1):
            position = 0 if index == 0 else (2 if layout.mid_attention else 1)
            return _join(f"middle_block.{position}", _resnet_rest_to_ldm(rest))
        raise LoraFormatError(f"{original!r} does not exist in a UNet of layout {layout}")
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$",
                     name)
    if not match:
        raise LoraFormatError(f"not a diffusers UNet module name: {original!r}")
    block, level, kind, index, rest = (match.group(1), int(match.group(2)), match.group(3), int(match.group(4)),
                                       match.group(5) or "")
    if level >= layout.levels:
        raise LoraFormatError(f"{original!r} does not exist in a UNet of layout {layout}")
    if block == "down_blocks":
        start, count, attention = layout.input_block_start(level), layout.res_blocks[level], layout.down_attention
        if kind == "downsamplers" and index == 0 and level < layout.levels - 1:
            rest = rest[len("conv"):].lstrip(".") if rest == "conv" or rest.startswith("conv.") else None
            if rest is not None:
                return _join(f"input_blocks.{start + count}.0.op", rest)
        elif kind == "resnets" and index < count:
            return _join(f"input_blocks.{start + index}.0", _resnet_rest_to_ldm(rest))
        elif kind == "attentions" and index < count and attention[level]:
            return _join(f"input_blocks.{start + index}.1", rest)
        raise LoraFormatError(f"{original!r} does not exist in a UNet of layout {layout}")
    start, count = layout.output_block_start(level), layout.up_res_blocks(level)
    if kind == "upsamplers" and index == 0 and level < layout.levels - 1:
        part = 2 if layout.up_attention[level] else 1
        return _join(f"output_blocks.{start + count - 1}.{part}", rest)
    if kind == "resnets" and index < count:
        return _join(f"output_blocks.{start + index}.0", _resnet_rest_to_ldm(rest))
    if kind == "attentions" and index < count and layout.up_attention[level]:
        return _join(f"output_blocks.{start + index}.1", rest)
    raise LoraFormatError(f"{original!r} does not exist in a UNet of layout {layout}")


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

# Multi-word names that must survive the underscore round trip (diffusers UNet, transformers CLIP,
# LDM), longest first so that ``time_emb_proj`` wins over shorter matches.
_COMPOUND_NAMES = sorted(
    [
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "time_embedding", "linear_1", "linear_2",
        "add_embedding", "class_embedding", "conv_in", "conv_out", "conv_norm_out", "text_model", "self_attn",
        "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2",
        "token_embedding", "position_embedding", "text_projection", "input_blocks", "output_blocks",
        "middle_block", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
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


_TEXT_MODEL_HEADS = ("embeddings", "encoder", "final_layer_norm")


def normalize_text_encoder_path(path: str) -> str:
    """CLIP text-encoder module path as kohya, ComfyUI and transformers 4 spell it (``text_model.…``).

    transformers 5's ``CLIPTextModel`` dropped the ``text_model.`` level from its module names
    (``encoder.layers.0.self_attn.q_proj``); ``CLIPTextModelWithProjection`` keeps it. Canonical
    names always carry it, so both spellings meet in one name.
    """
    if path.split(".", 1)[0] in _TEXT_MODEL_HEADS:
        return "text_model." + path
    return path


def is_ldm_path(path: str) -> bool:
    """Whether a dotted UNet path uses LDM block names (``input_blocks…``) rather than diffusers ones."""
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
            elif part != "unet":
                path = normalize_text_encoder_path(path)
            return f"{part}.{path}"
    raise LoraFormatError(f"not a kohya LoRA module name: {kohya_name!r}")


def canonical_to_kohya(canonical: str, architecture: str = "sd15") -> str:
    """Canonical dotted name → kohya flat name (``lora_te1_``/``lora_te2_`` for SDXL)."""
    part, _, path = canonical.partition(".")
    if part != "unet":
        path = normalize_text_encoder_path(path)
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
    """ComfyUI native ``diffusion_model.<LDM path>`` → canonical ``unet.<diffusers path>``."""
    if not native.startswith("diffusion_model."):
        raise LoraFormatError(f"not a ComfyUI native UNet module name: {native!r}")
    return "unet." + ldm_to_diffusers(native[len("diffusion_model."):], layout)
