"""The one module of the pack that talks to ComfyUI (``comfy.*``, ``folder_paths``, ``server``).

Everything ComfyUI-specific the nodes need lives here, so the node files are schema plus short glue
and the ``comfyui_safetydpo`` library never imports ComfyUI:

- folders: ``models/safety_experts`` (registered at import; also settable in extra_model_paths.yaml as
  ``safety_experts: <path>``), dropdown choices, names → paths that never leave their folder, and the
  output folders of pairs, training runs and evaluations;
- models: the architecture of a MODEL, experts → weight patches through ComfyUI's own LoRA loader
  (``comfy.lora.load_lora`` + ``ModelPatcher.add_patches``, so Apply equals the core LoraLoader on a
  saved file), a MODEL's UNet weights with its patches, fingerprints;
- running the model: one renderer (CLIP encode, ``comfy.sample.sample`` with KSampler's noise, VAE
  decode), Co-Merge and least-squares statistics on ComfyUI's UNet, DPO training of ComfyUI's UNet;
- the UI: progress bar, Cancel, live text under a node.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import comfy.lora
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths

from .comfyui_safetydpo import calibration, extraction, least_squares_merge, lora_files, names, unet_keys
from .comfyui_safetydpo import concept_gate, distillation_merge
from .comfyui_safetydpo.distillation_merge import DistillationSettings
from .comfyui_safetydpo.concept_gate import gate_metadata
from .comfyui_safetydpo.encoding_cache import encode_preference_pairs, module_fingerprint, vae_fingerprint
from .comfyui_safetydpo.errors import (ArchitectureMismatchError, DatasetError, LoraFormatError, MergeError,
                                       SafetyDPOError, TrainingCancelled, TrainingError)
from .comfyui_safetydpo.expert import SafetyExpert
from .comfyui_safetydpo.models import PromptEmbeddings
from .comfyui_safetydpo.pairs import RenderedImages, image_size
from .comfyui_safetydpo.training import (TrainingConfig, TrainingResult, denoiser_for_ldm_unet,
                                         release_inference_tensors, train_lora)

log = logging.getLogger(__name__)

EXPERTS_FOLDER = "safety_experts"
STATISTICS_SUBFOLDER = "statistics"
LORAS_FOLDER = "loras"
TRAINING_FOLDER = "safetydpo_training"
EVALUATION_FOLDER = "safetydpo_eval"
NO_STATISTICS = "none"
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}
INPUT_FOLDER_TEXT = "ComfyUI's input folder"
NO_EXPERTS = "no safety experts: connect a Load Safety Expert node to the 'experts' input"


# -- folders -----------------------------------------------------------------------------------

def register_model_folders() -> None:
    """Register ``models/safety_experts`` (kept first; extra_model_paths.yaml entries stay too).

    The folder is not created here: importing the pack must not write into a ComfyUI install (it may be
    read-only or shared); the nodes that save experts create it when they write.
    """
    default = os.path.join(folder_paths.models_dir, EXPERTS_FOLDER)
    paths = list(folder_paths.folder_names_and_paths.get(EXPERTS_FOLDER, ([], set()))[0])
    if default not in paths:
        paths.insert(0, default)
    folder_paths.folder_names_and_paths[EXPERTS_FOLDER] = (paths, {".safetensors"})


register_model_folders()


def _experts_folder() -> str:
    """``safety_experts``, registered again if ComfyUI's folder table was rebuilt after the pack was imported."""
    if EXPERTS_FOLDER not in folder_paths.folder_names_and_paths:
        register_model_folders()
    return EXPERTS_FOLDER


def _safetensors_only(file_names: Sequence[str]) -> List[str]:
    return [n for n in file_names if n.lower().endswith((".safetensors", ".sft"))]


def _is_statistics(name: str) -> bool:
    return name.replace("\\", "/").startswith(STATISTICS_SUBFOLDER + "/")


def expert_file_choices() -> List[str]:
    """Dropdown entries: ``safety_experts/<name>`` then ``loras/<name>`` (statistics files left out)."""
    experts = [f"{EXPERTS_FOLDER}/{n}" for n in _safetensors_only(folder_paths.get_filename_list(_experts_folder()))
               if not _is_statistics(n)]
    loras = [f"{LORAS_FOLDER}/{n}" for n in _safetensors_only(folder_paths.get_filename_list(LORAS_FOLDER))]
    return experts + loras


def statistics_file_choices() -> List[str]:
    """Dropdown entries for statistics: ``none``, then files of ``safety_experts`` (statistics/ first)."""
    found = _safetensors_only(folder_paths.get_filename_list(_experts_folder()))
    first = [n for n in found if _is_statistics(n)]
    return [NO_STATISTICS] + first + [n for n in found if n not in first]


