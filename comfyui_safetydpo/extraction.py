"""Extract a safety expert from a safety-aligned model and the base it was fine-tuned from.

The SafetyDPO authors released their aligned models fused into full UNets, not as LoRAs. The
difference ``ΔW = W_safe − W_base`` of the layers that were trained *is* the expert: written exactly
(full ``.diff`` weights) or as a LoRA from a truncated SVD at a fixed rank or at the smallest rank that
keeps a chosen share of ΔW's energy (Σ kept σ² / Σ σ²). Applied to any other fine-tune of the same base
it adds the same safety change (kohya's extract-LoRA-from-models and ComfyUI's model-subtract + LoRA
save do the same without categories or reports).

Weights come from any mix of key layouts, all turned into canonical parameter names
(``unet.<diffusers path>.weight``, ``text_encoder.text_model.….weight``):

- single-file checkpoints (``model.diffusion_model.<LDM path>``, CLIP-L under ``cond_stage_model.transformer.``
  or ``conditioner.embedders.0.transformer.``), UNet-only LDM files (``diffusion_model.`` or bare
  ``input_blocks.…``), UNet-only diffusers files (``down_blocks.…``);
- diffusers folders (``unet/diffusion_pytorch_model[.fp16].safetensors``, sharded or not, and
  ``text_encoder/``), or a bare ``unet`` folder;
- in-memory state dicts (the ComfyUI node hands over the MODEL's weights in LDM names).

Only safetensors are read (a pickle is refused). Files are read lazily, one tensor at a time.

Every parameter is compared, not only the requested layers: differences outside the request (other
UNet layers, biases, norms, the text encoder, the VAE) are counted and listed in the report, never
dropped silently, so a user sees when the aligned model changed more than the expert carries.

Public API: ``LAYER_PRESETS``, ``weights_from_path(path)``, ``weights_from_state_dict(state_dict)``,
``canonical_parameter_names(keys)``, ``parse_categories(text)``,
``extract_expert(safe, base, layers=..., rank=..., energy=..., ...) -> (SafetyExpert, ExtractionReport)``,
``ExtractionReport`` (per-module and overall relative errors, ranks, unrequested differences).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import unet_keys
from .errors import ArchitectureMismatchError, LoraFormatError, MissingWeightsError
from .expert import LoraModule, SafetyExpert
from .errors import DatasetError
from .pairs import CATEGORIES, normalise_category

log = logging.getLogger(__name__)

EXTRACTION_KEY = "safetydpo_extraction"
"""Metadata key of the extraction report (JSON) in an extracted expert's file."""

_ATTENTION = r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
LAYER_PRESETS: Dict[str, str] = {
    "attention": r"^unet\..*" + _ATTENTION,
    "cross_attention": r"^unet\..*\.attn2\.(to_q|to_k|to_v|to_out\.0)$",
    "cross_attention_kv": r"^unet\..*\.attn2\.(to_k|to_v)$",
    "self_attention": r"^unet\..*\.attn1\.(to_q|to_k|to_v|to_out\.0)$",
    "transformer": r"^unet\..*\.(attentions\.\d+\.(proj_in|proj_out)|transformer_blocks\.\d+\..*)$",
    "unet": r"^unet\.",
    "text_encoder": r"^text_encoder(_2)?\.",
}
"""Named layer sets. ``attention`` (to_q/to_k/to_v/to_out.0 of self- and cross-attention) is what the
official SafetyDPO LoRA trained; ``transformer`` adds proj_in/proj_out and the feed-forward layers;
``unet`` is every UNet weight (convolutions included); ``text_encoder`` the CLIP-L linear layers."""

OTHER_PREFIX = "other:"
"""Parameters without a canonical name (VAE, OpenCLIP text encoders) are compared under ``other:<key>``."""

WeightGetter = Callable[[], torch.Tensor]


@dataclasses.dataclass
class ModelWeights:
    """Lazily read parameters of one model, keyed by canonical parameter names."""

    getters: Dict[str, WeightGetter]
    source: str
    layout: str = ""

    def __len__(self) -> int:
        return len(self.getters)

    def get(self, name: str) -> torch.Tensor:
        return self.getters[name]()


