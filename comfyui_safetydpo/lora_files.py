"""Safety-expert LoRA files: read kohya, ComfyUI native and PEFT/diffusers; write kohya (default).

Public API:
- ``load_expert(path, name=None, architecture=None, layout=None) -> SafetyExpert``
- ``expert_from_state_dict(state_dict, metadata=None, name=..., source=..., ...) -> SafetyExpert``
- ``save_expert(expert, path, key_format="kohya"|"native", layout=None)`` (atomic)
- ``expert_to_state_dict(expert, key_format, layout) -> (tensors, metadata)``
- ``detect_architecture(state_dict_or_expert)`` and ``check_compatible(expert, architecture)``

Why kohya by default: it is the one format ComfyUI, A1111/Forge and diffusers all load. We always
write an explicit ``.alpha`` per module, because a missing alpha means scale 1 in ComfyUI and some
diffusers helpers silently write alpha = rank (DESIGN.md: trained ΔW came out at half size).
Only safetensors are read; a pickle is refused with a message, never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from . import unet_keys
from .errors import ArchitectureMismatchError, LoraFormatError
from .expert import ARCHITECTURES, LoraModule, SafetyExpert

log = logging.getLogger(__name__)

SS_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd21": "sd_2.1", "sdxl": "sdxl_base_v1-0", "demo": "safetydpo_demo"}
_SS_TO_ARCHITECTURE = {"sd_v1": "sd15", "sd_2.0": "sd21", "sd_2.1": "sd21", "sdxl_base_v1-0": "sdxl"}

_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")

_PEFT_SUFFIX = re.compile(r"^(?P<module>.+?)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_PROCESSOR_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>up|down)\.weight$"
)


# -- reading -----------------------------------------------------------------------------------

def read_safetensors(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a safetensors file, with clear errors for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise LoraFormatError(f"{path}: the file is empty")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(_PICKLE_MAGIC):
        raise LoraFormatError(
            f"{path}: this is a pickle (.ckpt/.pt/.bin) file, which can run code when loaded and is never "
            "opened here. Convert it to .safetensors with a trusted tool and use that file."
        )
    if size < 8 or int.from_bytes(head, "little") > size - 8:
        raise LoraFormatError(f"{path}: not a safetensors file or truncated (header longer than the file)")
    try:
        tensors = {}
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise LoraFormatError(f"{path}: corrupt or truncated safetensors file ({error})") from None
    if not tensors:
        raise LoraFormatError(f"{path}: the file holds no tensors")
    return tensors, metadata


def load_expert(path, name: Optional[str] = None, architecture: Optional[str] = None,
                layout: Optional[unet_keys.UNetLayout] = None) -> SafetyExpert:
    """Read a LoRA file in any supported format as a ``SafetyExpert``."""
    path = Path(path)
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
            return json.loads(candidate.read_text())
        except json.JSONDecodeError as error:
            raise LoraFormatError(f"{candidate}: not valid JSON ({error})") from None
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
    """Build an expert from LoRA tensors in kohya, native, PEFT/diffusers or ``.diff`` form."""
    metadata = dict(metadata or {})
    if architecture is None:
        architecture = metadata.get("safetydpo_architecture") or _SS_TO_ARCHITECTURE.get(
            metadata.get("ss_base_model_version", "")) or detect_architecture(state_dict)
    if architecture not in ARCHITECTURES:
        raise LoraFormatError(f"{source}: unknown architecture {architecture!r}")
    if layout is None and metadata.get("safetydpo_unet_layout"):
        layout = unet_keys.UNetLayout(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in json.loads(metadata["safetydpo_unet_layout"]).items()})
    if layout is None and architecture in unet_keys.LAYOUTS:
        layout = unet_keys.LAYOUTS[architecture]

    downs: Dict[str, torch.Tensor] = {}
    ups: Dict[str, torch.Tensor] = {}
    alphas: Dict[str, float] = {}
    diffs: Dict[str, torch.Tensor] = {}
    unknown = []
    peft_modules = set()

    def canonical(module_key: str) -> str:
        if module_key.startswith("lora_"):
            return unet_keys.kohya_to_canonical(module_key, layout)
        if module_key.startswith("diffusion_model."):
            if layout is None:
                raise LoraFormatError(
                    f"{source}: ComfyUI native keys need the UNet layout; pass architecture= or layout=")
            return unet_keys.native_to_canonical(module_key, layout)
        for prefix in ("base_model.model.unet.", "base_model.model.", "unet.unet.", "unet.", "model."):
            if module_key.startswith(prefix):
                module_key = module_key[len(prefix):]
                break
        if module_key.startswith(("text_encoder.", "text_encoder_2.")):
            return module_key
        if module_key.startswith("text_model."):
            return "text_encoder." + module_key
        if unet_keys.is_ldm_path(module_key):
            if layout is None:
                raise LoraFormatError(f"{source}: LDM-named keys need the UNet layout; pass architecture=")
            return "unet." + unet_keys.ldm_to_diffusers(module_key, layout)
        return "unet." + module_key

    for key, tensor in state_dict.items():
        if not torch.is_tensor(tensor):
            raise LoraFormatError(f"{source}: {key!r} is not a tensor")
        try:
            if key.endswith(".lora_down.weight"):
                downs[canonical(key[: -len(".lora_down.weight")])] = tensor
            elif key.endswith(".lora_up.weight"):
                ups[canonical(key[: -len(".lora_up.weight")])] = tensor
            elif key.endswith(".alpha"):
                alphas[canonical(key[: -len(".alpha")])] = float(tensor.float().reshape(-1)[0])
            elif key.endswith(".diff"):
                diffs[canonical(key[: -len(".diff")])] = tensor.float()
            elif (m := _PROCESSOR_SUFFIX.match(key)):
                proj = "to_out.0" if m.group("proj") == "to_out" else m.group("proj")
                target = canonical(f"{m.group('module')}.{proj}")
                (downs if m.group("which") == "down" else ups)[target] = tensor
                peft_modules.add(target)
            elif (m := _PEFT_SUFFIX.match(key)):
                target = canonical(m.group("module"))
                (downs if m.group("which") == "A" else ups)[target] = tensor
                peft_modules.add(target)
            elif key.endswith((".dora_scale", ".diff_b", ".lora_mid.weight")):
                raise LoraFormatError(
                    f"{source}: {key!r} is a DoRA/LoCon/bias variant, which safety experts do not support")
            else:
                unknown.append(key)
        except LoraFormatError as error:
            if "does not support" in str(error) or "need" in str(error):
                raise
            unknown.append(key)
    if unknown:
        raise LoraFormatError(
            f"{source}: {len(unknown)} key(s) are not LoRA keys this pack can read, e.g. {unknown[:3]}. "
            "Supported: kohya (lora_unet_*/lora_te*_ .lora_up/.lora_down/.alpha), ComfyUI native "
            "(diffusion_model.*), PEFT/diffusers (lora_A/lora_B) and .diff")

    missing_pair = sorted(set(downs) ^ set(ups))
    if missing_pair:
        raise LoraFormatError(f"{source}: module {missing_pair[0]!r} has only one of its up/down matrices")

    peft_alpha = _peft_alpha_lookup(metadata, adapter_config)
    modules: Dict[str, LoraModule] = {}
    for module in sorted(downs):
        down, up = downs[module].float(), ups[module].float()
        if down.dim() not in (2, 4) or up.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{source}: module {module!r} has mismatched LoRA shapes up {tuple(up.shape)} / down "
                f"{tuple(down.shape)} (rank must agree)")
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise LoraFormatError(f"{source}: module {module!r}: up matrix must be 1×1 for a conv LoRA")
        for label, tensor in (("down", down), ("up", up)):
            if not torch.isfinite(tensor).all():
                raise LoraFormatError(f"{source}: module {module!r} has NaN/Inf values in its {label} matrix")
        rank = down.shape[0]
        if module in alphas:
            alpha = alphas[module]
        elif module in peft_modules:
            alpha = peft_alpha(module, rank)
        else:
            alpha = float(rank)
            log.warning("%s: module %s has no alpha; using alpha = rank (scale 1) as ComfyUI does", source, module)
        if not (alpha == alpha) or alpha in (float("inf"), float("-inf")):
            raise LoraFormatError(f"{source}: module {module!r} has a non-finite alpha")
        modules[module] = LoraModule(down=down, up=up, alpha=alpha)
    for module, diff in diffs.items():
        if not torch.isfinite(diff).all():
            raise LoraFormatError(f"{source}: module {module!r} has NaN/Inf values in its diff")
    stray_alpha = sorted(set(alphas) - set(modules))
    if stray_alpha:
        raise LoraFormatError(f"{source}: alpha without LoRA matrices for module {stray_alpha[0]!r}")
    if not modules and not diffs:
        raise LoraFormatError(f"{source}: no LoRA modules found")

    categories = []
    if metadata.get("safetydpo_categories"):
        try:
            categories = list(json.loads(metadata["safetydpo_categories"]))
        except json.JSONDecodeError:
            categories = [c.strip() for c in metadata["safetydpo_categories"].split(",") if c.strip()]
    own = {k: v for k, v in metadata.items() if k.startswith("safetydpo_") or k.startswith("ss_")}
    return SafetyExpert(name=name, modules=modules, diffs=diffs, architecture=architecture,
                        categories=categories, metadata=own)


def _peft_alpha_lookup(metadata: Dict[str, str], adapter_config: Optional[dict]):
    """alpha for PEFT modules: adapter_config.json beside the file, or diffusers' metadata, else rank."""
    config = adapter_config
    if config is None and metadata.get("lora_adapter_metadata"):
        try:
            raw = json.loads(metadata["lora_adapter_metadata"])
            config = raw.get("unet", raw) if isinstance(raw, dict) else None
        except json.JSONDecodeError:
            config = None
    if config is None and "lora_alpha" in metadata:
        config = {"lora_alpha": float(metadata["lora_alpha"]), "r": int(metadata.get("r", 0) or 0)}

    def lookup(module: str, rank: int) -> float:
        if not config:
            log.warning("PEFT-format module %s has no alpha (no adapter_config.json beside the file); "
                        "using alpha = rank", module)
            return float(rank)
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.search(pattern, module):
                return float(value)
        return float(config.get("lora_alpha", rank))

    return lookup


