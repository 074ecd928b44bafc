"""ComfyUI nodes for safety experts: load, merge (Co-Merge, least squares, baselines), calibrate, apply, save.

Thin layer: every node turns ComfyUI types (MODEL, CLIP, file names from dropdowns) into calls of
the ``comfyui_safetydpo`` library. Shared helpers here are also used by the other node modules
(``nodes_training``, ``nodes_data``, ``nodes_evaluation``):

- ``SAFETY_EXPERT``: the custom type, a tuple of ``ExpertChoice(expert, weight, source)`` (a chain
  that every Load node extends);
- ``register_model_folders()``: the ``models/safety_experts/`` folder (also settable in
  ``extra_model_paths.yaml`` as ``safety_experts: <path>``);
- ``resolve_model_file(choice)``: a dropdown entry → a path that never leaves the model folders;
- ``model_architecture(model)``: sd15 / sd21 / sdxl of a ComfyUI MODEL;
- ``expert_patches(expert, model, clip)`` and ``apply_experts(model, clip, chain, strength)``:
  experts → ComfyUI weight patches through ComfyUI's own LoRA loader (``comfy.lora.load_lora``), so
  a file saved by "Save Safety LoRA" and loaded by the core LoraLoader gives the same result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

try:
    import comfy.lora
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import folder_paths
except ImportError:  # outside ComfyUI (pytest importing the repository's __init__.py): no nodes
    folder_paths = None

try:  # imported as part of the extension package (ComfyUI's custom_nodes loader)
    from .comfyui_safetydpo import (calibration, least_squares_merge, least_squares_statistics, lora_files, merging,
                                    unet_keys)
    from .comfyui_safetydpo.concepts import load_concept_file
    from .comfyui_safetydpo.errors import ArchitectureMismatchError, LoraFormatError, MergeError, SafetyDPOError
    from .comfyui_safetydpo.expert import SafetyExpert
except ImportError:  # imported as a plain module (tests load this file directly)
    from comfyui_safetydpo import (calibration, least_squares_merge, least_squares_statistics, lora_files, merging,
                                   unet_keys)
    from comfyui_safetydpo.concepts import load_concept_file
    from comfyui_safetydpo.errors import ArchitectureMismatchError, LoraFormatError, MergeError, SafetyDPOError
    from comfyui_safetydpo.expert import SafetyExpert

log = logging.getLogger(__name__)

SAFETY_EXPERT = "SAFETY_EXPERT"
"""Custom ComfyUI type: a tuple of ``ExpertChoice`` (experts with their per-concept weights)."""
SAFETY_STATISTICS = "SAFETY_STATISTICS"
"""Custom ComfyUI type: ``calibration.CalibrationStatistics`` (Co-Merge) or
``least_squares_merge.LayerInputStatistics`` (least squares); the merge refuses the wrong kind by name."""

EXPERTS_FOLDER = "safety_experts"
STATISTICS_SUBFOLDER = "statistics"
LORAS_FOLDER = "loras"
CATEGORY = "safetydpo"
NO_STATISTICS = "none"
MERGE_METHODS = ("co_merge", "least_squares", "linear", "svd", "ties", "dare", "dare_ties", "magnitude_prune")
STATISTICS_METHODS = ("co_merge", "least_squares")


@dataclasses.dataclass(frozen=True)
class ExpertChoice:
    """One expert in a SAFETY_EXPERT chain: the expert, its per-concept weight, where it came from."""

    expert: SafetyExpert
    weight: float
    source: str


# -- model folders -----------------------------------------------------------------------------

def register_model_folders() -> None:
    """Register ``models/safety_experts`` (kept first; extra_model_paths.yaml entries stay too)."""
    default = os.path.join(folder_paths.models_dir, EXPERTS_FOLDER)
    paths = list(folder_paths.folder_names_and_paths.get(EXPERTS_FOLDER, ([], set()))[0])
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[EXPERTS_FOLDER] = (paths, {".safetensors"})
    # The folder is not created here: importing the pack must not write into a ComfyUI install
    # (it may be read-only or shared); the nodes that save experts create it when they write.


if folder_paths is not None:
    register_model_folders()


def _safetensors_only(names: Sequence[str]) -> List[str]:
    return [n for n in names if n.lower().endswith((".safetensors", ".sft"))]


def expert_file_choices() -> List[str]:
    """Dropdown entries: ``safety_experts/<name>`` then ``loras/<name>`` (statistics files left out)."""
    experts = [f"{EXPERTS_FOLDER}/{n}" for n in _safetensors_only(folder_paths.get_filename_list(EXPERTS_FOLDER))
               if not n.replace("\\", "/").startswith(STATISTICS_SUBFOLDER + "/")]
    loras = [f"{LORAS_FOLDER}/{n}" for n in _safetensors_only(folder_paths.get_filename_list(LORAS_FOLDER))]
    return experts + loras


def statistics_file_choices() -> List[str]:
    """Dropdown entries for statistics: ``none``, then files of ``safety_experts`` (statistics/ first)."""
    names = _safetensors_only(folder_paths.get_filename_list(EXPERTS_FOLDER))
    first = [n for n in names if n.replace("\\", "/").startswith(STATISTICS_SUBFOLDER + "/")]
    return [NO_STATISTICS] + first + [n for n in names if n not in first]


def _check_relative_name(name: str, what: str) -> str:
    """Reject names that could leave a model folder (absolute paths, ``..``, drive letters)."""
    if not isinstance(name, str) or not name.strip():
        raise LoraFormatError(f"no {what} chosen: pick a file in the dropdown")
    normalized = name.replace("\\", "/")
    parts = normalized.split("/")
    if normalized.startswith("/") or ":" in parts[0] or ".." in parts or "\x00" in name:
        raise LoraFormatError(
            f"{what} {name!r} is not a file name inside the model folders; choose a file from the dropdown")
    return normalized


def resolve_model_file(choice: str, folders: Sequence[str] = (EXPERTS_FOLDER, LORAS_FOLDER)) -> Tuple[str, str]:
    """``safety_experts/x.safetensors`` or ``loras/x.safetensors`` → (folder, full path), inside the folder."""
    normalized = _check_relative_name(choice, "expert file")
    folder, _, name = normalized.partition("/")
    if folder not in folders or not name:
        raise LoraFormatError(
            f"expert file {choice!r} must start with one of {', '.join(f + '/' for f in folders)}; "
            "choose a file from the dropdown")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(folder))
        raise LoraFormatError(
            f"expert file {choice!r} was not found in models/{folder} ({searched}); put the file there "
            "(or refresh the page after adding it) and choose it again")
    return folder, path


def _file_label(path: str) -> str:
    return os.path.basename(path)


# -- models ------------------------------------------------------------------------------------

def model_architecture(model) -> str:
    """``sd15`` / ``sd21`` / ``sdxl`` of a ComfyUI MODEL, from its UNet's cross-attention width."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    unet_config = getattr(config, "unet_config", None) or {}
    kind = type(config).__name__ if config is not None else type(model).__name__
    architecture = unet_keys.CONTEXT_WIDTH_TO_ARCHITECTURE.get(unet_config.get("context_dim"))
    if architecture is None or "model_channels" not in unet_config:
        raise ArchitectureMismatchError(
            f"safety experts work on SD1.5, SD2.1 and SDXL models; this MODEL is {kind} "
            f"(context width {unet_config.get('context_dim')}). Load an SD1.5/SD2.1/SDXL checkpoint.")
    return architecture


