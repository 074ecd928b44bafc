"""Safety-expert LoRA files: read kohya, ComfyUI native and PEFT/diffusers; write kohya (default).

Public API:
- ``load_expert(path, name=None, architecture=None, layout=None) -> SafetyExpert``
- ``expert_from_state_dict(state_dict, metadata=None, name=..., architecture=None, layout=None,
  adapter_config=None, source=...) -> SafetyExpert`` (in-memory tensors: nodes, trainer)
- ``save_expert(expert, path, key_format="kohya"|"native"|"peft", layout=None)`` (atomic)
- ``save_peft_folder(expert, folder, part="unet")``: a PEFT adapter folder (``adapter_model.safetensors`` +
  ``adapter_config.json``) that ``PeftModel.from_pretrained`` loads; ``load_expert`` reads such folders too
- ``expert_to_state_dict(expert, key_format, layout) -> (tensors, metadata)``
- ``read_safetensors(path) -> (tensors, metadata)`` with clear errors for pickles and broken files
  (``files.read_safetensors`` with ``LoraFormatError``); every file is written through ``files``
- ``detect_architecture(state_dict_or_expert)`` and ``check_compatible(expert, architecture)``

Formats (each key is read by one small reader in ``lora_formats``; ``expert_from_state_dict`` dispatches):
- kohya: ``lora_unet_<diffusers path with _>`` / ``lora_te_`` (SD1.5/2.1) / ``lora_te1_`` + ``lora_te2_``
  (SDXL), each with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``; ``ss_*`` metadata.
- native (ComfyUI): ``diffusion_model.<LDM path>.lora_down.weight`` …; needs the UNet layout, taken
  from ``layout=``, our ``safetydpo_unet_layout`` metadata or the architecture's preset. Text-encoder
  modules of a native file are written with kohya names, which ComfyUI reads for CLIP.
- PEFT / diffusers: ``<module>.lora_A.weight`` / ``.lora_B.weight`` (also ``.lora_A.default.weight``,
  ``processor.to_q_lora.down.weight``, ``.lora.down.weight``) with ``unet.``, ``text_encoder.``,
  ``base_model.model.`` prefixes. PEFT files carry no alpha tensors: alpha comes from diffusers'
  ``lora_adapter_metadata``, else an ``adapter_config.json`` beside the file (``lora_alpha``, ``r``,
  ``alpha_pattern``, ``rank_pattern``, ``use_rslora``), else alpha = rank with a logged warning.
- ``<module>.diff``: full weight differences (element-wise merges), any of the name styles above.

Why kohya by default: it is the one format ComfyUI, A1111/Forge and diffusers all load. We always
write an explicit ``.alpha`` per module, because a missing alpha means scale 1 in ComfyUI and some
diffusers helpers silently write alpha = rank (DESIGN.md: trained ΔW came out at half size), while
ComfyUI drops PEFT-keyed attention LoRAs without an error. Only safetensors are read; a pickle is
refused with a message, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from . import files, lora_formats, unet_keys
from .errors import ArchitectureMismatchError, LoraFormatError
from .expert import ARCHITECTURES, LoraModule, SafetyExpert

log = logging.getLogger(__name__)

KEY_FORMATS = ("kohya", "native", "peft")
SS_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd21": "sd_2.1", "sdxl": "sdxl_base_v1-0", "demo": "safetydpo_demo"}
_SS_TO_ARCHITECTURE = {"sd_v1": "sd15", "sd_2.0": "sd21", "sd_2.1": "sd21", "sd_v2": "sd21",
                       "sdxl_base_v1-0": "sdxl", "safetydpo_demo": "demo"}
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' metadata key for PEFT configs

_PARTS = ("unet", "text_encoder", "text_encoder_2")



# -- reading -----------------------------------------------------------------------------------

def read_safetensors(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a safetensors file, with clear errors for anything else (``files.read_safetensors``)."""
    return files.read_safetensors(path, error=LoraFormatError)


