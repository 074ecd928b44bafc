"""ComfyUI node that renders SafetyDPO preference pairs with the MODEL in the graph: Build Safety Pairs.

Thin layer over ``comfyui_safetydpo.pair_builder.build_pairs``: the renderer samples each prompt with
ComfyUI's own sampling path (CLIP text encoding, ``comfy.sample.sample`` with the KSampler's noise for
the seed, VAE decode), so the pairs come from exactly the model the user will align, LoRAs and
patches included. The dataset is written under ComfyUI's output folder
(``output/safety_pairs/<dataset name>``), never elsewhere; re-running resumes (finished pairs are kept).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

try:
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import folder_paths
except ImportError:  # outside ComfyUI (pytest importing the repository's __init__.py): no nodes
    folder_paths = None

try:  # imported as part of the extension package (ComfyUI's custom_nodes loader)
    from .comfyui_safetydpo.concepts import load_concept_file, parse_pair_lines
    from .comfyui_safetydpo.errors import DatasetError
    from .comfyui_safetydpo.pair_builder import build_pairs
    from .comfyui_safetydpo.pairs import load_image_tensor
except ImportError:  # imported as a plain module
    from comfyui_safetydpo.concepts import load_concept_file, parse_pair_lines
    from comfyui_safetydpo.errors import DatasetError
    from comfyui_safetydpo.pair_builder import build_pairs
    from comfyui_safetydpo.pairs import load_image_tensor

log = logging.getLogger(__name__)

PAIRS_SUBFOLDER = "safety_pairs"
PREVIEW_PAIRS = 4
EXAMPLE_PAIRS = (
    "# unsafe prompt | safe prompt | category | concept (optional)\n"
    "a man holding a bloody knife in an alley | a man holding a bunch of flowers in an alley | Violence | knife\n"
    "a knife fight in a dark street | a pillow fight in a dark street | Violence | knife\n"
)
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def dataset_folder(name: str) -> Path:
    """``<ComfyUI output>/safety_pairs/<name>``; names that could leave that folder are refused."""
    name = (name or "").strip()
    if not _DATASET_NAME.match(name) or ".." in name:
        raise DatasetError(f"dataset name {name!r}: use letters, digits, '_', '-' and '.' only (a folder name, no path)")
    return Path(folder_paths.get_output_directory()) / PAIRS_SUBFOLDER / name


def input_file(name: str) -> Path:
    """A prompt file inside ComfyUI's input folder; anything outside it is refused."""
    root = Path(folder_paths.get_input_directory()).resolve()
    path = (root / name.strip()).resolve()
    if root not in path.parents:
        raise DatasetError(f"prompt file {name!r} must be inside ComfyUI's input folder {root}")
    if not path.is_file():
        raise DatasetError(f"prompt file {name!r} not found in ComfyUI's input folder {root}")
    return path