def model_layout(model) -> unet_keys.UNetLayout:
    """The UNet block layout of a ComfyUI MODEL (for canonical ↔ LDM names)."""
    return unet_keys.infer_layout_from_ldm_config(model.model.model_config.unet_config)


def _kohya_name(module_name: str, architecture: str) -> str:
    return unet_keys.canonical_to_kohya(module_name, architecture)


@dataclasses.dataclass
class ExpertPatches:
    """ComfyUI patch dicts for the UNet and for CLIP (``{model weight key: adapter}``)."""

    unet: Dict[str, object]
    clip: Dict[str, object]


def _expert_tensors(expert: SafetyExpert, architecture: str) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, str]]:
    """Kohya tensors per module (a module with both a LoRA and a diff becomes one exact diff)."""
    per_module: Dict[str, Dict[str, torch.Tensor]] = {}
    names: Dict[str, str] = {}
    for module in expert.module_names:
        key = _kohya_name(module, architecture)
        names[module] = key
        if module in expert.modules and module not in expert.diffs:
            lora = expert.modules[module]
            per_module[module] = {
                f"{key}.lora_down.weight": lora.down.float().contiguous(),
                f"{key}.lora_up.weight": lora.up.float().contiguous(),
                f"{key}.alpha": torch.tensor(float(lora.alpha)),
            }
        else:  # ComfyUI keeps one adapter per key: fold LoRA + diff into one exact difference
            per_module[module] = {f"{key}.diff": expert.delta_weight(module).contiguous()}
    return per_module, names


def expert_patches(expert: SafetyExpert, model, clip=None, source: str = "") -> ExpertPatches:
    """Check that ``expert`` fits ``model`` (and ``clip``) and build ComfyUI patches for it.

    Keys go through ComfyUI's own key maps and ``comfy.lora.load_lora``, exactly like the core
    LoraLoader. Raises ArchitectureMismatchError naming the file when the expert is for another
    architecture, has modules the model lacks or other shapes, or needs a CLIP that is not connected.
    """
    where = f"{source}: " if source else ""
    architecture = model_architecture(model)
    lora_files.check_compatible(expert, architecture, source)
    if not expert.module_names:
        raise LoraFormatError(f"{where}expert {expert.name!r} changes no module")
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    text_modules = [m for m in expert.module_names if not m.startswith("unet.")]
    if text_modules and clip is None:
        raise ArchitectureMismatchError(
            f"{where}expert {expert.name!r} also changes the text encoder ({len(text_modules)} modules, e.g. "
            f"{text_modules[0]!r}); connect the checkpoint's CLIP to the 'clip' input and use the CLIP output")
    per_module, kohya = _expert_tensors(expert, architecture)
    model_sd = model.model.state_dict()
    clip_sd = clip.cond_stage_model.state_dict() if clip is not None else {}
    missing, wrong_shape = [], []
    for module in expert.module_names:
        key = kohya[module]
        key_map, state = (unet_map, model_sd) if module.startswith("unet.") else (clip_map, clip_sd)
        target = key_map.get(key)
        if target is None or target not in state:
            missing.append(module)
            continue
        expected = (expert.modules[module].weight_shape if module in expert.modules
                    else expert.diffs[module].shape)
        if tuple(state[target].shape) != tuple(expected):
            wrong_shape.append(f"{module} (expert {tuple(expected)}, model {tuple(state[target].shape)})")
    if missing or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of its {len(expert.module_names)} modules do not exist in this "
                            f"{architecture} model (e.g. {missing[0]!r})")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} modules have other shapes (e.g. {wrong_shape[0]})")
        raise ArchitectureMismatchError(
            f"{where}expert {expert.name!r} does not match this model: {'; '.join(problems)}. It was made for "
            "another checkpoint; use an expert trained on this model's architecture.")
    patches = ExpertPatches({}, {})
    for part, key_map in (("unet", unet_map), ("clip", clip_map)):
        tensors = {}
        for module, entries in per_module.items():
            if module.startswith("unet.") == (part == "unet"):
                tensors.update(entries)
        if not tensors:
            continue
        wanted = {k: v for k, v in key_map.items() if f"{k}.lora_up.weight" in tensors or f"{k}.diff" in tensors}
        loaded = comfy.lora.load_lora(tensors, wanted, log_missing=False)
        setattr(patches, part, loaded)
    count = len(patches.unet) + len(patches.clip)
    if count != len(expert.module_names):
        raise ArchitectureMismatchError(
            f"{where}ComfyUI's LoRA loader took {count} of the {len(expert.module_names)} modules of expert "
            f"{expert.name!r}; the expert does not match this model")
    return patches


