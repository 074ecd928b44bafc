"""ComfyUI node: Extract Safety Expert (aligned MODEL − its base MODEL → an expert in the chain).

Thin layer over ``comfyui_safetydpo.extraction``: the two MODELs' UNet weights (with any patches the
graph already added, e.g. a LoraLoader, computed by ComfyUI's own ``calculate_weight``) are handed over
in ComfyUI's LDM names; the expert joins a SAFETY_EXPERT chain like Load Safety Expert, so it can be
merged with the user's own experts with per-concept weights, applied to another fine-tune, or saved.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

try:
    import comfy.lora
    import comfy.model_management
    import comfy.utils
    import folder_paths
except ImportError:  # outside ComfyUI (pytest importing the repository's __init__.py): no nodes
    folder_paths = None

try:  # imported as part of the extension package (ComfyUI's custom_nodes loader)
    from . import nodes as expert_nodes
    from .comfyui_safetydpo import extraction, lora_files
    from .comfyui_safetydpo.errors import ArchitectureMismatchError, MergeError
    from .comfyui_safetydpo.pairs import CATEGORIES
except ImportError:  # imported as a plain module (tests load this file directly)
    from comfyui_safetydpo import extraction, lora_files
    from comfyui_safetydpo.errors import ArchitectureMismatchError, MergeError
    from comfyui_safetydpo.pairs import CATEGORIES

    # The pack's nodes.py by path (ComfyUI's own top-level ``nodes`` module keeps its name).
    expert_nodes = sys.modules.get("safetydpo_expert_nodes")
    if expert_nodes is None:
        _spec = importlib.util.spec_from_file_location("safetydpo_expert_nodes", Path(__file__).with_name("nodes.py"))
        expert_nodes = importlib.util.module_from_spec(_spec)
        sys.modules[_spec.name] = expert_nodes
        _spec.loader.exec_module(expert_nodes)

log = logging.getLogger(__name__)

OUTPUT_KINDS = ("lora", "exact diffs")


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

    names, layout = extraction.canonical_parameter_names(list(patches), label)
    mapping = {name: getter(key) for name, key in names.items()}
    return extraction.ModelWeights(mapping, label, layout)


class ExtractSafetyExpert:
    """Extract Safety Expert: the difference of a safety-aligned model and its base, as an expert."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "safe_model": ("MODEL", {
                    "tooltip": "The safety-aligned model (e.g. the released SafetyDPO UNet, loaded with Load "
                               "Diffusion Model or Load Checkpoint)."}),
                "base_model": ("MODEL", {
                    "tooltip": "The model it was fine-tuned from (SD1.5 for safe-stable-diffusion-v1-5)."}),
                "layers": ("STRING", {
                    "default": "attention",
                    "tooltip": "Which layers become the expert: " + ", ".join(extraction.LAYER_PRESETS) +
                               " (attention = what SafetyDPO trained), globs over module names (*attn2.to_k) "
                               "or re:<regex>, comma-separated. Differences elsewhere are reported."}),
                "output": (list(OUTPUT_KINDS), {
                    "default": "lora",
                    "tooltip": "lora: low-rank factors (small file, loads everywhere); exact diffs: full weight "
                               "differences (no approximation, large)."}),
                "rank": ("INT", {
                    "default": 32, "min": 0, "max": 1024,
                    "tooltip": "LoRA rank per module; 0 = pick per module by 'energy'."}),
                "energy": ("FLOAT", {
                    "default": 0.99, "min": 0.01, "max": 1.0, "step": 0.001,
                    "tooltip": "With rank 0: keep this share of each module's ‖ΔW‖² (smallest rank that does, up "
                               "to max_rank)."}),
                "max_rank": ("INT", {"default": 128, "min": 1, "max": 1024,
                                     "tooltip": "Rank cap for the energy rule."}),
                "categories": ("STRING", {
                    "default": ", ".join(CATEGORIES),
                    "tooltip": "Harm categories the aligned model covers (CoProV2 names or your own), stored "
                               "in the expert's metadata."}),
                "name": ("STRING", {"default": "safetydpo_extracted", "tooltip": "Name of the expert."}),
                "weight": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                    "tooltip": "Per-concept weight of this expert in the chain (as in Load Safety Expert)."}),
                "save_name": ("STRING", {
                    "default": "",
                    "tooltip": "If set, also save to models/safety_experts/<save_name>.safetensors (kohya keys, "
                               "categories and the extraction report in the metadata)."}),
            },
            "optional": {
                "experts": (expert_nodes.SAFETY_EXPERT, {
                    "tooltip": "Experts loaded before; the extracted expert is added to the chain."}),
            },
        }

    RETURN_TYPES = (expert_nodes.SAFETY_EXPERT, "STRING")
    RETURN_NAMES = ("experts", "report")
    OUTPUT_TOOLTIPS = ("The chain with the extracted expert added.",
                       "Relative error per module and overall, and the differences left out.")
    FUNCTION = "extract"
    CATEGORY = f"{expert_nodes.CATEGORY}/experts"
    DESCRIPTION = ("Turns a safety-aligned model into a safety expert: the weight difference to its base model "
                   "on the chosen layers, exact or as a LoRA at a rank or energy threshold, with the error "
                   "reported. Merge it with your own experts and apply it to your own fine-tune of the same base.")

    def extract(self, safe_model, base_model, layers, output, rank, energy, max_rank, categories, name, weight,
                save_name, experts=None):
        weight = float(weight)
        if not (weight >= 0 and weight == weight):
            raise MergeError(f"weight {weight} must be ≥ 0 (0 leaves the expert out)")
        chain = expert_nodes._check_chain(experts) if experts is not None else ()
        architecture = expert_nodes.model_architecture(safe_model)
        if expert_nodes.model_architecture(base_model) != architecture:
            raise ArchitectureMismatchError(
                f"safe_model is {architecture} but base_model is {expert_nodes.model_architecture(base_model)}: "
                "connect the model the aligned one was fine-tuned from")
        save_path = None
        if save_name and save_name.strip():
            relative = expert_nodes._check_relative_name(save_name.strip(), "save_name")
            if not relative.endswith(".safetensors"):
                relative += ".safetensors"
            save_path = os.path.join(folder_paths.get_folder_paths(expert_nodes.EXPERTS_FOLDER)[0], relative)
        progress = comfy.utils.ProgressBar(1)

        def step(done, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done, total)

        if "text_encoder" in str(layers):
            raise ArchitectureMismatchError(
                "this node compares the two MODELs' UNets; text-encoder differences need the command line "
                "(python trainer/extract.py --layers text_encoder) on the checkpoint files")
        exact = output == "exact diffs"
        expert, report = extraction.extract_expert(
            model_weights(safe_model, "safe_model"), model_weights(base_model, "base_model"), layers=layers,
            rank=None if exact else (int(rank) or None), energy=None if exact or rank else float(energy),
            max_rank=int(max_rank), name=(name or "safetydpo_extracted").strip(),
            categories=extraction.parse_categories(categories), architecture=architecture, progress=step,
            device=comfy.model_management.get_torch_device())
        text = report.summary()
        if save_path:
            lora_files.save_expert(expert, save_path, uniform_alpha=True)
            text += f"\nsaved to {save_path}"
        source = f"extracted ({expert.name})" + (f" [{os.path.basename(save_path)}]" if save_path else "")
        chain = tuple(chain) + (expert_nodes.ExpertChoice(expert, weight, source),)
        text = expert_nodes.describe_chain(chain) + "\n" + text
        log.info("safetydpo: %s", text)
        return {"ui": {"text": [text]}, "result": (chain, text)}


NODE_CLASS_MAPPINGS = {"SafetyDPOExtractExpert": ExtractSafetyExpert} if folder_paths is not None else {}
NODE_DISPLAY_NAME_MAPPINGS = {"SafetyDPOExtractExpert": "Extract Safety Expert"}