# -- architecture ------------------------------------------------------------------------------

def detect_architecture(source) -> str:
    """sd15 / sd21 / sdxl from key names and cross-attention widths; ``unknown`` otherwise."""
    if isinstance(source, SafetyExpert):
        inputs = {name: module.down for name, module in source.modules.items()}
        inputs.update(source.diffs)
    else:
        # Matrices whose last dimension is the layer's input width.
        inputs = {k: v for k, v in source.items()
                  if k.endswith(("lora_down.weight", "lora_A.weight", "down.weight", ".diff"))
                  or re.search(r"lora_A\.[^.]+\.weight$", k)}
    names = " ".join(inputs)
    if any(marker in names for marker in ("lora_te2_", "text_encoder_2", "add_embedding", "label_emb")):
        return "sdxl"
    for key, tensor in inputs.items():
        if "attn2" in key and ("to_k" in key or "to_v" in key) and tensor.dim() >= 2:
            width = int(tensor.shape[-1])
            if width in unet_keys.CONTEXT_WIDTH_TO_ARCHITECTURE:
                return unet_keys.CONTEXT_WIDTH_TO_ARCHITECTURE[width]
    return "unknown"


def check_compatible(expert: SafetyExpert, architecture: str, source: str = "") -> None:
    """Raise ArchitectureMismatchError when the expert was made for another architecture."""
    if expert.architecture in ("unknown",) or architecture in ("unknown",):
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
    """Tensors and metadata for ``expert`` in ``key_format`` ("kohya" or "native")."""
    if key_format not in ("kohya", "native"):
        raise LoraFormatError(f"unknown key format {key_format!r}; use 'kohya' or 'native'")
    if key_format == "native" and layout is None:
        layout = unet_keys.layout_for(expert.architecture)

    def key_for(module: str) -> str:
        if key_format == "native" and module.startswith("unet."):
            return unet_keys.canonical_to_native(module, layout)
        return unet_keys.canonical_to_kohya(module, expert.architecture)

    tensors: Dict[str, torch.Tensor] = {}
    for module, lora in expert.modules.items():
        key = key_for(module)
        tensors[f"{key}.lora_down.weight"] = lora.down.detach().to(dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = lora.up.detach().to(dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(lora.alpha), dtype=torch.float32)
    for module, diff in expert.diffs.items():
        tensors[f"{key_for(module)}.diff"] = diff.detach().to(dtype).contiguous()

    metadata = {k: str(v) for k, v in expert.metadata.items()}
    rank = expert.rank
    metadata.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank if rank is not None else 0),
        "ss_network_alpha": str(expert.alpha if expert.alpha is not None else (rank or 0)),
        "safetydpo_name": expert.name,
        "safetydpo_categories": json.dumps(list(expert.categories)),
        "safetydpo_architecture": expert.architecture,
        "safetydpo_format_version": "1",
    })
    if expert.architecture in SS_BASE_MODEL_VERSION:
        metadata["ss_base_model_version"] = SS_BASE_MODEL_VERSION[expert.architecture]
    if layout is not None and layout != unet_keys.LAYOUTS.get(expert.architecture):
        metadata["safetydpo_unet_layout"] = json.dumps(
            {"levels": layout.levels, "res_blocks": layout.res_blocks, "down_attention": list(layout.down_attention),
             "up_attention": list(layout.up_attention), "mid_attention": layout.mid_attention})
    return tensors, metadata


def save_expert(expert: SafetyExpert, path, key_format: str = "kohya",
                layout: Optional[unet_keys.UNetLayout] = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``expert`` atomically (temp file + rename): a crash never leaves a half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, metadata = expert_to_state_dict(expert, key_format, layout, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=metadata)
        os.replace(temp, path)
    except OSError as error:
        Path(temp).unlink(missing_ok=True)
        raise LoraFormatError(f"{path}: could not write the expert ({error.strerror or error}); "
                              "free disk space or choose another folder") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