def sampler_names() -> List[str]:
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> List[str]:
    return list(comfy.samplers.KSampler.SCHEDULERS)


def resolve_model_file(choice: str, folders: Sequence[str] = (EXPERTS_FOLDER, LORAS_FOLDER)) -> Tuple[str, str]:
    """``safety_experts/x.safetensors`` or ``loras/x.safetensors`` → (folder, full path), inside the folder."""
    normalized = names.relative_name(choice, "expert file", LoraFormatError)
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


def model_file_stamp(choice: str) -> str:
    """Path, modification time and size of a dropdown file (ComfyUI reruns a node when it changes)."""
    try:
        _, path = resolve_model_file(choice)
        stat = os.stat(path)
        return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"
    except (SafetyDPOError, OSError):  # the error is reported when the node runs
        return str(choice)


def experts_folder() -> Path:
    """The first ``safety_experts`` folder (where new experts and statistics are written)."""
    paths = folder_paths.get_folder_paths(_experts_folder())
    return Path(paths[0]) if paths else Path(folder_paths.models_dir) / EXPERTS_FOLDER


def expert_save_path(save_name: str, subfolder: str = "") -> Optional[Path]:
    """``models/safety_experts/[subfolder/]<save_name>.safetensors``, or None when no name is given."""
    if not (save_name and save_name.strip()):
        return None
    relative = names.relative_name(save_name.strip(), "save_name", LoraFormatError)
    if not relative.endswith(".safetensors"):
        relative += ".safetensors"
    return experts_folder() / subfolder / relative if subfolder else experts_folder() / relative


def statistics_save_path(save_name: str) -> Optional[Path]:
    """``models/safety_experts/statistics/<save_name>.safetensors``, or None when no name is given."""
    return expert_save_path(save_name, STATISTICS_SUBFOLDER)


def lora_save_path(filename_prefix: str) -> Tuple[Path, str]:
    """A new numbered file in ``models/loras`` (as SaveImage numbers images): (path, name relative to loras)."""
    prefix = names.relative_name((filename_prefix or "").strip(), "filename_prefix", LoraFormatError)
    root = folder_paths.get_folder_paths(LORAS_FOLDER)[0]
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
    name = f"{filename}_{counter:05}_.safetensors"
    relative = os.path.join(subfolder, name).replace("\\", "/") if subfolder else name
    return Path(folder) / name, relative


def load_statistics_file(name: str):
    """A statistics file chosen in a dropdown (relative to models/safety_experts); its kind is read from the file."""
    normalized = names.relative_name(name, "statistics file", LoraFormatError)
    path = folder_paths.get_full_path(_experts_folder(), normalized)
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


def input_file(name: str, what: str, error=DatasetError, hint: str = "") -> Path:
    """A file inside ComfyUI's input folder; anything outside it is refused, a missing file named."""
    path = names.path_inside(folder_paths.get_input_directory(), name, what, INPUT_FOLDER_TEXT, error)
    if not path.is_file():
        raise error(f"{what} {name!r} was not found in {INPUT_FOLDER_TEXT} "
                    f"{Path(folder_paths.get_input_directory()).resolve()}{hint}")
    return path


def new_pairs_folder(dataset_name: str) -> Path:
    """``<output>/safety_pairs/<dataset_name>``, where Build Safety Pairs writes."""
    name = names.safe_name(dataset_name, "dataset name", DatasetError)
    return Path(folder_paths.get_output_directory()) / names.PAIRS_FOLDER / name


def pairs_folder(name: str) -> Path:
    """A pairs dataset (folder with manifest.json) for the Train node, never outside input/ or output/.

    Looked up as given under ComfyUI's input/ and output/ folders (an ``input/`` or ``output/`` prefix
    picks one; an absolute path, e.g. Build Safety Pairs' ``dataset_path`` output, must lie inside one),
    then under ``output/safety_pairs/``: the dataset name given to Build Safety Pairs is enough.
    """
    text = (name or "").strip().replace("\\", "/")
    if not text:
        raise DatasetError(f"pairs_folder is empty: give the dataset name of Build Safety Pairs (it writes "
                           f"output/{names.PAIRS_FOLDER}/<name>) or a folder under ComfyUI's input/ or output/ "
                           "that holds a manifest.json")
    output = Path(folder_paths.get_output_directory())
    roots = [Path(folder_paths.get_input_directory()), output, output / names.PAIRS_FOLDER]
    if text.startswith(("input/", "output/")):
        head, _, text = text.partition("/")
        roots = roots[:1] if head == "input" else roots[1:]
    inside = [root for root in roots if names.is_inside(root, text)]
    if not inside:
        raise DatasetError(f"pairs_folder {name!r} leaves ComfyUI's input/output folders; use a relative path")
    for root in inside:
        candidate = (root / text).resolve()
        if (candidate / "manifest.json").is_file():
            return candidate
    raise DatasetError(f"no pairs dataset (manifest.json) at {name!r} under ComfyUI's input/ or output/ folder "
                       f"(nor output/{names.PAIRS_FOLDER}/); build one with the Build Safety Pairs node or "
                       "trainer/build_pairs.py")


