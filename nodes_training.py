"""ComfyUI node: Train Safety Expert (DPO).

Trains a LoRA safety expert with Diffusion-DPO on the MODEL given in the graph, inside the ComfyUI
process. ComfyUI's UNet (``model.model.diffusion_model``) is not a diffusers model: LoRA layers go
directly onto its attention projections (LDM names) and are renamed to canonical diffusers names
for the expert, so the result feeds Merge/Apply nodes and saves as a kohya file. The LoRA is taken
off again afterwards; the graph's model is left as it was. Everything else (loss, checkpoints,
resume, NaN guard) is the library's ``train_lora``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import torch

try:
    import comfy.model_management
    import comfy.utils
    import folder_paths
except ImportError:  # outside ComfyUI (pytest importing the repository's __init__.py): no nodes
    folder_paths = None

try:  # imported as part of the extension package
    from .comfyui_safetydpo import recipes, unet_keys
    from .comfyui_safetydpo.encoding_cache import encode_preference_pairs, module_fingerprint
    from .comfyui_safetydpo.errors import DatasetError, TrainingCancelled, TrainingError
    from .comfyui_safetydpo.lora_files import save_expert
    from .comfyui_safetydpo.models import PromptEmbeddings
    from .comfyui_safetydpo.pairs import load_pairs
    from .comfyui_safetydpo.training import (TrainingConfig, denoiser_for_ldm_unet, release_inference_tensors,
                                             train_lora)
    from .nodes import EXPERTS_FOLDER, SAFETY_EXPERT, ExpertChoice, model_architecture, register_model_folders
except ImportError:  # imported as a plain module (tests)
    from comfyui_safetydpo import recipes, unet_keys
    from comfyui_safetydpo.encoding_cache import encode_preference_pairs, module_fingerprint
    from comfyui_safetydpo.errors import DatasetError, TrainingCancelled, TrainingError
    from comfyui_safetydpo.lora_files import save_expert
    from comfyui_safetydpo.models import PromptEmbeddings
    from comfyui_safetydpo.pairs import load_pairs
    from comfyui_safetydpo.training import (TrainingConfig, denoiser_for_ldm_unet, release_inference_tensors,
                                            train_lora)

    def _sibling_nodes_module():
        """The pack's nodes.py by path (ComfyUI's own top-level ``nodes`` module keeps its name)."""
        import importlib.util
        import sys

        module = sys.modules.get("safetydpo_expert_nodes")
        if module is None:
            spec = importlib.util.spec_from_file_location("safetydpo_expert_nodes", Path(__file__).with_name("nodes.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        return module

    _nodes = _sibling_nodes_module()
    EXPERTS_FOLDER, SAFETY_EXPERT, ExpertChoice = _nodes.EXPERTS_FOLDER, _nodes.SAFETY_EXPERT, _nodes.ExpertChoice
    model_architecture, register_model_folders = _nodes.model_architecture, _nodes.register_model_folders

log = logging.getLogger(__name__)

PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}


def resolve_dataset_folder(name: str) -> Path:
    """A pairs folder given relative to ComfyUI's input/ or output/ folder; never outside them."""
    text = (name or "").strip().replace("\\", "/")
    if not text:
        raise DatasetError("pairs_folder is empty: give a folder under ComfyUI's input/ or output/ "
                           "(e.g. safetydpo_pairs/violence) that holds a manifest.json")
    roots = [Path(folder_paths.get_input_directory()), Path(folder_paths.get_output_directory())]
    if text.startswith(("input/", "output/")):
        head, _, text = text.partition("/")
        roots = roots[:1] if head == "input" else roots[1:]
    inside = False  # an absolute path (Build Safety Pairs' dataset_path output) is fine inside output/
    for root in roots:
        candidate = (root / text).resolve()
        root = root.resolve()
        if candidate != root and root not in candidate.parents:
            continue
        inside = True
        if (candidate / "manifest.json").is_file():
            return candidate
    if not inside:
        raise DatasetError(f"pairs_folder {name!r} leaves ComfyUI's input/output folders; use a relative path")
    raise DatasetError(f"no pairs dataset (manifest.json) at {name!r} under ComfyUI's input/ or output/ folder; "
                       "build one with the Build Safety Pairs node or trainer/build_pairs.py")


def experts_folder() -> Path:
    try:
        paths = folder_paths.get_folder_paths(EXPERTS_FOLDER)
    except KeyError:
        paths = []
    return Path(paths[0]) if paths else Path(folder_paths.models_dir) / EXPERTS_FOLDER