@dataclasses.dataclass
class ExtractionReport:
    """What an extraction produced and how exact it is.

    ``relative_error``: ‖ΔW − ΔW_expert‖_F / ‖ΔW‖_F per module and over all modules (0 for exact
    diffs). ``relative_change``: ‖ΔW‖_F / ‖W_base‖_F over the extracted modules (a base that is not
    the aligned model's own base shows up as a large change everywhere). ``unrequested``: parameters
    outside ``layers`` that differ, with their relative change; ``unchanged``: requested modules whose
    weights are identical (left out of the expert).
    """

    mode: str
    layers: List[str]
    rank: Optional[int]
    energy: Optional[float]
    ranks: Dict[str, int]
    relative_error: Dict[str, float]
    overall_relative_error: float
    relative_change: float
    unchanged: List[str]
    unrequested: Dict[str, float]
    only_in_one_model: List[str]
    safe_source: str
    base_source: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def unrequested_groups(self) -> Dict[str, int]:
        """Counts of differing parameters outside the request, by kind (for a short summary)."""
        groups: Dict[str, int] = {}
        for name in self.unrequested:
            groups[_group_of(name)] = groups.get(_group_of(name), 0) + 1
        return dict(sorted(groups.items()))

    def summary(self) -> str:
        """A few lines for a node's text output and the command line."""
        lines = []
        if self.mode == "diff":
            lines.append(f"{len(self.relative_error)} modules as exact weight differences "
                         f"(layers {', '.join(self.layers)})")
        else:
            ranks = sorted(set(self.ranks.values()))
            how = f"rank {self.rank}" if self.rank else f"energy {self.energy:g} (ranks {ranks[0]}–{ranks[-1]})"
            worst = max(self.relative_error.items(), key=lambda item: item[1], default=("-", 0.0))
            lines.append(f"{len(self.relative_error)} modules as a LoRA at {how} (layers {', '.join(self.layers)}); "
                         f"relative error {self.overall_relative_error:.3g} overall, worst {worst[1]:.3g} ({worst[0]})")
        lines.append(f"size of the change: ‖ΔW‖/‖W_base‖ = {self.relative_change:.3g}")
        if self.unchanged:
            lines.append(f"{len(self.unchanged)} requested modules are identical in both models (left out)")
        if self.unrequested:
            groups = ", ".join(f"{kind}: {count}" for kind, count in self.unrequested_groups.items())
            largest = max(self.unrequested.items(), key=lambda item: item[1])
            lines.append(f"NOT in the expert: {len(self.unrequested)} other parameters differ ({groups}); largest "
                         f"relative change {largest[1]:.3g} ({largest[0]}). Add their layers to extract them too.")
        else:
            lines.append("no parameter outside the requested layers differs")
        if self.only_in_one_model:
            lines.append(f"{len(self.only_in_one_model)} parameters exist in one model only "
                         f"(e.g. {self.only_in_one_model[0]})")
        return "\n".join(lines)


def _group_of(name: str) -> str:
    if name.startswith(OTHER_PREFIX):
        key = name[len(OTHER_PREFIX):]
        return "vae" if key.startswith(("first_stage_model.", "vae.", "encoder.", "decoder.")) else "other"
    part = name.split(".", 1)[0]
    if part != "unet":
        return part
    module, _, field = name.rpartition(".")
    if field != "weight":
        return f"unet {field}"
    if re.search(_ATTENTION, module):
        return "unet attention"
    if "norm" in module.rsplit(".", 1)[-1]:
        return "unet norm"
    if ".transformer_blocks." in module or module.endswith(("proj_in", "proj_out")):
        return "unet transformer"
    return "unet other"


# -- reading weights in any layout ------------------------------------------------------------

_UNET_LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_CLIP_L_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")


def canonical_parameter_names(keys: Sequence[str], where: str) -> Tuple[Dict[str, str], str]:
    """{canonical parameter name: file key} for a flat key list in any supported layout."""
    keys = list(keys)
    names: Dict[str, str] = {}
    ldm = {}
    for key in keys:
        for prefix in _UNET_LDM_PREFIXES:
            if key.startswith(prefix):
                ldm[key[len(prefix):]] = key
                break
        else:
            if key.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.",
                               "label_emb.")):
                ldm[key] = key
    diffusers_unet = [k for k in keys if re.match(r"(unet\.)?(down_blocks|up_blocks|mid_block|conv_in|conv_out|"
                                                 r"conv_norm_out|time_embedding|add_embedding)\.", k)]
    layout = ""
    if ldm:
        try:
            unet_layout = unet_keys.infer_layout_from_ldm_keys(ldm)
        except ArchitectureMismatchError as error:
            raise ArchitectureMismatchError(f"{where}: {error}") from None
        layout = "ldm"
        for path, key in ldm.items():
            module, _, field = path.rpartition(".")
            try:
                names[f"unet.{unet_keys.ldm_to_diffusers(module, unet_layout)}.{field}"] = key
            except LoraFormatError:
                names[OTHER_PREFIX + key] = key
    elif diffusers_unet:
        layout = "diffusers"
        for key in diffusers_unet:
            names["unet." + (key[len("unet."):] if key.startswith("unet.") else key)] = key
    taken = set(names.values())
    for key in keys:
        if key in taken:
            continue
        for prefix in _CLIP_L_PREFIXES:
            if key.startswith(prefix):
                names["text_encoder." + unet_keys.normalize_text_encoder_path(key[len(prefix):])] = key
                break
        else:
            if key.startswith("text_encoder.") or key.startswith("text_encoder_2."):
                part, _, rest = key.partition(".")
                names[f"{part}.{unet_keys.normalize_text_encoder_path(rest)}"] = key
            else:
                names[OTHER_PREFIX + key] = key
    if not layout:
        raise ArchitectureMismatchError(
            f"{where}: no UNet weights found (looked for model.diffusion_model./diffusion_model./input_blocks. "
            "and diffusers down_blocks. keys); give an SD1.5/SD2.1/SDXL checkpoint, UNet file or diffusers folder")
    return names, layout