def apply_experts(model, clip, chain: Sequence[ExpertChoice], strength: float):
    """Patched clones of ``model`` (and ``clip``): Σ strength·w_k·ΔW_k. The inputs are never changed.

    Every expert is checked before any patch is added, so nothing half-patched leaves this function.
    """
    if not math.isfinite(strength):
        raise MergeError(f"strength must be a finite number, got {strength!r}; use a value between -10 and 10 "
                         "(1 = as trained, 0 = off)")
    chain = _check_chain(chain)
    active = [c for c in chain if c.weight != 0]
    if not active:
        raise MergeError("every expert in the chain has weight 0, so nothing would be applied; "
                         "set a weight > 0 on at least one Load Safety Expert node")
    built = [(choice, expert_patches(choice.expert, model, clip, choice.source)) for choice in active]
    if strength == 0:
        return model, clip
    new_model = model.clone()
    new_clip = clip.clone() if clip is not None and any(p.clip for _, p in built) else clip
    for choice, patches in built:
        added = set(new_model.add_patches(patches.unet, strength * choice.weight))
        if patches.clip:
            added |= set(new_clip.add_patches(patches.clip, strength * choice.weight))
        lost = (set(patches.unet) | set(patches.clip)) - added
        if lost:
            raise ArchitectureMismatchError(
                f"{choice.source}: {len(lost)} weights of expert {choice.expert.name!r} were not found in the "
                f"model (e.g. {sorted(map(str, lost))[0]}); the expert does not match this model")
    return new_model, new_clip


def _check_chain(chain) -> Tuple[ExpertChoice, ...]:
    if not chain:
        raise MergeError("no safety experts: connect a Load Safety Expert node to the 'experts' input")
    for choice in chain:
        if not isinstance(choice, ExpertChoice):
            raise MergeError(f"the 'experts' input holds {type(choice).__name__}, not a safety expert; "
                             "connect a Load Safety Expert or Merge Safety Experts node")
    return tuple(chain)


def describe_chain(chain: Sequence[ExpertChoice]) -> str:
    """One line per expert: weight, name, categories, architecture, modules, source file."""
    lines = []
    for choice in chain:
        lines.append(f"w={choice.weight:g}  {choice.expert.describe()}  [{choice.source}]")
    return "\n".join(lines)


def _load_choice(choice_name: str, weight: float) -> ExpertChoice:
    folder, path = resolve_model_file(choice_name)
    try:
        tensors_metadata = lora_files.read_safetensors(path)[1]
    except LoraFormatError as error:
        raise LoraFormatError(f"{choice_name}: {error}") from None
    if tensors_metadata.get("safetydpo_kind") in (calibration.STATISTICS_KIND, least_squares_merge.STATISTICS_KIND):
        raise LoraFormatError(
            f"{choice_name} is a merge statistics file, not an expert; choose it in the 'statistics_file' "
            "input of Merge Safety Experts")
    try:
        expert = lora_files.load_expert(path)
    except SafetyDPOError as error:
        raise type(error)(f"{choice_name}: {error} — choose a LoRA/expert .safetensors file") from None
    return ExpertChoice(expert, float(weight), choice_name)


# -- nodes -------------------------------------------------------------------------------------

