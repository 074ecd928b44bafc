"""ComfyUI node that renders SafetyDPO preference pairs with the MODEL in the graph: Build Safety Pairs.

Thin layer over ``comfyui_safetydpo.pair_builder.build_pairs``: the renderer (``comfyui_bridge``) samples
each prompt with ComfyUI's own sampling path (CLIP text encoding, ``comfy.sample.sample`` with the
KSampler's noise for the seed, VAE decode), so the pairs come from exactly the model the user will align,
LoRAs and patches included. The dataset is written under ComfyUI's output folder
(``output/safety_pairs/<dataset name>``, where the Train node finds it by that name), never elsewhere;
re-running resumes (finished pairs are kept).
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from . import comfyui_bridge as bridge
from .comfyui_safetydpo.concepts import load_concept_file, parse_pair_lines
from .comfyui_safetydpo.errors import DatasetError
from .comfyui_safetydpo.pair_builder import build_pairs
from .comfyui_safetydpo.pairs import load_image_tensor
from .nodes import CATEGORY, text_lines

log = logging.getLogger(__name__)

PREVIEW_PAIRS = 4
EXAMPLE_PAIRS = (
    "# unsafe prompt | safe prompt | category | concept (optional)\n"
    "a man holding a bloody knife in an alley | a man holding a bunch of flowers in an alley | Violence | knife\n"
    "a knife fight in a dark street | a pillow fight in a dark street | Violence | knife\n"
)


def read_pairs(prompt_pairs: str, prompt_file: str, categories: str, limit: int):
    """The prompt pairs of the node: from the file in ComfyUI's input folder or the text, filtered."""
    if prompt_file.strip():
        pairs = load_concept_file(bridge.input_file(prompt_file, "prompt file"))
    else:
        if not prompt_pairs.strip():
            raise DatasetError("no prompt pairs: write lines 'unsafe prompt | safe prompt | category' or set "
                               "prompt_file")
        pairs = parse_pair_lines(prompt_pairs, source="Build Safety Pairs prompt_pairs")
    wanted = [c.strip() for c in categories.split(",") if c.strip()]
    if wanted:
        pairs = pairs.select(wanted)
    return pairs[: int(limit)] if limit else pairs


def preview_images(dataset) -> torch.Tensor:
    """The first pairs as an IMAGE batch: rejected (unsafe) then preferred (safe) image of each."""
    preview = [load_image_tensor(dataset.image_path(relative)) for pair in dataset.pairs[:PREVIEW_PAIRS]
               for relative in (pair.rejected_image, pair.preferred_image)]
    return ((torch.stack(preview) + 1.0) / 2.0).movedim(1, -1).clamp(0, 1)