def weights_from_state_dict(state_dict: Dict[str, torch.Tensor], source: str = "state dict") -> ModelWeights:
    """Canonical weights of an in-memory state dict (LDM, ComfyUI or diffusers names)."""
    names, layout = canonical_parameter_names(list(state_dict), source)
    return ModelWeights({name: (lambda key=key: state_dict[key]) for name, key in names.items()}, source, layout)


def _safetensors_files(path: Path) -> List[Tuple[str, Path]]:
    """(part, file) of a model given as a file, a diffusers folder or a UNet folder (pickles refused)."""
    if path.is_file():
        if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
            raise LoraFormatError(f"{path}: pickle files (.ckpt/.pt/.bin) are never opened here (they can run code); "
                                  "convert the model to .safetensors with a trusted tool")
        return [(".", path)]
    if not path.is_dir():
        raise MissingWeightsError(f"{path}: no such model file or folder; give a .safetensors checkpoint or a "
                                  "diffusers folder (with unet/)")
    files: List[Tuple[str, Path]] = []
    for part in ("unet", "text_encoder", "text_encoder_2", "."):
        folder = path / part
        if not folder.is_dir():
            continue
        found = sorted(folder.glob("*.safetensors"))
        if part == "." and (path / "unet").is_dir():
            continue  # a diffusers pipeline folder: its parts are read above
        # One variant per part: the plain file if present, else fp16 or any other.
        plain = [f for f in found if f.name in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
        shards = [f for f in found if re.match(r"(diffusion_pytorch_model|model)-\d+-of-\d+\.safetensors$", f.name)]
        chosen = plain or shards or [f for f in found if ".fp16." in f.name][:1] or found[:1]
        files.extend((part, f) for f in chosen)
    if not files:
        bins = list(path.rglob("*.bin")) + list(path.rglob("*.ckpt"))
        hint = " (only pickle .bin/.ckpt files, which are never opened: convert them to safetensors)" if bins else ""
        raise MissingWeightsError(f"{path}: no .safetensors weights in the folder{hint}; give a diffusers folder "
                                  "with unet/diffusion_pytorch_model.safetensors or a single-file checkpoint")
    return files


def weights_from_path(path) -> ModelWeights:
    """Canonical weights of a checkpoint file, UNet file, diffusers folder or UNet folder (read lazily)."""
    from safetensors import safe_open

    from .files import safetensors_keys

    path = Path(path)
    entries = _safetensors_files(path)
    flat: Dict[str, Tuple[Path, str]] = {}
    for part, file in entries:
        for key in safetensors_keys(file, error=LoraFormatError):
            name = key if part in (".", "unet") else f"{part}.{key}"
            flat[name] = (file, key)
    names, layout = canonical_parameter_names(list(flat), str(path))
    handles: Dict[Path, object] = {}

    def getter(name: str) -> WeightGetter:
        file, key = flat[names[name]]

        def read() -> torch.Tensor:
            handle = handles.get(file)
            if handle is None:
                handle = handles[file] = safe_open(str(file), "pt")
            return handle.get_tensor(key)

        return read

    return ModelWeights({name: getter(name) for name in names}, str(path), layout)


def parse_categories(text) -> List[str]:
    """Comma-separated categories: CoProV2 names in any spelling become canonical, others stay as given."""
    categories = []
    for part in (text.split(",") if isinstance(text, str) else list(text or [])):
        part = str(part).strip()
        if not part:
            continue
        try:
            part = normalise_category(part)
        except DatasetError:
            pass  # the user's own concept name
        if part not in categories:
            categories.append(part)
    return categories


# -- extraction ---------------------------------------------------------------------------------

def layer_patterns(layers) -> List[str]:
    """Preset names, regular expressions (``re:…``) or globs over canonical module names → regexes."""
    if isinstance(layers, str):
        layers = [part.strip() for part in layers.split(",")]
    patterns = []
    for layer in layers:
        if not layer:
            continue
        if layer in LAYER_PRESETS:
            patterns.append(LAYER_PRESETS[layer])
        elif layer.startswith("re:"):
            try:
                re.compile(layer[3:])
            except re.error as error:
                raise ArchitectureMismatchError(
                    f"layers: {layer!r} is not a valid regular expression ({error})") from None
            patterns.append(layer[3:])
        else:
            patterns.append(fnmatch.translate(layer))
    if not patterns:
        raise ArchitectureMismatchError(f"no layers requested; use one of {', '.join(LAYER_PRESETS)}, a glob over "
                                        "module names (e.g. '*attn2.to_k') or 're:<regex>'")
    return patterns


def _architecture(weights: ModelWeights) -> str:
    names = weights.getters
    if any(name.startswith("unet.add_embedding.") for name in names):
        return "sdxl"
    for name in names:
        if name.startswith("unet.") and name.endswith("attn2.to_k.weight"):
            width = int(weights.get(name).shape[-1])
            return unet_keys.CONTEXT_WIDTH_TO_ARCHITECTURE.get(width, "unknown")
    return "unknown"


def _low_rank(delta: torch.Tensor, rank: Optional[int], energy: Optional[float], max_rank: int, device=None
              ) -> Tuple[LoraModule, float, float]:
    """Truncated SVD of ΔW (on ``device``, factors returned on the CPU): (LoRA with alpha = rank,
    ‖residual‖_F, ‖ΔW‖_F)."""
    shape = delta.shape
    matrix = delta.reshape(shape[0], -1)
    if device is not None:
        matrix = matrix.to(device)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energies = s.double().pow(2)
    total = float(energies.sum())
    if rank:
        r = min(int(rank), s.shape[0])
    else:
        cumulative = torch.cumsum(energies, 0) / total if total > 0 else torch.ones_like(energies)
        r = int(torch.searchsorted(cumulative, torch.tensor(float(energy), dtype=cumulative.dtype)).item()) + 1
        r = max(1, min(r, max_rank, s.shape[0]))
    root = s[:r].sqrt()
    up = (u[:, :r] * root).cpu().contiguous()
    down = (root.unsqueeze(1) * vh[:r]).cpu().contiguous()
    residual = math.sqrt(max(float(energies[r:].sum()), 0.0))
    if len(shape) == 4:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, 1, 1)
    return LoraModule(down=down, up=up, alpha=float(r)), residual, math.sqrt(total)