def training_run_folder(expert_name: str) -> Path:
    return Path(folder_paths.get_output_directory()) / TRAINING_FOLDER / expert_name


def evaluation_folder(run_name: str, config_hash: str) -> Path:
    """``<output>/safetydpo_eval/<run_name>-<configuration hash>``: a changed setting gets a new folder."""
    name = names.safe_name(run_name or "evaluation", "run_name", DatasetError)
    return Path(folder_paths.get_output_directory()) / EVALUATION_FOLDER / f"{name}-{config_hash}"


# -- progress, Cancel, text under a node -------------------------------------------------------

def check_cancel() -> None:
    """Raises ComfyUI's interrupt exception when the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def cancelled() -> bool:
    """Whether Cancel was pressed (without raising)."""
    try:
        check_cancel()
    except comfy.model_management.InterruptProcessingException:
        return True
    return False


class Progress:
    """ComfyUI's progress bar: ``update(done, total)``; its update raises on Cancel."""

    def __init__(self, total: int):
        self.total = max(1, int(total))
        self.bar = comfy.utils.ProgressBar(self.total)

    def update(self, done: int, total: Optional[int] = None) -> None:
        self.bar.update_absolute(done, total or self.total)


def send_text(text: str, node_id) -> None:
    """Live text under the node in the UI (newer ComfyUI servers); silently skipped otherwise."""
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # noqa: BLE001 - progress text is best effort
        pass


def torch_device() -> torch.device:
    return comfy.model_management.get_torch_device()


# -- models and patches ------------------------------------------------------------------------

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


def model_description(model) -> str:
    """A stable description of the MODEL for a manifest (its class, parameter count and patch count)."""
    inner = model.model
    try:
        count = sum(p.numel() for p in inner.diffusion_model.parameters())
    except AttributeError:
        count = 0
    patches = len(getattr(model, "patches", {}) or {})
    return f"{type(inner).__name__}:{count}:patches={patches}"


def model_kind(model) -> str:
    """The model config's class name (e.g. SD15), for manifests."""
    return type(model.model.model_config).__name__


def _tensor_digest(value, digest) -> None:
    """Fold tensors inside a patch value (tuples, lists, adapter objects) into ``digest``."""
    if isinstance(value, torch.Tensor):
        digest.update(f"{tuple(value.shape)}:{float(value.detach().float().sum()):.6e}".encode())
    elif isinstance(value, (tuple, list)):
        for item in value:
            _tensor_digest(item, digest)
    elif hasattr(value, "weights"):
        _tensor_digest(getattr(value, "weights"), digest)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        digest.update(type(value).__name__.encode())
    else:
        digest.update(repr(value).encode())


def model_fingerprint(model) -> str:
    """A stable fingerprint of a ModelPatcher: base weights sample + every patch (LoRA) and strength."""
    digest = hashlib.sha256(type(model.model).__name__.encode())
    for _, parameter in zip(range(3), model.model.parameters()):
        digest.update(f"{tuple(parameter.shape)}:{float(parameter.detach().float().sum()):.6e}".encode())
    for key in sorted(model.patches):
        digest.update(key.encode())
        for patch in model.patches[key]:
            digest.update(f"{patch[0]}:{patch[2]}".encode())
            _tensor_digest(patch[1], digest)
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class ExpertPatches:
    """ComfyUI patch dicts for the UNet and for CLIP (``{model weight key: adapter}``)."""

    unet: Dict[str, object]
    clip: Dict[str, object]


def _expert_tensors(expert: SafetyExpert,
                    architecture: str) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict[str, str]]:
    """Kohya tensors per module (a module with both a LoRA and a diff becomes one exact diff)."""
    per_module: Dict[str, Dict[str, torch.Tensor]] = {}
    kohya: Dict[str, str] = {}
    for module in expert.module_names:
        key = unet_keys.canonical_to_kohya(module, architecture)
        kohya[module] = key
        if module in expert.modules and module not in expert.diffs:
            lora = expert.modules[module]
            per_module[module] = {
                f"{key}.lora_down.weight": lora.down.float().contiguous(),
                f"{key}.lora_up.weight": lora.up.float().contiguous(),
                f"{key}.alpha": torch.tensor(float(lora.alpha)),
            }
        else:  # ComfyUI keeps one adapter per key: fold LoRA + diff into one exact difference
            per_module[module] = {f"{key}.diff": expert.delta_weight(module).contiguous()}
    return per_module, kohya