class LoadSafetyExpert:
    """Load Safety Expert: one expert file plus its per-concept weight, appended to a chain."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "expert_name": (expert_file_choices(), {
                    "tooltip": "Expert LoRA file: models/safety_experts/ (or its extra_model_paths.yaml entry) "
                               "or models/loras/. Kohya, ComfyUI and PEFT/diffusers keys are read."}),
                "weight": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                    "tooltip": "Per-concept weight of this expert in the merge or when applied "
                               "(0 leaves it out)."}),
            },
            "optional": {
                "experts": (SAFETY_EXPERT, {
                    "tooltip": "Experts loaded before; this expert is added to the chain."}),
            },
        }

    RETURN_TYPES = (SAFETY_EXPERT, "STRING")
    RETURN_NAMES = ("experts", "description")
    OUTPUT_TOOLTIPS = ("The chain of experts with their weights.",
                       "Name, categories, architecture and size of every expert in the chain.")
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/experts"
    DESCRIPTION = ("Loads a safety expert (a LoRA trained with SafetyDPO for some harm categories) and adds it "
                   "with a weight to a chain. Chain several to merge or apply them together; the "
                   "description output lists each expert's categories from its metadata.")

    @classmethod
    def IS_CHANGED(cls, expert_name, weight, experts=None):
        try:
            _, path = resolve_model_file(expert_name)
            stat = os.stat(path)
            return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"
        except Exception:  # the error is reported when the node runs
            return expert_name

    def load(self, expert_name, weight, experts=None):
        weight = float(weight)
        if not (weight >= 0 and weight == weight):
            raise MergeError(f"{expert_name}: weight {weight} must be ≥ 0 (0 leaves the expert out)")
        chain = tuple(experts or ())
        if experts is not None:
            _check_chain(chain)
        choice = _load_choice(expert_name, weight)
        for earlier in chain:
            if earlier.expert.name == choice.expert.name:
                raise MergeError(
                    f"{expert_name}: an expert named {choice.expert.name!r} is already in the chain (from "
                    f"{earlier.source}); load each expert once (experts are told apart by name)")
        chain = chain + (choice,)
        text = describe_chain(chain)
        return {"ui": {"text": [text]}, "result": (chain, text)}


class MergeSafetyExperts:
    """Merge Safety Experts: Co-Merge or a baseline over the chain's experts and weights."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "experts": (SAFETY_EXPERT, {"tooltip": "The experts to merge, with their per-concept weights "
                                                       "(chain of Load Safety Expert nodes)."}),
                "method": (list(MERGE_METHODS), {
                    "default": "co_merge",
                    "tooltip": "co_merge: per output unit keep the most active expert (needs statistics); "
                               "least_squares: per layer the update that reproduces each expert on its own "
                               "concept's prompts and changes nothing on safe prompts (needs Record Least-Squares "
                               "Statistics); linear: weighted sum (exact); svd: weighted sum truncated to 'rank'; ties / dare "
                               "/ dare_ties / magnitude_prune: sparsified sums (peft)."}),
                "rank": ("INT", {
                    "default": 0, "min": 0, "max": 1024,
                    "tooltip": "Target LoRA rank for svd (0 = 8), ties, dare, magnitude_prune and element "
                               "Co-Merge (0 = exact full differences). Ignored by linear and row Co-Merge, "
                               "which are exact."}),
                "granularity": (["row", "element"], {
                    "default": "row",
                    "tooltip": "Co-Merge only: pick the winning expert per output unit (row, exact LoRA) or per "
                               "weight (element)."}),
                "density": ("FLOAT", {
                    "default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "ties / dare / magnitude_prune: fraction of each update kept."}),
                "drop_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                      "tooltip": "dare / dare_ties: seed of the random drop (fixed, so a merge "
                                                 "repeats exactly)."}),
                "name": ("STRING", {"default": "safety_merged",
                                    "tooltip": "Name of the merged expert (stored in its metadata)."}),
                "statistics_file": (statistics_file_choices(), {
                    "tooltip": "Statistics saved by Compute Co-Merge Statistics (co_merge) or Record Least-Squares "
                               "Statistics (least_squares) in models/safety_experts/statistics/. Ignored when the "
                               "'statistics' input is connected."}),
            },
            "optional": {
                "statistics": (SAFETY_STATISTICS, {
                    "tooltip": "Statistics from Compute Co-Merge Statistics (co_merge) or Record Least-Squares "
                               "Statistics (least_squares)."}),
                "preserve_weight": ("FLOAT", {
                    "default": least_squares_merge.DEFAULT_PRESERVE_WEIGHT, "min": 0.0, "max": 1000.0, "step": 0.1,
                    "tooltip": "least_squares only (λ): how much keeping safe-prompt images unchanged counts against "
                               "reproducing each expert on its own concept's prompts. Higher = less change on safe "
                               "prompts, possibly weaker removal; 0 = only the concepts count."}),
            },
        }

    RETURN_TYPES = (SAFETY_EXPERT, "STRING")
    RETURN_NAMES = ("merged", "recipe")
    OUTPUT_TOOLTIPS = ("The merged expert (weight 1).", "The merge recipe as JSON (method, weights, wins).")
    FUNCTION = "merge"
    CATEGORY = f"{CATEGORY}/experts"
    DESCRIPTION = ("Merges safety experts into one. Co-Merge (the SafetyDPO paper's method) keeps, for each "
                   "output unit, only the expert that is most active on calibration prompts, scaled by its "
                   "weight; it needs statistics from Compute Co-Merge Statistics. Least squares solves, per layer, "
                   "for the update that acts like each expert on its own concept's prompts and like the base model "
                   "on safe prompts (weight 0 keeps that concept as the base model draws it); it needs Record "
                   "Least-Squares Statistics. Linear, SVD, TIES and DARE are the usual baselines.")

    def merge(self, experts, method, rank, granularity, density, drop_seed, name, statistics_file,
              statistics=None, preserve_weight=least_squares_merge.DEFAULT_PRESERVE_WEIGHT):
        seed = int(drop_seed)
        chain = _check_chain(experts)
        if method not in MERGE_METHODS:
            raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
        if method in STATISTICS_METHODS and statistics is None:
            statistics = _statistics_from_file(method, statistics_file)
        options = {"co_merge": {"granularity": granularity}, "least_squares": {"preserve_weight": preserve_weight},
                   "ties": {"density": density},
                   "dare": {"density": density, "seed": seed}, "dare_ties": {"density": density, "seed": seed},
                   "magnitude_prune": {"density": density}}.get(method, {})
        target_rank = int(rank) if rank else None
        merged = merging.merge_experts([c.expert for c in chain], [c.weight for c in chain], method,
                                       statistics=statistics if method in STATISTICS_METHODS else None,
                                       rank=target_rank, name=(name or "safety_merged").strip(), **options)
        if not merged.categories:
            merged.categories = sorted({c for choice in chain if choice.weight > 0 for c in choice.expert.categories})
        recipe = merged.metadata.get(merging.RECIPE_KEY, "{}")
        source = f"merged ({method}) of " + ", ".join(c.source for c in chain if c.weight > 0)
        result = (ExpertChoice(merged, 1.0, source),)
        text = describe_chain(result) + "\n" + _recipe_summary(recipe)
        return {"ui": {"text": [text]}, "result": (result, recipe)}