def extract_expert(
    safe: ModelWeights,
    base: ModelWeights,
    layers="attention",
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    max_rank: int = 128,
    name: str = "extracted_safety",
    categories: Optional[Sequence[str]] = None,
    architecture: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    device=None,
) -> Tuple[SafetyExpert, ExtractionReport]:
    """The expert ΔW = safe − base on the requested layers, and the report.

    ``rank`` > 0: a LoRA of that rank per module. Else ``energy`` in (0, 1]: per module the smallest rank
    keeping that share of ‖ΔW‖² (capped at ``max_rank``). Neither: exact full differences (``.diff``).
    ``categories`` defaults to the seven CoProV2 categories (what the released SafetyDPO models cover).
    Only weights of Linear/Conv layers (2-d or 4-d ``.weight``) become expert modules; every other
    differing parameter is reported. ``device``: where the SVDs run (e.g. ``cuda``; default the CPU).
    """
    if rank is not None and rank < 0:
        raise ArchitectureMismatchError(f"rank must be ≥ 0 (0 = use energy or exact diffs), got {rank}")
    if not rank and energy is not None and not (0 < float(energy) <= 1):
        raise ArchitectureMismatchError(f"energy must be in (0, 1] (share of ‖ΔW‖² kept), got {energy}")
    if max_rank < 1:
        raise ArchitectureMismatchError(f"max_rank must be ≥ 1, got {max_rank}")
    mode = "lora" if (rank or energy) else "diff"
    patterns = [re.compile(p) for p in layer_patterns(layers)]
    layer_names = [layers] if isinstance(layers, str) else list(layers)
    layer_names = [p.strip() for item in layer_names for p in str(item).split(",") if p.strip()]

    safe_architecture, base_architecture = _architecture(safe), _architecture(base)
    if "unknown" not in (safe_architecture, base_architecture) and safe_architecture != base_architecture:
        raise ArchitectureMismatchError(
            f"the aligned model ({safe.source}) is {safe_architecture} but the base ({base.source}) is "
            f"{base_architecture}: give the base model the aligned model was fine-tuned from")
    architecture = architecture or safe_architecture

    common = sorted(set(safe.getters) & set(base.getters))
    only_one = sorted(set(safe.getters) ^ set(base.getters))
    requested = [n for n in common if n.endswith(".weight") and any(p.search(n[: -len(".weight")]) for p in patterns)]
    if not any(not n.startswith(OTHER_PREFIX) for n in common):
        raise ArchitectureMismatchError(f"{safe.source} and {base.source} have no parameter in common: they are "
                                        "not the same model family")
    modules: Dict[str, LoraModule] = {}
    diffs: Dict[str, torch.Tensor] = {}
    errors: Dict[str, float] = {}
    ranks: Dict[str, int] = {}
    unchanged: List[str] = []
    unrequested: Dict[str, float] = {}
    residual_sq = delta_sq = base_sq = 0.0
    requested_set = set(requested)
    for index, parameter in enumerate(common):
        if progress is not None:
            progress(index, len(common))
        w_safe, w_base = safe.get(parameter), base.get(parameter)
        if tuple(w_safe.shape) != tuple(w_base.shape):
            raise ArchitectureMismatchError(
                f"{parameter} has shape {tuple(w_safe.shape)} in {safe.source} but {tuple(w_base.shape)} in "
                f"{base.source}: the base is not the model the aligned one was fine-tuned from")
        if not (w_safe.is_floating_point() and w_base.is_floating_point()):
            continue
        delta = w_safe.float() - w_base.float()
        delta_norm = float(delta.norm())
        if not math.isfinite(delta_norm):
            raise ArchitectureMismatchError(f"{parameter}: the weight difference has NaN/Inf values")
        module = parameter[: -len(".weight")]
        if parameter not in requested_set or delta.dim() not in (2, 4):
            if delta_norm > 0:
                base_norm = float(w_base.float().norm())
                unrequested[parameter] = delta_norm / base_norm if base_norm > 0 else float("inf")
            continue
        if delta_norm == 0:
            unchanged.append(module)
            continue
        base_sq += float(w_base.float().norm()) ** 2
        delta_sq += delta_norm ** 2
        if mode == "diff":
            diffs[module] = delta.contiguous()
            errors[module] = 0.0
            continue
        lora, residual, norm = _low_rank(delta, rank, energy, max_rank, device)
        modules[module] = lora
        ranks[module] = lora.rank
        errors[module] = residual / norm if norm > 0 else 0.0
        residual_sq += residual ** 2
    if progress is not None:
        progress(len(common), len(common))
    if not modules and not diffs:
        changed = (f"; {len(unrequested)} other parameters differ "
                   f"({', '.join(sorted({_group_of(n) for n in unrequested}))})" if unrequested else "")
        raise ArchitectureMismatchError(
            f"no requested layer ({', '.join(layer_names)}) differs between {safe.source} and {base.source}"
            f"{changed}: check that the first model is the aligned one and the second its base, or request other "
            "layers")
    report = ExtractionReport(
        mode=mode, layers=layer_names, rank=int(rank) if rank else None,
        energy=float(energy) if (mode == "lora" and not rank) else None, ranks=ranks, relative_error=errors,
        overall_relative_error=math.sqrt(residual_sq / delta_sq) if delta_sq > 0 else 0.0,
        relative_change=math.sqrt(delta_sq / base_sq) if base_sq > 0 else float("inf"),
        unchanged=unchanged, unrequested=unrequested, only_in_one_model=only_one,
        safe_source=str(safe.source), base_source=str(base.source))
    if report.relative_change > 0.5:
        log.warning("extracted ΔW is %.2g of the base weights: the base may not be the model the aligned one "
                    "was fine-tuned from", report.relative_change)
    if unrequested:
        log.warning("%d parameters outside the requested layers differ and are not in the expert (%s)",
                    len(unrequested), report.unrequested_groups)
    expert = SafetyExpert(
        name=name, modules=modules, diffs=diffs, architecture=architecture if architecture in
        ("sd15", "sd21", "sdxl") else "unknown",
        categories=list(CATEGORIES) if categories is None else [str(c) for c in categories],
        metadata={EXTRACTION_KEY: report.to_json()})
    return expert, report