def _check_fit(expert: SafetyExpert, architecture: str, kohya: Dict[str, str], maps, where: str) -> None:
    """Every module of ``expert`` exists in the model (or CLIP) with the expert's shape."""
    missing, wrong_shape = [], []
    for module in expert.module_names:
        key_map, state = maps["unet"] if module.startswith("unet.") else maps["clip"]
        target = key_map.get(kohya[module])
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
    maps = {"unet": (unet_map, model.model.state_dict()),
            "clip": (clip_map, clip.cond_stage_model.state_dict() if clip is not None else {})}
    _check_fit(expert, architecture, kohya, maps, where)
    patches = ExpertPatches({}, {})
    for part, (key_map, _) in maps.items():
        tensors = {}
        for module, entries in per_module.items():
            if module.startswith("unet.") == (part == "unet"):
                tensors.update(entries)
        if not tensors:
            continue
        wanted = {k: v for k, v in key_map.items() if f"{k}.lora_up.weight" in tensors or f"{k}.diff" in tensors}
        setattr(patches, part, comfy.lora.load_lora(tensors, wanted, log_missing=False))
    count = len(patches.unet) + len(patches.clip)
    if count != len(expert.module_names):
        raise ArchitectureMismatchError(
            f"{where}ComfyUI's LoRA loader took {count} of the {len(expert.module_names)} modules of expert "
            f"{expert.name!r}; the expert does not match this model")
    return patches


def apply_experts(model, clip, chain: Sequence, strength: float):
    """Patched clones of ``model`` (and ``clip``): Σ strength·w_k·ΔW_k over the chain's (expert, weight, source).

    The inputs are never changed; every expert is checked before any patch is added, so nothing
    half-patched leaves this function.
    """
    if not math.isfinite(strength):
        raise MergeError(f"strength must be a finite number, got {strength!r}; use a value between -10 and 10 "
                         "(1 = as trained, 0 = off)")
    if not chain:
        raise MergeError(NO_EXPERTS)
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


def gate_prompt_encoder(clip) -> concept_gate.PromptEncoder:
    """Token features of prompts with the graph's CLIP (``concept_gate.PromptEncoder``): the conditioning ComfyUI
    samples with beside the text encoder's input embedding of each token (``concept_gate.token_features``), one row
    per token of the first text encoder's tokenizer, start/end/padding left out."""
    tables: Dict[str, torch.Tensor] = {}  # tokenizer key -> that encoder's embedding table, looked up once

    def encode(prompts: Sequence[str]):
        encoded = []
        for text in prompts:
            tokens = clip.tokenize(text, return_word_ids=True)
            key = "l" if "l" in tokens else sorted(tokens)[0]
            if key not in tables:
                tables[key] = _token_embedding(clip, key)
            flat = [token for chunk in tokens[key] for token in chunk]
            states = clip.encode_from_tokens(tokens)[0].float().cpu()
            count = min(len(flat), states.shape[0])
            words = torch.tensor([len(t) > 2 and int(t[2]) > 0 for t in flat[:count]], dtype=torch.bool)
            ids = torch.tensor([int(t[0]) for t in flat[:count]], dtype=torch.long)
            features = concept_gate.token_features(states[:count][words], ids[words], tables[key])
            encoded.append((features, ids[words]))
        return encoded

    return encode


def _token_embedding(clip, key: str) -> torch.Tensor:
    """The input embedding table of the CLIP text encoder whose tokenizer is ``key`` ("l", "g", "h")."""
    encoder = getattr(getattr(clip, "cond_stage_model", None), f"clip_{key}", None)
    transformer = getattr(encoder, "transformer", None)
    if transformer is None or not hasattr(transformer, "get_input_embeddings"):
        raise MergeError(f"the prompt gate needs a CLIP text encoder (clip_{key}) with token embeddings; this CLIP "
                         f"({type(getattr(clip, 'cond_stage_model', clip)).__name__}) has none")
    return transformer.get_input_embeddings().weight


_GATES: Dict[Tuple, Tuple[weakref.ref, concept_gate.ConceptGate]] = {}


def _clip_state(clip) -> Tuple:
    """What the prompt states the gate reads depend on: the text encoder object, its patches (a LoRA on the CLIP
    changes them) and the layer it reads (CLIP Set Last Layer)."""
    patcher = getattr(clip, "patcher", None)
    return (id(getattr(clip, "cond_stage_model", clip)), str(getattr(patcher, "patches_uuid", "")),
            repr(getattr(clip, "layer_idx", None)))