def load_expert(path, name: Optional[str] = None, architecture: Optional[str] = None,
                layout: Optional[unet_keys.UNetLayout] = None) -> SafetyExpert:
    """Read a LoRA file in any supported format as a ``SafetyExpert`` (float32 tensors).

    A folder is read as a PEFT adapter folder (its ``adapter_model.safetensors``).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "adapter_model.safetensors").is_file():
            raise LoraFormatError(f"{path}: a folder is read as a PEFT adapter folder, but it has no "
                                  "adapter_model.safetensors; give the LoRA .safetensors file itself")
        path = path / "adapter_model.safetensors"
    tensors, metadata = read_safetensors(path)
    config = _adapter_config_beside(path)
    try:
        return expert_from_state_dict(
            tensors, metadata, name=name or metadata.get("safetydpo_name") or path.stem,
            architecture=architecture, layout=layout, adapter_config=config, source=str(path),
        )
    except LoraFormatError as error:
        message = str(error)
        raise LoraFormatError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def _adapter_config_beside(path: Path) -> Optional[dict]:
    candidate = path.parent / "adapter_config.json"
    if candidate.is_file():
        try:
            config = json.loads(candidate.read_text())
        except json.JSONDecodeError as error:
            raise LoraFormatError(f"{candidate}: not valid JSON ({error})") from None
        if not isinstance(config, dict):
            raise LoraFormatError(f"{candidate}: expected a JSON object (peft's LoraConfig)")
        return config
    return None


def expert_from_state_dict(
    state_dict: Dict[str, torch.Tensor],
    metadata: Optional[Dict[str, str]] = None,
    name: str = "expert",
    architecture: Optional[str] = None,
    layout: Optional[unet_keys.UNetLayout] = None,
    adapter_config: Optional[dict] = None,
    source: str = "state dict",
) -> SafetyExpert:
    """Build an expert from LoRA tensors in kohya, native, PEFT/diffusers or ``.diff`` form.

    Tensors are copied to float32 on the CPU (mixed dtypes are fine). ``architecture`` overrides
    what the metadata or the key shapes say; ``layout`` is needed only for LDM-named keys of a
    UNet that is not a preset. Each key is read by the per-format readers of ``lora_formats``.
    """
    metadata = dict(metadata or {})
    architecture, layout = _architecture_and_layout(state_dict, metadata, architecture, layout, source)
    parts = _read_keys(state_dict, lora_formats.ModuleNamer(layout, architecture, source), source)
    modules = _lora_modules(parts, _PeftAlpha(metadata, adapter_config, source), source)
    for module, diff in parts.diffs.items():
        if not torch.isfinite(diff).all():
            raise LoraFormatError(f"{source}: module {module!r} (key {parts.key_of[module]!r}) has NaN/Inf values "
                                  "in its diff")
    stray_alpha = sorted(set(parts.alphas) - set(modules))
    if stray_alpha:
        raise LoraFormatError(f"{source}: alpha without LoRA matrices: {parts.key_of[stray_alpha[0]]!r}")
    if not modules and not parts.diffs:
        raise LoraFormatError(f"{source}: no LoRA modules found")
    own = {k: v for k, v in metadata.items() if k.startswith("safetydpo_") or k.startswith("ss_")}
    return SafetyExpert(name=name, modules=modules, diffs=parts.diffs, architecture=architecture,
                        categories=_categories(metadata), metadata=own)


def _architecture_and_layout(state_dict, metadata: Dict[str, str], architecture: Optional[str],
                             layout: Optional[unet_keys.UNetLayout], source: str):
    """The architecture (argument, our metadata, kohya's ``ss_base_model_version``, or the key shapes) and
    the UNet layout (argument, our metadata, or the architecture's preset)."""
    if architecture is None:
        architecture = (metadata.get("safetydpo_architecture")
                        or _SS_TO_ARCHITECTURE.get(metadata.get("ss_base_model_version", ""))
                        or detect_architecture(state_dict))
    if architecture not in ARCHITECTURES:
        raise LoraFormatError(f"{source}: unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    if layout is None and metadata.get("safetydpo_unet_layout"):
        layout = unet_keys.layout_from_json(metadata["safetydpo_unet_layout"])
    if layout is None and architecture in unet_keys.LAYOUTS:
        layout = unet_keys.LAYOUTS[architecture]
    return architecture, layout


@dataclasses.dataclass
class _KeyParts:
    """A file's tensors sorted by canonical module and role, and one file key per module for messages."""

    downs: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    ups: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    alphas: Dict[str, float] = dataclasses.field(default_factory=dict)
    diffs: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    key_of: Dict[str, str] = dataclasses.field(default_factory=dict)
    peft_modules: set = dataclasses.field(default_factory=set)
    adapters: set = dataclasses.field(default_factory=set)

    def add(self, module: str, role: lora_formats.KeyRole, tensor: torch.Tensor, key: str, source: str) -> None:
        if role.role == lora_formats.ALPHA:
            self.alphas[module] = float(tensor.reshape(-1)[0])
            self.key_of.setdefault(module, key)
            return
        target = {lora_formats.DOWN: self.downs, lora_formats.UP: self.ups, lora_formats.DIFF: self.diffs}[role.role]
        if module in target:
            raise LoraFormatError(
                f"{source}: module {module!r} appears twice ({self.key_of.get(module)!r} and {key!r}); "
                "the file mixes two spellings of one module")
        target[module] = tensor
        self.key_of.setdefault(module, key)
        if role.peft:
            self.peft_modules.add(module)
        if role.adapter:
            self.adapters.add(role.adapter)


_FATAL_KEY_ERRORS = ("do not support", "need the UNet layout", "appears twice", "must be one number")


def _read_keys(state_dict: Dict[str, torch.Tensor], namer: lora_formats.ModuleNamer, source: str) -> _KeyParts:
    """Every key through ``lora_formats.key_role`` and the namer; unknown keys are collected and refused at once."""
    parts = _KeyParts()
    unknown = []
    for key, tensor in state_dict.items():
        if not torch.is_tensor(tensor):
            raise LoraFormatError(f"{source}: {key!r} is not a tensor")
        tensor = tensor.detach().to(device="cpu", dtype=torch.float32).clone()
        try:
            role = lora_formats.key_role(key)
        except LoraFormatError as error:
            raise LoraFormatError(f"{source}: {error}") from None
        if role is None:
            unknown.append(key)
            continue
        try:
            if role.role == lora_formats.ALPHA and tensor.numel() != 1:
                raise LoraFormatError(f"{source}: {key!r} must be one number, has shape {tuple(tensor.shape)}")
            parts.add(namer(role.module), role, tensor, key, source)
        except LoraFormatError as error:
            text = str(error)
            if "does not exist in a UNet of layout" in text:
                raise LoraFormatError(
                    f"{source}: key {key!r}: {text}; the file was made for a UNet with other blocks "
                    "(pass the right architecture= or layout=)") from None
            if any(marker in text for marker in _FATAL_KEY_ERRORS):
                raise
            unknown.append(key)
    if unknown:
        raise LoraFormatError(
            f"{source}: {len(unknown)} key(s) are not LoRA keys this pack can read, e.g. {unknown[:3]}. "
            "Supported: kohya (lora_unet_*/lora_te*_ .lora_up/.lora_down/.alpha), ComfyUI native "
            "(diffusion_model.*), PEFT/diffusers (lora_A/lora_B) and .diff")
    if len(parts.adapters) > 1:
        raise LoraFormatError(
            f"{source}: the file holds several PEFT adapters ({sorted(parts.adapters)}); save one adapter per file")
    missing_pair = sorted(set(parts.downs) ^ set(parts.ups))
    if missing_pair:
        raise LoraFormatError(
            f"{source}: module {missing_pair[0]!r} (key {parts.key_of[missing_pair[0]]!r}) has only one of its "
            "up/down matrices")
    return parts


def _lora_modules(parts: _KeyParts, peft_alpha: "_PeftAlpha", source: str) -> Dict[str, LoraModule]:
    """Checked ``LoraModule``s (shapes, finite values, rank ≥ 1) with their alpha: the file's, the PEFT
    config's, or rank (scale 1, as ComfyUI does) with a warning."""
    modules: Dict[str, LoraModule] = {}
    for module in sorted(parts.downs):
        down, up = parts.downs[module], parts.ups[module]
        where = f"module {module!r} (key {parts.key_of[module]!r})"
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{source}: {where} has mismatched LoRA shapes up {tuple(up.shape)} / down "
                f"{tuple(down.shape)}: the rank (up dim 1, down dim 0) must agree")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoraFormatError(f"{source}: {where}: the up matrix of a conv LoRA must be 1×1")
        for label, tensor in (("down", down), ("up", up)):
            if not torch.isfinite(tensor).all():
                raise LoraFormatError(f"{source}: {where} has NaN/Inf values in its {label} matrix")
        rank = down.shape[0]
        if rank == 0:
            raise LoraFormatError(f"{source}: {where} has rank 0 (empty LoRA matrices); "
                                  "remove the module or re-export the file")
        if module in parts.alphas:
            alpha = parts.alphas[module]
        elif module in parts.peft_modules:
            alpha = peft_alpha(module, rank)
        else:
            alpha = float(rank)
            log.warning("%s: module %s has no alpha; using alpha = rank (scale 1) as ComfyUI does", source, module)
        if not math.isfinite(alpha):
            raise LoraFormatError(f"{source}: {where} has a non-finite alpha")
        modules[module] = LoraModule(down=down, up=up, alpha=alpha)
    return modules


def _categories(metadata: Dict[str, str]) -> list:
    """``safetydpo_categories``: a JSON list, or (older files) comma-separated names."""
    if not metadata.get("safetydpo_categories"):
        return []
    try:
        return [str(c) for c in json.loads(metadata["safetydpo_categories"])]
    except (json.JSONDecodeError, TypeError):
        return [c.strip() for c in metadata["safetydpo_categories"].split(",") if c.strip()]


class _PeftAlpha:
    """alpha of PEFT-keyed modules, from diffusers' metadata, an adapter_config.json, or rank.

    peft's scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with
    ``alpha_pattern`` / ``rank_pattern`` matched as peft matches them (a suffix of the module path).
    The returned alpha gives the same scale through ``alpha / rank``.
    """

    def __init__(self, metadata: Dict[str, str], adapter_config: Optional[dict], source: str):
        self.source = source
        self.configs: Dict[str, dict] = {}
        raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
        if raw:
            try:
                packed = json.loads(raw)
            except json.JSONDecodeError as error:
                raise LoraFormatError(
                    f"{source}: metadata {LORA_ADAPTER_METADATA_KEY!r} is not JSON ({error})") from None
            if not isinstance(packed, dict):
                raise LoraFormatError(f"{source}: metadata {LORA_ADAPTER_METADATA_KEY!r} must be a JSON object "
                                      f"(a peft LoraConfig), not {type(packed).__name__}")
            for key, value in packed.items():
                part, dot, field = key.partition(".")
                if dot and part in _PARTS:  # diffusers pipelines: "unet.lora_alpha", "text_encoder.r" …
                    self.configs.setdefault(part, {})[field] = value
                else:  # model-level save_lora_adapter: unprefixed LoraConfig
                    self.configs.setdefault("*", {})[key] = value
        if adapter_config is not None and not isinstance(adapter_config, dict):
            raise LoraFormatError(f"{source}: adapter_config.json must hold a JSON object (a peft LoraConfig)")
        if adapter_config is not None and "*" not in self.configs:
            self.configs["*"] = adapter_config
        self.warned = False

    def __call__(self, module: str, rank: int) -> float:
        try:
            return self._alpha(module, rank)
        except (TypeError, ValueError, AttributeError) as error:
            raise LoraFormatError(
                f"{self.source}: the PEFT config (adapter_config.json / {LORA_ADAPTER_METADATA_KEY}) has a value "
                f"of the wrong type for module {module!r} ({error}); r, lora_alpha and the patterns must be "
                "numbers and mappings as peft writes them") from None

    def _alpha(self, module: str, rank: int) -> float:
        if not isinstance(self.configs, dict) or not all(isinstance(c, dict) for c in self.configs.values()):
            raise TypeError("the config is not a JSON object")
        part, _, path = module.partition(".")
        config = self.configs.get(part) or self.configs.get("*")
        if not config:
            if not self.warned:
                log.warning("%s: PEFT-format LoRA without alpha (no %s metadata, no adapter_config.json beside "
                            "the file); using alpha = rank (scale 1)", self.source, LORA_ADAPTER_METADATA_KEY)
                self.warned = True
            return float(rank)
        from peft.utils.other import get_pattern_key

        candidates = [path]
        if part != "unet" and path.startswith("text_model."):
            candidates.append(path[len("text_model."):])  # transformers 5 CLIPTextModel paths

        def pattern_value(field: str):
            patterns = config.get(field) or {}
            for candidate in candidates:
                key = get_pattern_key(list(patterns), candidate)
                if key in patterns:
                    return patterns[key]
            return None

        expected_rank = pattern_value("rank_pattern")
        expected_rank = config.get("r") if expected_rank is None else expected_rank
        if expected_rank is not None and int(expected_rank) != rank:
            raise LoraFormatError(
                f"{self.source}: module {module!r} has rank {rank} but its PEFT config says r = {expected_rank}; "
                "the adapter_config.json / metadata belongs to another adapter")
        alpha = pattern_value("alpha_pattern")
        alpha = float(config.get("lora_alpha", rank) if alpha is None else alpha)
        if config.get("use_rslora"):
            return alpha * math.sqrt(rank)  # scale alpha / sqrt(r) = (alpha · sqrt(r)) / r
        return alpha


# -- architecture ------------------------------------------------------------------------------

_TEXT_WIDTH_TO_ARCHITECTURE = {768: "sd15", 1024: "sd21"}


def detect_architecture(source) -> str:
    """sd15 / sd21 / sdxl from key names and layer widths; ``unknown`` otherwise.

    SDXL: ``add_embedding``/``label_emb``, a second text encoder (``lora_te1_``/``lora_te2_``) or a
    2048-wide cross-attention context. Otherwise the context width of ``attn2.to_k``/``to_v``
    (768 → sd15, 1024 → sd21), else the text encoder's width (CLIP-L 768, OpenCLIP-H 1024).
    ``demo`` is never guessed: it is recorded in our metadata.
    """
    if isinstance(source, SafetyExpert):
        inputs = {name: module.down for name, module in source.modules.items()}
        inputs.update(source.diffs)
    else:
        # Matrices whose last dimension is the layer's input width.
        inputs = {k: v for k, v in source.items()
                  if k.endswith(("lora_down.weight", "lora_A.weight", "down.weight", ".diff"))
                  or re.search(r"lora_A\.[^.]+\.weight$", k)}
    names = " ".join(inputs)
    if any(marker in names for marker in ("lora_te1_", "lora_te2_", "text_encoder_2", "add_embedding", "label_emb")):
        return "sdxl"
    for key, tensor in inputs.items():
        if "attn2" in key and ("to_k" in key or "to_v" in key) and tensor.dim() >= 2:
            width = int(tensor.shape[-1])
            if width in unet_keys.CONTEXT_WIDTH_TO_ARCHITECTURE:
                return unet_keys.CONTEXT_WIDTH_TO_ARCHITECTURE[width]
    for key, tensor in inputs.items():
        if ("lora_te_" in key or "text_encoder" in key or "text_model" in key) and "self_attn" in key \
                and tensor.dim() == 2:
            width = int(tensor.shape[-1])
            if width in _TEXT_WIDTH_TO_ARCHITECTURE:
                return _TEXT_WIDTH_TO_ARCHITECTURE[width]
    return "unknown"


def check_compatible(expert: SafetyExpert, architecture: str, source: str = "") -> None:
    """Raise ArchitectureMismatchError when the expert was made for another architecture.

    ``unknown`` on either side passes (nothing to compare); shape checks against the model are the
    caller's second line of defence.
    """
    if expert.architecture == "unknown" or architecture == "unknown":
        return
    if expert.architecture != architecture:
        where = f"{source}: " if source else ""
        raise ArchitectureMismatchError(
            f"{where}expert {expert.name!r} is for {expert.architecture}, but the model is {architecture}. "
            f"Use an expert trained on a {architecture} checkpoint.")


# -- writing -----------------------------------------------------------------------------------

def expert_to_state_dict(expert: SafetyExpert, key_format: str = "kohya",
                         layout: Optional[unet_keys.UNetLayout] = None,
                         dtype: torch.dtype = torch.float32) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata for ``expert`` in ``key_format`` ("kohya", "native" or "peft")."""
    if key_format not in KEY_FORMATS:
        raise LoraFormatError(f"unknown key format {key_format!r}; use one of {', '.join(KEY_FORMATS)}")
    if key_format == "native" and layout is None:
        layout = unet_keys.layout_for(expert.architecture)
    if key_format == "peft" and expert.diffs:
        raise LoraFormatError(
            f"expert {expert.name!r} has full weight differences, which PEFT files cannot hold; "
            "save it with key_format='kohya' or 'native'")

    def key_for(module: str) -> str:
        if key_format == "native" and module.startswith("unet."):
            return unet_keys.canonical_to_native(module, layout)
        if key_format == "peft":
            part, _, path = module.partition(".")
            if part not in _PARTS:
                raise LoraFormatError(f"not a canonical module name: {module!r}")
            return module if part == "unet" else f"{part}.{unet_keys.normalize_text_encoder_path(path)}"
        return unet_keys.canonical_to_kohya(module, expert.architecture)

    tensors: Dict[str, torch.Tensor] = {}
    for module, lora in expert.modules.items():
        key = key_for(module)
        if key_format == "peft":
            tensors[f"{key}.lora_A.weight"] = lora.down.detach().to("cpu", dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = lora.up.detach().to("cpu", dtype).contiguous()
            continue
        tensors[f"{key}.lora_down.weight"] = lora.down.detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = lora.up.detach().to("cpu", dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(lora.alpha), dtype=torch.float32)
    for module, diff in expert.diffs.items():
        tensors[f"{key_for(module)}.diff"] = diff.detach().to("cpu", dtype).contiguous()
    if len(tensors) != (2 if key_format == "peft" else 3) * len(expert.modules) + len(expert.diffs):
        raise LoraFormatError(f"expert {expert.name!r}: two modules map to one {key_format} key")

    metadata = {k: str(v) for k, v in expert.metadata.items()}
    rank = expert.rank
    if key_format == "peft":
        metadata = {k: v for k, v in metadata.items() if not k.startswith("ss_")}
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(_peft_metadata(expert), sort_keys=True)
    else:
        metadata.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank if rank is not None else 0),
            "ss_network_alpha": str(expert.alpha if expert.alpha is not None else (rank or 0)),
        })
        if expert.architecture in SS_BASE_MODEL_VERSION:
            metadata["ss_base_model_version"] = SS_BASE_MODEL_VERSION[expert.architecture]
    metadata.update({
        "safetydpo_name": expert.name,
        "safetydpo_categories": json.dumps(list(expert.categories)),
        "safetydpo_architecture": expert.architecture,
        "safetydpo_format_version": "1",
    })
    metadata.pop("safetydpo_unet_layout", None)
    if layout is not None and layout != unet_keys.LAYOUTS.get(expert.architecture):
        metadata["safetydpo_unet_layout"] = unet_keys.layout_to_json(layout)
    return tensors, metadata


def _peft_metadata(expert: SafetyExpert) -> dict:
    """diffusers' packed LoraConfig per model part (``unet.r``, ``unet.lora_alpha`` …).

    The most common rank and alpha become ``r`` / ``lora_alpha``; other modules get exact-path
    entries in ``rank_pattern`` / ``alpha_pattern``; ``target_modules`` lists exact paths so that
    diffusers' ``load_lora_weights`` adds adapters to these modules only.
    """
    packed: dict = {}
    for part in _PARTS:
        members = {m[len(part) + 1:]: lora for m, lora in expert.modules.items() if m.partition(".")[0] == part}
        if not members:
            continue
        r = Counter(lora.rank for lora in members.values()).most_common(1)[0][0]
        alpha = Counter(float(lora.alpha) for lora in members.values()).most_common(1)[0][0]
        packed[f"{part}.r"] = r
        packed[f"{part}.lora_alpha"] = alpha
        packed[f"{part}.target_modules"] = sorted(members)
        packed[f"{part}.rank_pattern"] = {re.escape(p): lora.rank for p, lora in members.items() if lora.rank != r}
        packed[f"{part}.alpha_pattern"] = {re.escape(p): float(lora.alpha) for p, lora in members.items()
                                           if float(lora.alpha) != alpha}
    return packed


def with_uniform_alpha(expert: SafetyExpert) -> SafetyExpert:
    """The same expert with one alpha for every module (the most common one), ΔW unchanged.

    Each module's ``up`` is rescaled by ``alpha_m / alpha`` so that ``(alpha / rank) · up @ down`` stays
    the same (to float32 rounding). Why: diffusers (0.42) ``load_lora_weights`` reads a kohya file's
    per-module alphas into an ``alpha_pattern`` that never matches its modules, so every module gets
    the most common alpha; with one alpha in the file, diffusers, ComfyUI and A1111/Forge agree.
    An expert whose modules already share one alpha is returned as it is.
    """
    alphas = Counter(float(m.alpha) for m in expert.modules.values())
    if len(alphas) <= 1:
        return expert
    common = alphas.most_common(1)[0][0]
    if common == 0:
        common = next(a for a, _ in alphas.most_common() if a != 0)
    modules = {}
    for name, module in expert.modules.items():
        if float(module.alpha) == common:
            modules[name] = module
        else:
            modules[name] = LoraModule(down=module.down, up=module.up * (float(module.alpha) / common), alpha=common)
    return SafetyExpert(expert.name, modules, dict(expert.diffs), expert.architecture, list(expert.categories),
                        dict(expert.metadata))


def save_expert(expert: SafetyExpert, path, key_format: str = "kohya",
                layout: Optional[unet_keys.UNetLayout] = None, dtype: torch.dtype = torch.float32,
                uniform_alpha: bool = False) -> Path:
    """Write ``expert`` atomically (temp file + rename): a crash never leaves a half-written file.

    ``layout`` matters for ``native`` keys of a UNet that is not a preset; it is recorded in the
    metadata so that the file reads back without it. ``uniform_alpha``: write one alpha for every
    module (``with_uniform_alpha``), so that diffusers reads the file to the same ΔW as ComfyUI.
    """
    if uniform_alpha:
        expert = with_uniform_alpha(expert)
    tensors, metadata = expert_to_state_dict(expert, key_format, layout, dtype)
    return files.save_safetensors(path, tensors, metadata, error=LoraFormatError, what="expert")


def save_peft_folder(expert: SafetyExpert, folder, part: str = "unet") -> Path:
    """Write one model part of ``expert`` as a PEFT adapter folder (what ``PeftModel.from_pretrained`` and
    ``save_pretrained`` use): ``adapter_model.safetensors`` with ``base_model.model.<path>.lora_A/B`` keys and
    ``adapter_config.json`` with ``r``/``lora_alpha`` and exact-path ``rank_pattern``/``alpha_pattern``, so
    every module keeps its own rank and scale. Each file is written atomically.
    """
    if part not in _PARTS:
        raise LoraFormatError(f"part must be one of {', '.join(_PARTS)}, not {part!r}")
    if expert.diffs:
        raise LoraFormatError(f"expert {expert.name!r} has full weight differences, which PEFT adapters cannot hold; "
                              "save it with save_expert (kohya keys) instead")
    members = {m[len(part) + 1:]: lora for m, lora in expert.modules.items() if m.partition(".")[0] == part}
    if not members:
        raise LoraFormatError(f"expert {expert.name!r} has no {part} modules to write as a PEFT adapter")
    packed = {k[len(part) + 1:]: v for k, v in _peft_metadata(
        SafetyExpert(expert.name, {f"{part}.{p}": m for p, m in members.items()}, architecture=expert.architecture)
    ).items()}
    config = {"peft_type": "LORA", "task_type": None, "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": None,
              **packed}
    tensors = {}
    for path, lora in members.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = lora.down.detach().to("cpu", torch.float32).contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = lora.up.detach().to("cpu", torch.float32).contiguous()
    folder = Path(folder)
    metadata = {"safetydpo_name": expert.name, "safetydpo_categories": json.dumps(list(expert.categories)),
                "safetydpo_architecture": expert.architecture, "safetydpo_format_version": "1", "format": "pt"}
    files.save_safetensors(folder / "adapter_model.safetensors", tensors, metadata, error=LoraFormatError,
                           what="PEFT adapter")
    files.write_text(folder / "adapter_config.json", json.dumps(config, indent=2), error=LoraFormatError,
                     what="PEFT adapter config")
    return folder