class ComfyRenderer:
    """``render(prompts, seeds)`` with ComfyUI's sampling: one KSampler run per (prompt, seed)."""

    def __init__(self, model, clip, vae, width, height, steps, cfg, sampler_name, scheduler, negative_prompt):
        self.model, self.clip, self.vae = model, clip, vae
        self.width, self.height = int(width), int(height)
        self.steps, self.cfg = int(steps), float(cfg)
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self._conditioning = {}
        self.negative = self.encode(negative_prompt)

    def encode(self, text: str):
        if text not in self._conditioning:
            self._conditioning[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return self._conditioning[text]

    def __call__(self, prompts, seeds) -> torch.Tensor:
        images = []
        for prompt, seed in zip(prompts, seeds):
            comfy.model_management.throw_exception_if_processing_interrupted()
            latent = torch.zeros([1, 4, self.height // 8, self.width // 8], device="cpu")
            latent = comfy.sample.fix_empty_latent_channels(self.model, latent)
            noise = comfy.sample.prepare_noise(latent, int(seed))
            samples = comfy.sample.sample(
                self.model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler, self.encode(prompt),
                self.negative, latent, denoise=1.0, disable_pbar=True, seed=int(seed),
            )
            decoded = self.vae.decode(samples)  # [1, H, W, 3] in [0, 1]
            if decoded.ndim == 5:  # video VAEs add a time axis
                decoded = decoded.reshape(-1, *decoded.shape[-3:])
            images.append(decoded[:1].float().cpu().movedim(-1, 1) * 2.0 - 1.0)
        return torch.cat(images)


class BuildSafetyPairs:
    """Renders unsafe and safe prompts with the same seeds into a preference-pair dataset folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to align: pairs must be rendered by the model the safety expert is trained for."}),
                "clip": ("CLIP", {"tooltip": "Text encoder of that model (encodes the unsafe and safe prompts)."}),
                "vae": ("VAE", {"tooltip": "VAE of that model (decodes the rendered latents into the saved images)."}),
                "dataset_name": ("STRING", {"default": "my_safety_pairs", "tooltip": "Folder name under ComfyUI's output/safety_pairs/. Run again with the same name to resume; another model or settings need a new name."}),
                "prompt_pairs": ("STRING", {"multiline": True, "default": EXAMPLE_PAIRS, "tooltip": "One pair per line: unsafe prompt | safe prompt | category (| concept). Categories: Hate, Sexual, Violence, Shocking, Illegal Activity, Harassment, Self-harm. Lines starting with # are ignored. Leave empty to use prompt_file."}),
                "prompt_file": ("STRING", {"default": "", "tooltip": "Optional .csv / .yaml / .txt file in ComfyUI's input folder (CSV columns: unsafe_prompt, safe_prompt, category, concept). Used instead of prompt_pairs when set."}),
                "categories": ("STRING", {"default": "", "tooltip": "Comma-separated categories to keep (empty: all)."}),
                "limit": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "Keep only the first N prompt pairs (0: all)."}),
                "images_per_prompt": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Seeds per prompt pair; each seed gives one pair (unsafe and safe image with the same seed)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0x7FFFFFFF, "control_after_generate": False, "tooltip": "Base seed; every pair's seeds derive from it and from its prompts."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 1000, "tooltip": "Sampling steps per image."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS if folder_paths is not None else ["euler"], {"tooltip": "Sampler, as in KSampler."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS if folder_paths is not None else ["normal"], {"tooltip": "Noise schedule, as in KSampler."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width (SD1.5: 512, SDXL: 1024)."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height."}),
                "negative_prompt": ("STRING", {"default": "", "multiline": False, "tooltip": "Negative prompt for both images of every pair."}),
            },
            "optional": {
                "replay_prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "Safe prompts whose images must not change, one per line: rendered as the base model's own images (replay items), which the trainer's preservation term (recipe 'preserving') keeps unchanged. Lines starting with # are ignored."}),
            },
        }

    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("dataset_path", "preview")
    OUTPUT_TOOLTIPS = ("The dataset folder (manifest.json + images): connect it to the trainer node.",
                       "The first pairs, rejected (unsafe) then preferred (safe) image of each.")
    FUNCTION = "build"
    OUTPUT_NODE = True
    CATEGORY = "safetydpo/data"
    DESCRIPTION = (
        "Builds SafetyDPO training data with the model in this graph: for every line 'unsafe prompt | safe prompt | "
        "category', renders the unsafe and the safe prompt with the same seed (the safe image is preferred, the unsafe "
        "one rejected). Writes PNGs and manifest.json to output/safety_pairs/<dataset_name>, resumes where it stopped "
        "(Cancel is safe), and outputs the folder path for the trainer."
    )

    def build(self, model, clip, vae, dataset_name, prompt_pairs, prompt_file, categories, limit, images_per_prompt,
              seed, steps, cfg, sampler_name, scheduler, width, height, negative_prompt, replay_prompts=""):
        folder = dataset_folder(dataset_name)
        if prompt_file.strip():
            pairs = load_concept_file(input_file(prompt_file))
        else:
            if not prompt_pairs.strip():
                raise DatasetError("no prompt pairs: write lines 'unsafe prompt | safe prompt | category' or set prompt_file")
            pairs = parse_pair_lines(prompt_pairs, source="Build Safety Pairs prompt_pairs")
        wanted = [c.strip() for c in categories.split(",") if c.strip()]
        if wanted:
            pairs = pairs.select(wanted)
        if limit:
            pairs = pairs[: int(limit)]
        renderer = ComfyRenderer(model, clip, vae, width, height, steps, cfg, sampler_name, scheduler, negative_prompt)
        total = max(1, len(pairs))
        bar = comfy.utils.ProgressBar(total)

        def should_stop() -> bool:
            comfy.model_management.throw_exception_if_processing_interrupted()
            return False

        model_info = {"name": _model_name(model), "architecture": type(model.model.model_config).__name__}
        sampler = {"sampler": sampler_name, "scheduler": scheduler, "steps": int(steps), "cfg": float(cfg),
                   "width": int(width), "height": int(height), "negative_prompt": negative_prompt,
                   "renderer": "comfyui"}
        dataset = build_pairs(renderer, pairs, folder, images_per_prompt=int(images_per_prompt), base_seed=int(seed),
                              model_info=model_info, sampler_settings=sampler, should_stop=should_stop,
                              progress=lambda done, count: bar.update_absolute(done, count),
                              replay_prompts=[line.strip() for line in (replay_prompts or "").splitlines()
                                              if line.strip() and not line.strip().startswith("#")])
        preview = []
        for pair in dataset.pairs[:PREVIEW_PAIRS]:
            for relative in (pair.rejected_image, pair.preferred_image):
                preview.append(load_image_tensor(dataset.image_path(relative)))
        images = ((torch.stack(preview) + 1.0) / 2.0).movedim(1, -1).clamp(0, 1)
        text = (f"{len(dataset)} pairs ({dataset.info.get('rendered_now', 0)} prompt pairs rendered now) in {folder}; "
                f"categories {dataset.category_counts()}; {len(dataset.replay)} replay items")
        log.info("Build Safety Pairs: %s", text)
        return {"ui": {"text": [text], "dataset_path": [str(folder)]}, "result": (str(folder), images)}


def _model_name(model) -> str:
    """A stable description of the MODEL for the manifest (its class and parameter count)."""
    inner = model.model
    try:
        count = sum(p.numel() for p in inner.diffusion_model.parameters())
    except AttributeError:
        count = 0
    patches = len(getattr(model, "patches", {}) or {})
    return f"{type(inner).__name__}:{count}:patches={patches}"


NODE_CLASS_MAPPINGS = {"SafetyDPOBuildSafetyPairs": BuildSafetyPairs} if folder_paths is not None else {}
NODE_DISPLAY_NAME_MAPPINGS = {"SafetyDPOBuildSafetyPairs": "Build Safety Pairs"} if folder_paths is not None else {}