def prompt_gate(clip, chain: Sequence, pairs: Sequence = (), safe_prompts: Sequence[str] = ()):
    """The chain's prompt gate for this CLIP, built once per CLIP state, experts and references (kept for 4).

    The cache holds a weak reference to the text encoder it was built with: an entry whose encoder is gone is
    never used for another that Python placed at the same address."""
    experts = [choice.expert for choice in chain]
    names_seen = [e.name for e in experts]
    if len(set(names_seen)) != len(names_seen):
        raise MergeError(f"the prompt gate needs distinct expert names, got {names_seen}; rename the files")
    references = concept_gate.references_for_experts(experts, pairs)
    encoder = getattr(clip, "cond_stage_model", clip)
    key = (_clip_state(clip), repr(sorted(references.items())), tuple(safe_prompts))
    cached = _GATES.get(key)
    if cached is not None and cached[0]() is encoder:
        return cached[1]
    for stale in [k for k, (ref, _) in _GATES.items() if ref() is None]:
        del _GATES[stale]
    if len(_GATES) >= 4:
        _GATES.pop(next(iter(_GATES)))
    gate = concept_gate.build_concept_gate(gate_prompt_encoder(clip), references, safe_prompts)
    _GATES[key] = (weakref.ref(encoder), gate)
    return gate


def apply_experts_by_prompt(model, clip, chain: Sequence, prompt: str, strength: float, pairs: Sequence = (),
                            safe_prompts: Sequence[str] = ()):
    """``apply_experts`` with each expert's weight kept where the gate finds its concept in ``prompt`` and 0 where
    it does not; the inputs unchanged when it finds none. Returns (model, clip, one line per expert)."""
    if not chain:
        raise MergeError(NO_EXPERTS)
    if not str(prompt or "").strip():
        raise MergeError("give the prompt you sample with (connect the same text as the positive CLIP Text Encode)")
    gate = prompt_gate(clip, chain, pairs, safe_prompts)
    states, _ = gate_prompt_encoder(clip)([prompt])[0]
    present = set(gate.present(states))
    gated = [dataclasses.replace(c, weight=c.weight if c.expert.name in present else 0.0) for c in chain]
    report = gate.describe(states)
    if not any(c.weight for c in gated) or strength == 0:
        return model, clip, report + "\nno expert applied: the model is unchanged"
    model, clip = apply_experts(model, clip, [c for c in gated if c.weight], strength)
    return model, clip, report


def check_experts_fit(chain: Sequence, model, clip=None) -> None:
    """Fit check of every expert first: clear messages instead of shape errors in the middle of a run."""
    for choice in chain:
        expert_patches(choice.expert, model, clip, choice.source)


def model_weights(model, label: str) -> extraction.ModelWeights:
    """The UNet weights of a ComfyUI MODEL as ``ModelWeights``, patches included (read one at a time)."""
    patches = model.get_key_patches("diffusion_model.")

    def getter(key):
        def read() -> torch.Tensor:
            entry = patches[key]
            weight, convert = entry[0]
            value = convert(weight.detach().to("cpu", torch.float32, copy=True), inplace=True)
            if len(entry) > 1:
                value = comfy.lora.calculate_weight(entry[1:], value, key, intermediate_dtype=torch.float32)
            return value

        return read

    canonical, layout = extraction.canonical_parameter_names(list(patches), label)
    return extraction.ModelWeights({name: getter(key) for name, key in canonical.items()}, label, layout)


def module_lookup_for(model, clip=None):
    """canonical module name → the live Linear/Conv module of ComfyUI's UNet (or CLIP), via ComfyUI's key maps."""
    architecture = model_architecture(model)
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}

    def lookup(name: str) -> torch.nn.Module:
        key = unet_keys.canonical_to_kohya(name, architecture)
        root, key_map = (model.model, unet_map) if name.startswith("unet.") else (
            getattr(clip, "cond_stage_model", None), clip_map)
        target = key_map.get(key)
        if target is None or root is None:
            raise ArchitectureMismatchError(f"the model has no module {name!r}; the expert does not fit this model")
        return root.get_submodule(target[: -len(".weight")])

    return lookup


# -- sampling ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """What KSampler is given: steps, cfg, sampler, scheduler, image size, negative prompt."""

    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    width: int
    height: int
    negative_prompt: str = ""


class PromptEncoder:
    """CLIP conditioning per text, cached unless ``cache`` is off (an expert on the text encoder changes it)."""

    def __init__(self, clip, cache: bool = True):
        self.clip, self.cache, self._known = clip, cache, {}

    def __call__(self, text: str):
        if not self.cache:
            return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text), show_pbar=False)
        if text not in self._known:
            self._known[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text), show_pbar=False)
        return self._known[text]