def _statistics_from_file(method: str, statistics_file: str):
    """The chosen statistics file for a statistics-based merge, or a message saying which node makes it."""
    if statistics_file in (None, "", NO_STATISTICS):
        if method == "least_squares":
            raise MergeError(
                "the least-squares merge needs layer statistics: connect a Record Least-Squares Statistics node to "
                "'statistics' or choose a statistics file, or pick another method (e.g. linear)")
        raise MergeError(
            "Co-Merge needs calibration statistics: connect a Compute Co-Merge Statistics node to "
            "'statistics' or choose a statistics file, or pick another method (e.g. linear)")
    return load_statistics_file(statistics_file)


def _recipe_summary(recipe_json: str) -> str:
    try:
        recipe = json.loads(recipe_json)
    except (TypeError, json.JSONDecodeError):
        return ""
    parts = [f"method {recipe.get('method')}"]
    if "wins_overall" in recipe:
        parts.append("share of units won: " + ", ".join(f"{k} {v:.0%}" for k, v in recipe["wins_overall"].items()))
    if "preserve_weight" in recipe:
        parts.append(f"preserve weight λ {recipe['preserve_weight']:g}")
    if "svd_relative_error" in recipe:
        parts.append(f"SVD relative error {recipe['svd_relative_error']:.3g}")
    return "; ".join(parts)


def load_statistics_file(name: str):
    """A statistics file chosen in a dropdown (relative to models/safety_experts); its kind is read from the file."""
    normalized = _check_relative_name(name, "statistics file")
    path = folder_paths.get_full_path(EXPERTS_FOLDER, normalized)
    if path is None:
        raise MergeError(f"statistics file {name!r} was not found in models/{EXPERTS_FOLDER}; compute it with "
                         "Compute Co-Merge Statistics or Record Least-Squares Statistics (save_name) and choose it "
                         "again")
    try:
        kind = lora_files.read_safetensors(path)[1].get("safetydpo_kind")
        if kind == least_squares_merge.STATISTICS_KIND:
            return least_squares_merge.LayerInputStatistics.load(path)
        return calibration.CalibrationStatistics.load(path)
    except SafetyDPOError as error:
        raise type(error)(f"{name}: {error}") from None