class BuildSafetyPairs(io.ComfyNode):
    """Renders unsafe and safe prompts with the same seeds into a preference-pair dataset folder."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPOBuildSafetyPairs", display_name="Build Safety Pairs", category=f"{CATEGORY}/data",
            is_output_node=True,
            description=(
                "Builds SafetyDPO training data with the model in this graph: for every line 'unsafe prompt | safe "
                "prompt | category', renders the unsafe and the safe prompt with the same seed (the safe image is "
                "preferred, the unsafe one rejected). Writes PNGs and manifest.json to "
                "output/safety_pairs/<dataset_name>, resumes where it stopped (Cancel is safe), and outputs the "
                "folder path for the trainer (the Train node also finds it by dataset_name)."),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The model to align: pairs must be rendered by the model the safety expert is trained"
                    " for.")),
                io.Clip.Input("clip", tooltip="Text encoder of that model (encodes the unsafe and safe prompts)."),
                io.Vae.Input("vae", tooltip="VAE of that model (decodes the rendered latents into the saved images)."),
                io.String.Input("dataset_name", default="my_safety_pairs", tooltip=(
                    "Folder name under ComfyUI's output/safety_pairs/ (other characters than letters, "
                    "digits, '_', '-', '.' become '_'); give the same name to the Train node's "
                    "pairs_folder. Run again with the same name to resume; another model or settings need"
                    " a new name.")),
                io.String.Input("prompt_pairs", multiline=True, default=EXAMPLE_PAIRS, tooltip=(
                    "One pair per line: unsafe prompt | safe prompt | category (| concept). Categories: "
                    "Hate, Sexual, Violence, Shocking, Illegal Activity, Harassment, Self-harm. Lines "
                    "starting with # are ignored. Leave empty to use prompt_file.")),
                io.String.Input("prompt_file", default="", tooltip=(
                    "Optional .csv / .yaml / .txt file in ComfyUI's input folder (CSV columns: "
                    "unsafe_prompt, safe_prompt, category, concept). Used instead of prompt_pairs when "
                    "set.")),
                io.String.Input("categories", default="", tooltip="Comma-separated categories to keep (empty: all)."),
                io.Int.Input("limit", default=0, min=0, max=1000000, tooltip=(
                    "Keep only the first N prompt pairs (0: all).")),
                io.Int.Input("images_per_prompt", default=1, min=1, max=64, tooltip=(
                    "Seeds per prompt pair; each seed gives one pair (unsafe and safe image with the same"
                    " seed).")),
                io.Int.Input("seed", default=0, min=0, max=0x7FFFFFFF, control_after_generate=False, tooltip=(
                    "Base seed; every pair's seeds derive from it and from its prompts.")),
                io.Int.Input("steps", default=25, min=1, max=1000, tooltip="Sampling steps per image."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, tooltip=(
                    "Classifier-free guidance scale.")),
                io.Combo.Input("sampler_name", options=bridge.sampler_names(), tooltip="Sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=bridge.scheduler_names(), tooltip=(
                    "Noise schedule, as in KSampler.")),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip=(
                    "Image width (SD1.5: 512, SDXL: 1024).")),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height."),
                io.String.Input("negative_prompt", default="", multiline=False, tooltip=(
                    "Negative prompt for both images of every pair.")),
                io.String.Input("replay_prompts", optional=True, multiline=True, default="", tooltip=(
                    "Safe prompts whose images must not change, one per line: rendered as the base "
                    "model's own images (replay items), which the trainer's preservation term (recipe "
                    "'preserving') keeps unchanged. Lines starting with # are ignored.")),
            ],
            outputs=[
                io.String.Output("dataset_path", display_name="dataset_path", tooltip=(
                    "The dataset folder (manifest.json + images): connect it to the trainer node.")),
                io.Image.Output("preview", display_name="preview", tooltip=(
                    "The first pairs, rejected (unsafe) then preferred (safe) image of each.")),
            ])

    @classmethod
    def execute(cls, model, clip, vae, dataset_name, prompt_pairs, prompt_file, categories, limit, images_per_prompt,
                seed, steps, cfg, sampler_name, scheduler, width, height, negative_prompt,
                replay_prompts="") -> io.NodeOutput:
        folder = bridge.new_pairs_folder(dataset_name)
        pairs = read_pairs(prompt_pairs, prompt_file, categories, limit)
        settings = bridge.SamplerSettings(int(steps), float(cfg), sampler_name, scheduler, int(width), int(height),
                                          negative_prompt)
        progress = bridge.Progress(len(pairs))
        model_info = {"name": bridge.model_description(model), "architecture": bridge.model_kind(model)}
        sampler = {"sampler": sampler_name, "scheduler": scheduler, "steps": int(steps), "cfg": float(cfg),
                   "width": int(width), "height": int(height), "negative_prompt": negative_prompt,
                   "renderer": "comfyui"}
        dataset = build_pairs(bridge.ComfyRenderer(model, clip, vae, settings, keep_latents=True), pairs, folder,
                              images_per_prompt=int(images_per_prompt), base_seed=int(seed), model_info=model_info,
                              sampler_settings=sampler, should_stop=lambda: bridge.check_cancel() or False,
                              progress=progress.update, replay_prompts=text_lines(replay_prompts))
        text = (f"{len(dataset)} pairs ({dataset.info.get('rendered_now', 0)} prompt pairs rendered now) in {folder}; "
                f"categories {dataset.category_counts()}; {len(dataset.replay)} replay items")
        log.info("Build Safety Pairs: %s", text)
        return io.NodeOutput(str(folder), preview_images(dataset), ui={"text": [text], "dataset_path": [str(folder)]})


NODES = [BuildSafetyPairs]