def sample_latents(model, encode: PromptEncoder, prompt: str, seed: int, settings: SamplerSettings,
                   batch: int = 1) -> torch.Tensor:
    """One KSampler run (empty latent, KSampler's noise for ``seed``): the denoised latents."""
    check_cancel()
    latent = torch.zeros([int(batch), 4, int(settings.height) // 8, int(settings.width) // 8], device="cpu")
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, int(seed))
    return comfy.sample.sample(model, noise, int(settings.steps), float(settings.cfg), settings.sampler_name,
                               settings.scheduler, encode(prompt), encode(settings.negative_prompt), latent,
                               denoise=1.0, disable_pbar=True, seed=int(seed))


def latent_space(model, vae) -> str:
    """The name of the space ``ComfyEncoder`` encodes into (VAE weights, latent format and scale): kept
    sampler latents are used for training only in the same space."""
    latent_format = model.model.latent_format
    return vae_fingerprint(vae.first_stage_model, getattr(latent_format, "scale_factor", 1.0),
                           f"comfy|{type(latent_format).__name__}|{getattr(latent_format, 'shift_factor', 0.0)}")


class ComfyRenderer:
    """``render(prompts, seeds) -> [N, 3, H, W] in [-1, 1]`` with ComfyUI's sampling, one KSampler run per seed.

    The library's pair builder and evaluation call it like their own renderers, so pairs and evaluation
    images come from exactly the MODEL in the graph, LoRAs and patches included. ``keep_latents``: return
    ``RenderedImages`` with the sampled latents in the UNet's space, which the pair builder keeps so that
    training skips the VAE.
    """

    def __init__(self, model, clip, vae, settings: SamplerSettings, keep_latents: bool = False):
        self.model, self.vae, self.settings, self.keep_latents = model, vae, settings, keep_latents
        self.latent_space = latent_space(model, vae) if keep_latents else ""
        self.encode = PromptEncoder(clip)
        self.encode(settings.negative_prompt)

    def __call__(self, prompts, seeds):
        images, latents = [], []
        for prompt, seed in zip(prompts, seeds):
            sampled = sample_latents(self.model, self.encode, prompt, seed, self.settings)
            decoded = self.vae.decode(sampled)
            if decoded.ndim == 5:  # video VAEs add a time axis
                decoded = decoded.reshape(-1, *decoded.shape[-3:])
            images.append(decoded[:1, :, :, :3].float().cpu().movedim(-1, 1) * 2.0 - 1.0)
            if self.keep_latents and sampled.ndim == 4:
                latents.append(self.model.model.process_latent_in(sampled[:1]).float().cpu())
        if not self.keep_latents or len(latents) != len(images):
            return torch.cat(images)
        return RenderedImages(torch.cat(images), torch.cat(latents), self.latent_space)


# -- merge statistics on ComfyUI's UNet ----------------------------------------------------------

def collect_comfy_statistics(model, clip, experts: Sequence[SafetyExpert], prompts: Sequence[str],
                             timesteps: Sequence[int], width: int, height: int, seed: int):
    """``calibration.collect_statistics`` on ComfyUI's own UNet: each prompt at each timestep."""
    base = model.model
    latent_channels = getattr(base.latent_format, "latent_channels", 4)
    shape = (1, latent_channels, max(1, height // 8), max(1, width // 8))
    generator = torch.Generator().manual_seed(int(seed))
    encode = PromptEncoder(clip, cache=not any(e.has_text_encoder for e in experts))
    batches = []
    for index in range(len(prompts)):
        for t in timesteps:
            x0 = torch.randn(shape, generator=generator)
            noise = torch.randn(shape, generator=generator)
            batches.append((index, int(t), x0, noise))
    for prompt in prompts if encode.cache else ():
        encode(prompt)
    comfy.model_management.load_models_gpu([model])
    device = model.load_device
    progress = Progress(len(experts) * len(batches))
    done = [0]

    def run_model():
        conds = [encode(prompt)[0] for prompt in prompts]  # (cross-attention, extra) of each prompt
        for index, t, x0, noise in batches:
            check_cancel()
            cond, extra = conds[index][0], conds[index][1]
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
            progress.update(done[0])

    return calibration.collect_statistics(
        run_model, experts, module_lookup_for(model, clip),
        info={"timesteps": list(timesteps), "prompts": len(prompts), "width": width, "height": height,
              "seed": int(seed), "source": "ComfyUI"})


def collect_comfy_least_squares_statistics(model, clip, experts: Sequence[SafetyExpert],
                                           expert_prompts: Dict[str, Sequence[str]], safe_prompts: Sequence[str],
                                           steps: int, cfg: float, sampler_name: str, scheduler: str, width: int,
                                           height: int, images_per_prompt: int, seed: int, negative_prompt: str = ""):
    """``least_squares_merge.record_statistics`` with ComfyUI's own sampler on the graph's MODEL and CLIP.

    Each expert is applied in turn while its concept's prompts are sampled (``images_per_prompt`` images per
    prompt, noise from ``seed``); then the base model samples the safe prompts. Weights are restored exactly.
    """
    encode = PromptEncoder(clip, cache=not any(e.has_text_encoder for e in experts))
    settings = SamplerSettings(steps, cfg, sampler_name, scheduler, width, height, negative_prompt)
    progress = Progress(sum(len(p) for p in expert_prompts.values()) + len(safe_prompts))
    done = [0]

    def draw(prompts: Sequence[str]) -> None:
        for prompt in prompts:
            sample_latents(model, encode, prompt, seed, settings, batch=images_per_prompt)
            done[0] += 1
            progress.update(done[0])

    if encode.cache:
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


# -- training on ComfyUI's UNet ------------------------------------------------------------------

class ComfyEncoder:
    """Text and image encoding with the graph's CLIP and VAE, in the UNet's latent space."""

    def __init__(self, model, clip, vae, pairs=None):
        self.model, self.clip, self.vae = model, clip, vae
        self.size = None  # (height, width) of the images, for SDXL's size conditioning
        if pairs is not None and len(pairs):  # kept sampler latents may mean no image is ever encoded
            width, height = image_size(pairs.image_path(pairs.pairs[0].preferred_image))
            self.size = (int(height), int(width))
        self.latent_space = latent_space(model, vae)

    def encode_prompts(self, prompts):
        hidden, added = [], []
        for prompt in prompts:
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
            hidden.append(cond.float())
            height, width = self.size or (1024, 1024)
            adm = self.model.model.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                              target_width=width, target_height=height, device=cond.device)
            if adm is not None:
                added.append(adm.float())
        lengths = {h.shape[1] for h in hidden}
        if len(lengths) > 1:  # prompts longer than 77 tokens: pad with the last chunk length
            longest = max(lengths)
            hidden = [torch.cat([h, h[:, -1:].expand(-1, longest - h.shape[1], -1)], 1) for h in hidden]
        return PromptEmbeddings(torch.cat(hidden).cpu(), {"y": torch.cat(added).cpu()} if added else {})

    def encode_images(self, images):
        self.size = (int(images.shape[2]) * 1, int(images.shape[3]))
        pixels = ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        latents = self.vae.encode(pixels[:, :, :, :3])
        return self.model.model.process_latent_in(latents).float().cpu()


def _cleaned(data):
    """Encoded tensors as ordinary (non-inference) CPU tensors that autograd can use."""
    with torch.inference_mode(False):
        for field in dataclasses.fields(data):
            value = getattr(data, field.name)
            if torch.is_tensor(value):
                setattr(data, field.name, value.detach().clone())
            elif isinstance(value, PromptEmbeddings):
                added = {k: v.detach().clone() for k, v in value.added_cond.items()}
                setattr(data, field.name, PromptEmbeddings(value.encoder_hidden_states.detach().clone(), added))
    return data


def prediction_type(model) -> str:
    """ε or v prediction of a ComfyUI MODEL; other model types are refused for DPO training."""
    base = model.model
    kind = PREDICTION_TYPES.get(getattr(base.model_type, "name", ""))
    if kind is None:
        raise TrainingError(f"model type {getattr(base.model_type, 'name', base.model_type)} is not supported for "
                            "DPO training (ε- and v-prediction SD1.5/SD2.1/SDXL models are)")
    return kind


def training_precision(model, mixed_precision: str) -> str:
    """The autocast setting for training ``model`` ("auto": the model's own dtype); refuses models that
    cannot be trained (not SD1.5/SD2.1/SDXL, not ε/v prediction) before any work starts."""
    model_architecture(model)
    prediction_type(model)
    if mixed_precision != "auto":
        return mixed_precision
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model.model.get_dtype(), "no")


def _trainable_unet(model, vae):
    """The MODEL's UNet loaded for training: its architecture, the UNet, the encoding cache's identity (UNet, VAE,
    prediction type) and the denoiser the trainers call."""
    architecture = model_architecture(model)
    kind = prediction_type(model)
    base = model.model
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    unet = base.diffusion_model
    identity = module_fingerprint(unet, getattr(vae, "first_stage_model", None), label=f"comfy|{architecture}|{kind}")
    layout = unet_keys.infer_layout_from_ldm_config(base.model_config.unet_config)
    sigmas = base.model_sampling.sigmas.float().cpu()
    denoiser = denoiser_for_ldm_unet(unet, 1.0 / (1.0 + sigmas ** 2), kind, layout, architecture)
    return architecture, unet, identity, denoiser


def train_expert(model, clip, vae, pairs, config: TrainingConfig, run_dir: Path, resume: bool,
                 node_id=None) -> TrainingResult:
    """``train_lora`` on the UNet of ComfyUI's MODEL, with ComfyUI's progress bar and Cancel.

    Pairs are encoded once with the
    graph's CLIP and VAE (cached in ``run_dir/cache``); the LoRA goes onto the LDM UNet's attention
    projections under canonical names and is taken off again. Cancel stops within one step, keeps the
    last checkpoint and shows the run as interrupted.
    """
    architecture, unet, identity, denoiser = _trainable_unet(model, vae)
    progress_bar = Progress(config.max_steps)
    interrupted = []

    def progress(step, total, metrics):
        # ComfyUI's progress hook raises on Cancel (and clears the flag): remember it, so that
        # should_stop() answers before the next step and the trainer writes its checkpoint.
        try:
            progress_bar.update(step, total)
        except comfy.model_management.InterruptProcessingException:
            interrupted.append(step)
        text = (f"step {step}/{total}  loss {metrics.get('loss', float('nan')):.4f}  "
                f"accuracy {metrics.get('implicit_accuracy', float('nan')):.2f}")
        send_text(text, node_id)
        if step % 10 == 0 or step == total:
            log.info("Train Safety Expert %s: %s", config.expert_name, text)

    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            training_pairs = config.training_pairs(pairs)
            encoded = encode_preference_pairs(ComfyEncoder(model, clip, vae, training_pairs), training_pairs,
                                              run_dir / "cache", identity=identity)
        data = _cleaned(encoded)
        release_inference_tensors(unet)
        was_training = unet.training
        try:
            result = train_lora(denoiser, data, config, output_dir=run_dir, resume=resume, progress=progress,
                                should_stop=lambda: bool(interrupted) or cancelled(),
                                interrupt_exceptions=(comfy.model_management.InterruptProcessingException,),
                                metadata=gate_metadata(pairs))
        except TrainingCancelled as error:
            log.info("Train Safety Expert %s: %s", config.expert_name, error)
            # let ComfyUI show the run as interrupted; the checkpoint was kept
            raise comfy.model_management.InterruptProcessingException() from error
        finally:
            unet.train(was_training)
    result.expert.metadata["safetydpo_base_model"] = architecture
    return result


def distill_experts(model, clip, vae, pairs, experts: Sequence[SafetyExpert], weights: Sequence[float],
                    settings: DistillationSettings, run_dir: Path, name: str, node_id=None) -> SafetyExpert:
    """The distillation merge on ComfyUI's MODEL: each expert's own category's pairs (encoded with the graph's CLIP
    and VAE, cached in ``run_dir/cache``) and the dataset's replay items, with ComfyUI's progress bar and Cancel."""
    architecture, unet, identity, denoiser = _trainable_unet(model, vae)
    progress_bar = Progress(settings.steps)
    interrupted = []

    def progress(step, total, loss):
        try:
            progress_bar.update(step, total)
        except comfy.model_management.InterruptProcessingException:
            interrupted.append(step)
        send_text(f"distillation step {step}/{total}  loss {loss:.5f}", node_id)

    with torch.inference_mode(False), torch.enable_grad():
        data = []
        with torch.no_grad():
            for subset in distillation_merge.expert_pair_sets(experts, pairs):
                data.append(_cleaned(encode_preference_pairs(ComfyEncoder(model, clip, vae, subset), subset,
                                                             Path(run_dir) / "cache", identity=identity)))
        release_inference_tensors(unet)
        was_training = unet.training
        frozen = [(p, p.requires_grad) for p in unet.parameters()]
        try:
            for parameter, _ in frozen:
                parameter.requires_grad_(False)
            targets = distillation_merge.record_distillation_targets(
                denoiser, experts, weights, data, module_lookup_for(model, clip), settings)
            merged = distillation_merge.merge_by_distillation(
                denoiser, experts, targets, settings, name=name, progress=progress,
                should_stop=lambda: bool(interrupted) or cancelled())
        except TrainingCancelled as error:
            log.info("Distill Safety Experts: %s", error)
            raise comfy.model_management.InterruptProcessingException() from error
        finally:
            for parameter, requires_grad in frozen:
                parameter.requires_grad_(requires_grad)
            unet.train(was_training)
    merged.architecture = architecture
    return merged