class ComputeCoMergeStatistics:
    """Compute Co-Merge Statistics: run the model with each expert alone on noisy latents of the prompts."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint the experts were trained on (its UNet is run)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP, to encode the calibration prompts."}),
                "experts": (SAFETY_EXPERT, {"tooltip": "The experts to measure (chain of Load Safety Expert)."}),
                "prompts": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Calibration prompts, one per line, from every category the experts cover."}),
                "timesteps": ("STRING", {
                    "default": "100, 300, 500, 700, 900",
                    "tooltip": "Diffusion timesteps (0–999) at which the UNet is run, comma separated."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                  "tooltip": "Image width of the noisy latents (pixels)."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                   "tooltip": "Image height of the noisy latents (pixels)."}),
                "latent_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                        "tooltip": "Seed of the latents and noise (the same for every expert)."}),
                "save_name": ("STRING", {
                    "default": "",
                    "tooltip": "If set, also save to models/safety_experts/statistics/<save_name>.safetensors "
                               "for re-merging without this node."}),
            },
        }

    RETURN_TYPES = (SAFETY_STATISTICS, "STRING")
    RETURN_NAMES = ("statistics", "summary")
    OUTPUT_TOOLTIPS = ("Per-expert, per-layer activation statistics for Co-Merge.", "What was measured.")
    FUNCTION = "compute"
    CATEGORY = f"{CATEGORY}/experts"
    DESCRIPTION = ("Measures how active each expert is in each layer: the UNet runs on noisy latents of the "
                   "prompts at the given timesteps with one expert applied at a time. Co-Merge uses this to "
                   "keep the most active expert per output unit. Weights are restored exactly afterwards.")

    def compute(self, model, clip, experts, prompts, timesteps, width, height, latent_seed, save_name):
        seed = int(latent_seed)
        chain = _check_chain(experts)
        prompt_list = [p.strip() for p in str(prompts).splitlines() if p.strip()]
        if not prompt_list:
            raise MergeError("Compute Co-Merge Statistics needs prompts (one per line, of every category the "
                             "experts cover)")
        try:
            steps = [int(t) for t in str(timesteps).replace(";", ",").split(",") if t.strip()]
        except ValueError:
            raise MergeError(f"timesteps {timesteps!r} must be whole numbers separated by commas") from None
        if not steps or any(not 0 <= t <= 999 for t in steps):
            raise MergeError(f"timesteps {timesteps!r}: give one or more values between 0 and 999")
        save_path = _statistics_save_path(save_name)
        experts_list = [c.expert for c in chain]
        for choice in chain:  # fit check first: clear messages instead of shape errors mid-run
            expert_patches(choice.expert, model, clip, choice.source)
        statistics = collect_comfy_statistics(model, clip, experts_list, prompt_list, steps, width, height, seed)
        if save_path:
            statistics.save(save_path)
        summary = (f"statistics of {len(experts_list)} experts on {len(prompt_list)} prompts × {len(steps)} "
                   f"timesteps ({width}×{height}, seed {seed})" + (f"; saved to {save_path}" if save_path else ""))
        return {"ui": {"text": [summary]}, "result": (statistics, summary)}


def module_lookup_for(model, clip=None):
    """canonical module name → the live Linear/Conv module of ComfyUI's UNet (or CLIP), via ComfyUI's key maps."""
    architecture = model_architecture(model)
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}

    def lookup(name: str) -> torch.nn.Module:
        key = _kohya_name(name, architecture)
        root, key_map = (model.model, unet_map) if name.startswith("unet.") else (
            getattr(clip, "cond_stage_model", None), clip_map)
        target = key_map.get(key)
        if target is None or root is None:
            raise ArchitectureMismatchError(f"the model has no module {name!r}; the expert does not fit this model")
        return root.get_submodule(target[: -len(".weight")])

    return lookup


def collect_comfy_statistics(model, clip, experts: Sequence[SafetyExpert], prompts: Sequence[str],
                             timesteps: Sequence[int], width: int, height: int, seed: int):
    """``calibration.collect_statistics`` on ComfyUI's own UNet: each prompt at each timestep."""
    base = model.model
    latent_channels = getattr(base.latent_format, "latent_channels", 4)
    shape = (1, latent_channels, max(1, height // 8), max(1, width // 8))
    generator = torch.Generator().manual_seed(int(seed))
    text_experts = any(e.has_text_encoder for e in experts)

    def encode_all():
        conds = []
        for prompt in prompts:
            conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt), show_pbar=False)
            cond, extra = conditioning[0][0], conditioning[0][1]
            conds.append((cond, extra))
        return conds

    fixed_conds = None if text_experts else encode_all()
    batches = []
    for index in range(len(prompts)):
        for t in timesteps:
            x0 = torch.randn(shape, generator=generator)
            noise = torch.randn(shape, generator=generator)
            batches.append((index, int(t), x0, noise))

    comfy.model_management.load_models_gpu([model])
    device = model.load_device
    progress = comfy.utils.ProgressBar(len(experts) * len(batches))
    done = [0]

    def run_model():
        conds = fixed_conds if fixed_conds is not None else encode_all()
        for index, t, x0, noise in batches:
            comfy.model_management.throw_exception_if_processing_interrupted()
            cond, extra = conds[index]
            sigma = base.model_sampling.sigma(torch.tensor(float(t))).reshape(1)
            noisy = base.model_sampling.noise_scaling(sigma, noise, x0)
            kwargs = base.extra_conds(cross_attn=cond, pooled_output=extra.get("pooled_output"), noise=noisy,
                                      width=width, height=height, device=device)
            arguments = {name: value.process_cond(batch_size=1, device=device, area=None).cond
                         if hasattr(value, "process_cond") else value for name, value in kwargs.items()}
            arguments = {name: (value.to(device) if torch.is_tensor(value) else value)
                         for name, value in arguments.items()}
            base.apply_model(noisy.to(device), sigma.to(device), **arguments)
            done[0] += 1
            progress.update_absolute(done[0])

    return calibration.collect_statistics(
        run_model, experts, module_lookup_for(model, clip),
        info={"timesteps": list(timesteps), "prompts": len(prompts), "width": width, "height": height,
              "seed": int(seed), "source": "ComfyUI"})


def _statistics_save_path(save_name: str) -> Optional[str]:
    """models/safety_experts/statistics/<save_name>.safetensors, or None when no name is given."""
    if not (save_name and save_name.strip()):
        return None
    relative = _check_relative_name(save_name.strip(), "save_name")
    if not relative.endswith(".safetensors"):
        relative += ".safetensors"
    return os.path.join(folder_paths.get_folder_paths(EXPERTS_FOLDER)[0], STATISTICS_SUBFOLDER, relative)


def _input_folder_file(name: str) -> str:
    """A concept file inside ComfyUI's input folder; anything outside it is refused."""
    root = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(root, name.strip()))
    if not path.startswith(root + os.sep):
        raise MergeError(f"concept file {name!r} must be inside ComfyUI's input folder {root}; give its name there")
    if not os.path.isfile(path):
        raise MergeError(f"concept file {name!r} was not found in ComfyUI's input folder {root}; put the .csv / "
                         ".yaml / .txt concept list there (columns unsafe_prompt, safe_prompt, category)")
    return path