class ComfyEncoder:
    """Text and image encoding with the graph's CLIP and VAE, in the UNet's latent space."""

    def __init__(self, model, clip, vae):
        self.model, self.clip, self.vae = model, clip, vae
        self.size = None

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
                setattr(data, field.name, PromptEmbeddings(value.encoder_hidden_states.detach().clone(),
                                                           {k: v.detach().clone() for k, v in value.added_cond.items()}))
    return data


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip()).strip("._")
    if not name:
        raise TrainingError("expert_name must contain letters or digits")
    return name


class TrainSafetyExpertDPO:
    DESCRIPTION = ("Trains one safety expert (a LoRA on the UNet's attention projections) with Diffusion-DPO on "
                   "the MODEL in this graph: for each unsafe prompt of the pairs dataset, the safe image is "
                   "preferred and the unsafe image rejected. The reference model is the same UNet with the LoRA "
                   "off. Checkpoints are kept in output/safetydpo_training/<name>; Cancel stops within one step "
                   "and keeps the last checkpoint (turn on resume to continue). The expert is saved to "
                   "models/safety_experts/<name>.safetensors (kohya format) and output for Merge/Apply nodes. "
                   "This node trains in the ComfyUI process on one device. For more than one GPU (or machine), run "
                   "the command-line trainer with accelerate from the extension's folder, e.g. `accelerate launch "
                   "--num_processes 4 trainer/train.py --model <checkpoint> --pairs <pairs folder> --output <run "
                   "folder>` (data parallel), or add --per-category to train one expert per GPU at once "
                   "(README: More than one GPU).")
    CATEGORY = "safetydpo/training"
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = (SAFETY_EXPERT, "STRING")
    RETURN_NAMES = ("expert", "expert_path")
    OUTPUT_TOOLTIPS = ("The trained expert (weight 1.0), ready for Merge / Apply Safety Experts.",
                       "Where the expert file was saved.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to align (SD1.5, SD2.1 or SDXL). Its UNet is trained; "
                                               "LoRAs already applied to it stay part of the base."}),
                "clip": ("CLIP", {"tooltip": "Text encoder of the model, used once to encode the prompts."}),
                "vae": ("VAE", {"tooltip": "VAE of the model, used once to encode the pair images to latents."}),
                "pairs_folder": ("STRING", {"default": "safetydpo_pairs", "tooltip":
                                            "Folder of a pairs dataset (manifest.json + images), relative to "
                                            "ComfyUI's input/ or output/ folder."}),
                "expert_name": ("STRING", {"default": "safety_expert", "tooltip":
                                           "File name of the expert (models/safety_experts/<name>.safetensors) "
                                           "and of its checkpoint folder."}),
                "category": ("STRING", {"default": "", "tooltip":
                                        "Train on the pairs of this category only (e.g. Violence); empty = all "
                                        "pairs (one expert on all data)."}),
                "steps": ("INT", {"default": 300, "min": 1, "max": 100000, "tooltip": "Optimizer steps."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1e-1, "step": 1e-6, "round": False,
                                            "tooltip": "AdamW learning rate of the LoRA (official recipe: 1e-5)."}),
                "batch_size": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip":
                                       "Pairs per step (each pair = winner + loser). Lower it if out of memory."}),
                "rank": ("INT", {"default": 4, "min": 1, "max": 128, "tooltip": "LoRA rank (official recipe: 4)."}),
                "alpha": ("FLOAT", {"default": 4.0, "min": 0.01, "max": 1024.0, "tooltip":
                                    "LoRA alpha; the update is scaled by alpha / rank."}),
                "dpo_beta": ("FLOAT", {"default": 5000.0, "min": 0.0, "max": 1e6, "step": 10.0, "tooltip":
                                       "DPO β with the ½ inside: loss = −log σ(−β/2 · d) (official recipe: 5000)."}),
                "sft_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip":
                                         "Weight of a plain denoising loss on the preferred (safe) image."}),
                "preservation_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip":
                                                  "Weight of the replay term: on the dataset's safe prompts, stay "
                                                  "close to the frozen model (needs replay items in the dataset)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip":
                                 "Seed for noise, timesteps and data order."}),
                "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000, "tooltip":
                                             "Save a resumable checkpoint every N steps (0 = only at the end)."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip":
                                       "Continue from the last checkpoint of this expert_name instead of starting "
                                       "over."}),
            },
            "optional": {
                "mixed_precision": (["auto", "no", "fp16", "bf16"], {"default": "auto", "tooltip":
                                    "Autocast of the UNet (LoRA weights stay fp32). auto: the model's own dtype."}),
                "recipe": ([*recipes.RECIPES, recipes.CUSTOM], {"default": recipes.DEFAULT_RECIPE, "tooltip":
                           "Training preset; it sets rank, alpha, learning_rate, dpo_beta, sft_weight and "
                           "preservation_weight (those widgets count only with 'custom'). " +
                           " ".join(f"{k}: {v}." for k, v in recipes.DESCRIPTIONS.items())}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, pairs_folder, expert_name, category, steps, learning_rate, batch_size, rank,
              alpha, dpo_beta, sft_weight, preservation_weight, seed, checkpoint_every, resume,
              mixed_precision="auto", recipe=recipes.CUSTOM, unique_id=None):
        name = _safe_name(expert_name)
        folder = resolve_dataset_folder(pairs_folder)
        categories = [category.strip()] if category and category.strip() else None
        pairs = load_pairs(folder, categories=categories)
        architecture = model_architecture(model)
        base = model.model
        kind = PREDICTION_TYPES.get(getattr(base.model_type, "name", ""))
        if kind is None:
            raise TrainingError(f"model type {getattr(base.model_type, 'name', base.model_type)} is not supported for "
                                "DPO training (ε- and v-prediction SD1.5/SD2.1/SDXL models are)")
        run_dir = Path(folder_paths.get_output_directory()) / "safetydpo_training" / name
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        unet = base.diffusion_model
        dtype = base.get_dtype()
        precision = mixed_precision if mixed_precision != "auto" else \
            {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
        widgets = dict(rank=rank, alpha=alpha, learning_rate=learning_rate, dpo_beta=dpo_beta, sft_weight=sft_weight,
                       preservation_weight=preservation_weight)  # an API graph without 'recipe' means its widgets
        preset = recipes.recipe_settings(recipe) if recipe != recipes.CUSTOM else widgets
        config = TrainingConfig(**preset, expert_name=name, categories=tuple(categories or pairs.categories),
                                max_steps=steps, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every,
                                mixed_precision=precision)
        recipes.require_replay(config, pairs, "" if recipe == recipes.CUSTOM else recipe, f"pairs folder {pairs_folder!r}")
        encoder = ComfyEncoder(model, clip, vae)
        identity = module_fingerprint(unet, getattr(vae, "first_stage_model", None),
                                      label=f"comfy|{architecture}|{kind}")
        layout = unet_keys.infer_layout_from_ldm_config(base.model_config.unet_config)
        sigmas = base.model_sampling.sigmas.float().cpu()
        denoiser = denoiser_for_ldm_unet(unet, 1.0 / (1.0 + sigmas ** 2), kind, layout, architecture)
        progress_bar = comfy.utils.ProgressBar(steps)

        interrupted = []

        def progress(step, total, metrics):
            # ComfyUI's progress hook raises on Cancel (and clears the flag): remember it, so that
            # should_stop() answers before the next step and the trainer writes its checkpoint.
            try:
                progress_bar.update_absolute(step, total)
            except comfy.model_management.InterruptProcessingException:
                interrupted.append(step)
            text = (f"step {step}/{total}  loss {metrics.get('loss', float('nan')):.4f}  "
                    f"accuracy {metrics.get('implicit_accuracy', float('nan')):.2f}")
            _send_text(text, unique_id)
            if step % 10 == 0 or step == total:
                log.info("Train Safety Expert %s: %s", name, text)

        def should_stop():
            if interrupted:
                return True
            try:
                comfy.model_management.throw_exception_if_processing_interrupted()
            except comfy.model_management.InterruptProcessingException:
                return True
            return False

        with torch.inference_mode(False), torch.enable_grad():
            with torch.no_grad():
                encoded = encode_preference_pairs(encoder, pairs, run_dir / "cache", identity=identity)
            data = _cleaned(encoded)
            release_inference_tensors(unet)
            was_training = unet.training
            try:
                result = train_lora(denoiser, data, config, output_dir=run_dir, resume=resume, progress=progress,
                                    should_stop=should_stop,
                                    interrupt_exceptions=(comfy.model_management.InterruptProcessingException,))
            except TrainingCancelled as error:
                log.info("Train Safety Expert %s: %s", name, error)
                # let ComfyUI show the run as interrupted; the checkpoint was kept
                raise comfy.model_management.InterruptProcessingException() from error
            finally:
                unet.train(was_training)
        result.expert.metadata["safetydpo_base_model"] = architecture
        target = experts_folder() / f"{name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        path = save_expert(result.expert, target)
        log.info("Train Safety Expert: saved %s (%d steps, %.0f s)", path, result.steps, result.seconds)
        return ((ExpertChoice(result.expert, 1.0, str(path)),), str(path))


def _send_text(text: str, node_id) -> None:
    """Live loss/accuracy under the node in the UI (newer ComfyUI servers); silently skipped otherwise."""
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # noqa: BLE001 - progress text is best effort
        pass


if folder_paths is not None:
    register_model_folders()

NODE_CLASS_MAPPINGS = {"SafetyDPOTrainExpert": TrainSafetyExpertDPO}
NODE_DISPLAY_NAME_MAPPINGS = {"SafetyDPOTrainExpert": "Train Safety Expert (DPO)"}