def least_squares_prompts(experts: Sequence[SafetyExpert], concept_prompts: str, concept_file: str,
                          safe_prompts: str):
    """(prompts per expert name, safe prompts) from 'Category: prompt' lines, a concept file and safe lines."""
    pairs = ()
    if concept_file and concept_file.strip():
        extra = sorted({c for e in experts for c in e.categories})
        pairs = load_concept_file(_input_folder_file(concept_file), extra_categories=extra)
    safe_lines = [line.strip() for line in str(safe_prompts or "").splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    prompts = least_squares_statistics.merge_prompts(pairs, concept_prompts, safe_lines,
                                                     source="Record Least-Squares Statistics concept_prompts")
    return least_squares_statistics.prompts_per_expert(experts, prompts.concept), prompts.safe


def collect_comfy_least_squares_statistics(model, clip, experts: Sequence[SafetyExpert],
                                           expert_prompts: Dict[str, Sequence[str]], safe_prompts: Sequence[str],
                                           steps: int, cfg: float, sampler_name: str, scheduler: str, width: int,
                                           height: int, images_per_prompt: int, seed: int, negative_prompt: str = ""):
    """``least_squares_merge.record_statistics`` with ComfyUI's own sampler on the graph's MODEL and CLIP.

    Each expert is applied in turn while its concept's prompts are sampled (``images_per_prompt`` images per
    prompt, noise from ``seed``); then the base model samples the safe prompts. Weights are restored exactly.
    """
    text_experts = any(e.has_text_encoder for e in experts)
    cache: Dict[str, object] = {}

    def encode(text: str):
        if text_experts:  # an expert on the text encoder changes the conditioning: encode while it is applied
            return clip.encode_from_tokens_scheduled(clip.tokenize(text), show_pbar=False)
        if text not in cache:
            cache[text] = clip.encode_from_tokens_scheduled(clip.tokenize(text), show_pbar=False)
        return cache[text]

    runs = sum(len(p) for p in expert_prompts.values()) + len(safe_prompts)
    progress = comfy.utils.ProgressBar(runs)
    done = [0]

    def draw(prompts: Sequence[str]) -> None:
        negative = encode(negative_prompt)
        for prompt in prompts:
            comfy.model_management.throw_exception_if_processing_interrupted()
            latent = torch.zeros([int(images_per_prompt), 4, int(height) // 8, int(width) // 8])
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            noise = comfy.sample.prepare_noise(latent, int(seed))
            comfy.sample.sample(model, noise, int(steps), float(cfg), sampler_name, scheduler, encode(prompt),
                                negative, latent, denoise=1.0, disable_pbar=True, seed=int(seed))
            done[0] += 1
            progress.update_absolute(done[0])

    if not text_experts:
        for text in [negative_prompt, *safe_prompts, *(p for ps in expert_prompts.values() for p in ps)]:
            encode(text)
    # The base MODEL is loaded first, so sampling never re-patches weights while an expert is added in place.
    comfy.model_management.load_models_gpu([model])
    info = {"source": "ComfyUI", "steps": int(steps), "cfg": float(cfg), "sampler": sampler_name,
            "scheduler": scheduler, "width": int(width), "height": int(height),
            "images_per_prompt": int(images_per_prompt), "seed": int(seed),
            "concept_prompts": {k: len(v) for k, v in expert_prompts.items()}, "safe_prompts": len(safe_prompts)}
    return least_squares_merge.record_statistics(
        experts, module_lookup_for(model, clip), lambda expert: draw(expert_prompts[expert.name]),
        lambda: draw(safe_prompts), info)


class RecordLeastSquaresStatistics:
    """Record Least-Squares Statistics: sample each expert's concept prompts with it applied, safe prompts without."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint the experts were trained on (it is sampled)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP, to encode the prompts."}),
                "experts": (SAFETY_EXPERT, {"tooltip": "The experts to merge (chain of Load Safety Expert); each "
                                                       "draws the prompts of the categories it records."}),
                "concept_prompts": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Unsafe prompts of each expert's concept, one 'Category: prompt' per line (e.g. "
                               "'Violence: a bloody street fight'); # starts a comment. Added to concept_file."}),
                "concept_file": ("STRING", {
                    "default": "",
                    "tooltip": "Optional concept list in ComfyUI's input folder (.csv / .yaml / .txt with "
                               "unsafe_prompt, safe_prompt, category): unsafe prompts go to the experts of their "
                               "category, safe rewrites to the safe prompts."}),
                "safe_prompts": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Prompts whose images must not change, one per line (besides the concept file's "
                               "safe rewrites)."}),
                "steps": ("INT", {"default": least_squares_statistics.DEFAULT_STEPS, "min": 1, "max": 200,
                                  "tooltip": "Sampling steps per image (the layer inputs of every step count)."}),
                "cfg": ("FLOAT", {"default": least_squares_statistics.DEFAULT_GUIDANCE, "min": 0.0, "max": 30.0,
                                  "step": 0.1, "tooltip": "Classifier-free guidance, as you sample with the model."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampler, as in KSampler."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Scheduler, as in KSampler."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height."}),
                "images_per_prompt": ("INT", {"default": least_squares_statistics.DEFAULT_IMAGES_PER_PROMPT,
                                              "min": 1, "max": 64, "tooltip": "Images drawn per prompt."}),
                "sampling_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                          "tooltip": "Noise seed (the same for every prompt and expert)."}),
                "save_name": ("STRING", {
                    "default": "",
                    "tooltip": "If set, also save to models/safety_experts/statistics/<save_name>.safetensors "
                               "for re-merging with other weights or λ without this node."}),
            },
        }

    RETURN_TYPES = (SAFETY_STATISTICS, "STRING")
    RETURN_NAMES = ("statistics", "summary")
    OUTPUT_TOOLTIPS = ("Per-layer input statistics for the least-squares merge.", "What was recorded.")
    FUNCTION = "record"
    CATEGORY = f"{CATEGORY}/experts"
    DESCRIPTION = ("Records what the least-squares merge needs: the layer inputs while the model, with one expert "
                   "applied at a time, samples that expert's own concept prompts, and while the base model samples "
                   "safe prompts. Connect it to Merge Safety Experts (method least_squares). Weights are restored "
                   "exactly afterwards.")

    def record(self, model, clip, experts, concept_prompts, concept_file, safe_prompts, steps, cfg, sampler_name,
               scheduler, width, height, images_per_prompt, sampling_seed, save_name):
        chain = _check_chain(experts)
        experts_list = [c.expert for c in chain]
        save_path = _statistics_save_path(save_name)
        per_expert, safe = least_squares_prompts(experts_list, concept_prompts, concept_file, safe_prompts)
        for choice in chain:  # fit check first: clear messages instead of shape errors mid-run
            expert_patches(choice.expert, model, clip, choice.source)
        statistics = collect_comfy_least_squares_statistics(
            model, clip, experts_list, per_expert, safe, steps, cfg, sampler_name, scheduler, width, height,
            images_per_prompt, sampling_seed)
        if save_path:
            statistics.save(save_path)
        counts = ", ".join(f"{name} {len(p)}" for name, p in per_expert.items())
        summary = (f"least-squares statistics of {len(experts_list)} experts (concept prompts: {counts}; safe prompts: "
                   f"{len(safe)}; {images_per_prompt} images × {steps} steps, cfg {cfg}, seed {sampling_seed})"
                   + (f"; saved to {save_path}" if save_path else ""))
        return {"ui": {"text": [summary]}, "result": (statistics, summary)}


class ApplySafetyExperts:
    """Apply Safety Experts: patched clones of MODEL (and CLIP); the inputs stay as they were."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to make safer (SD1.5, SD2.1 or SDXL)."}),
                "experts": (SAFETY_EXPERT, {
                    "tooltip": "Experts to apply (a merged expert, or a chain applied as a weighted sum)."}),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                    "tooltip": "Overall strength; each expert is applied at strength × its weight. 0 returns the "
                               "inputs unchanged."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Needed only when an expert also changes the text encoder."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The patched model (the input MODEL is unchanged for other branches).",
                       "The patched CLIP, or the input CLIP when the experts do not change it.")
    FUNCTION = "apply"
    CATEGORY = f"{CATEGORY}/experts"
    DESCRIPTION = ("Applies safety experts to a model through ComfyUI's own LoRA patching (clone + "
                   "add_patches): the same result as saving them with Save Safety LoRA and loading that file "
                   "with LoraLoader. Experts of another architecture or model are refused with a message.")

    def apply(self, model, experts, strength, clip=None):
        new_model, new_clip = apply_experts(model, clip, experts, float(strength))
        return (new_model, new_clip)


class SaveSafetyLora:
    """Save Safety LoRA: the (merged) expert as a kohya LoRA in models/loras for any LoRA loader."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "experts": (SAFETY_EXPERT, {
                    "tooltip": "The expert to save; a chain of several is saved as their weighted sum (exact)."}),
                "filename_prefix": ("STRING", {
                    "default": "safetydpo/safety_merged",
                    "tooltip": "File name inside models/loras (subfolders allowed); a counter and "
                               ".safetensors are added. Never leaves the loras folder."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name relative to models/loras (what LoraLoader lists).",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = f"{CATEGORY}/experts"
    DESCRIPTION = ("Writes the expert as a LoRA file (kohya keys with explicit alpha and metadata: name, "
                   "categories, architecture, merge recipe) to models/loras, where ComfyUI's LoraLoader, "
                   "A1111/Forge and diffusers load it.")

    def save(self, experts, filename_prefix):
        chain = _check_chain(experts)
        expert = chain_as_expert(chain)
        prefix = _check_relative_name((filename_prefix or "").strip(), "filename_prefix")
        root = folder_paths.get_folder_paths(LORAS_FOLDER)[0]
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
        name = f"{filename}_{counter:05}_.safetensors"
        path = os.path.join(folder, name)
        lora_files.save_expert(expert, path, key_format="kohya", uniform_alpha=True)
        relative = os.path.join(subfolder, name).replace("\\", "/") if subfolder else name
        text = f"saved {expert.describe()} to models/loras/{relative}"
        log.info("safetydpo: %s", text)
        return {"ui": {"text": [text]}, "result": (relative,)}


def chain_as_expert(chain: Sequence[ExpertChoice]) -> SafetyExpert:
    """One expert for a chain: the expert itself at weight 1, else the exact weighted sum (linear merge)."""
    chain = _check_chain(chain)
    if len(chain) == 1 and chain[0].weight == 1.0:
        return chain[0].expert
    names = [c.expert.name for c in chain]
    return merging.merge_experts([c.expert for c in chain], [c.weight for c in chain], "linear",
                                 name="+".join(names))


NODE_CLASS_MAPPINGS = {
    "SafetyDPOLoadExpert": LoadSafetyExpert,
    "SafetyDPOMergeExperts": MergeSafetyExperts,
    "SafetyDPOComputeCoMergeStatistics": ComputeCoMergeStatistics,
    "SafetyDPORecordLeastSquaresStatistics": RecordLeastSquaresStatistics,
    "SafetyDPOApplyExperts": ApplySafetyExperts,
    "SafetyDPOSaveLora": SaveSafetyLora,
} if folder_paths is not None else {}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SafetyDPOLoadExpert": "Load Safety Expert",
    "SafetyDPOMergeExperts": "Merge Safety Experts",
    "SafetyDPOComputeCoMergeStatistics": "Compute Co-Merge Statistics",
    "SafetyDPORecordLeastSquaresStatistics": "Record Least-Squares Statistics",
    "SafetyDPOApplyExperts": "Apply Safety Experts",
    "SafetyDPOSaveLora": "Save Safety LoRA",
}
