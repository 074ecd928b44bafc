"""ComfyUI node: Extract Safety Expert (aligned MODEL − its base MODEL → an expert in the chain).

Thin layer over ``comfyui_safetydpo.extraction``: the two MODELs' UNet weights (with any patches the
graph already added, e.g. a LoraLoader, computed by ComfyUI's own ``calculate_weight`` in
``comfyui_bridge.model_weights``) are handed over in ComfyUI's LDM names; the expert joins a
SAFETY_EXPERT chain like Load Safety Expert, so it can be merged with the user's own experts with
per-concept weights, applied to another fine-tune, or saved.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from . import comfyui_bridge as bridge
from .comfyui_safetydpo import extraction, lora_files
from .comfyui_safetydpo.errors import ArchitectureMismatchError
from .comfyui_safetydpo.pairs import CATEGORIES
from .nodes import EXPERTS_CATEGORY, ExpertChoice, SafetyExpertChain, check_chain, check_weight, describe_chain

log = logging.getLogger(__name__)

OUTPUT_KINDS = ("lora", "exact diffs")


def shared_architecture(safe_model, base_model, layers: str) -> str:
    """The architecture both MODELs share; text-encoder layers are refused (a MODEL has only the UNet)."""
    architecture = bridge.model_architecture(safe_model)
    if bridge.model_architecture(base_model) != architecture:
        raise ArchitectureMismatchError(
            f"safe_model is {architecture} but base_model is {bridge.model_architecture(base_model)}: "
            "connect the model the aligned one was fine-tuned from")
    if "text_encoder" in str(layers):
        raise ArchitectureMismatchError(
            "this node compares the two MODELs' UNets; text-encoder differences need the command line "
            "(python trainer/extract.py --layers text_encoder) on the checkpoint files")
    return architecture


class ExtractSafetyExpert(io.ComfyNode):
    """Extract Safety Expert: the difference of a safety-aligned model and its base, as an expert."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPOExtractExpert", display_name="Extract Safety Expert", category=EXPERTS_CATEGORY,
            description=("Turns a safety-aligned model into a safety expert: the weight difference to its base model "
                         "on the chosen layers, exact or as a LoRA at a rank or energy threshold, with the error "
                         "reported. Merge it with your own experts and apply it to your own fine-tune of the same "
                         "base."),
            inputs=[
                io.Model.Input("safe_model", tooltip=(
                    "The safety-aligned model (e.g. the released SafetyDPO UNet, loaded with Load Diffusion Model or "
                    "Load Checkpoint).")),
                io.Model.Input("base_model", tooltip=(
                    "The model it was fine-tuned from (SD1.5 for safe-stable-diffusion-v1-5).")),
                io.String.Input("layers", default="attention", tooltip=(
                    "Which layers become the expert: " + ", ".join(extraction.LAYER_PRESETS) +
                    " (attention = what SafetyDPO trained), globs over module names (*attn2.to_k) or re:<regex>, "
                    "comma-separated. Differences elsewhere are reported.")),
                io.Combo.Input("output", options=list(OUTPUT_KINDS), default="lora", tooltip=(
                    "lora: low-rank factors (small file, loads everywhere); exact diffs: full weight differences "
                    "(no approximation, large).")),
                io.Int.Input("rank", default=32, min=0, max=1024,
                             tooltip="LoRA rank per module; 0 = pick per module by 'energy'."),
                io.Float.Input("energy", default=0.99, min=0.01, max=1.0, step=0.001, tooltip=(
                    "With rank 0: keep this share of each module's ‖ΔW‖² (smallest rank that does, up to "
                    "max_rank).")),
                io.Int.Input("max_rank", default=128, min=1, max=1024, tooltip="Rank cap for the energy rule."),
                io.String.Input("categories", default=", ".join(CATEGORIES), tooltip=(
                    "Harm categories the aligned model covers (CoProV2 names or your own), stored in the expert's "
                    "metadata.")),
                io.String.Input("name", default="safetydpo_extracted", tooltip="Name of the expert."),
                io.Float.Input("weight", default=1.0, min=0.0, max=10.0, step=0.05, tooltip=(
                    "Per-concept weight of this expert in the chain (as in Load Safety Expert).")),
                io.String.Input("save_name", default="", tooltip=(
                    "If set, also save to models/safety_experts/<save_name>.safetensors (kohya keys, categories and "
                    "the extraction report in the metadata).")),
                SafetyExpertChain.Input("experts", optional=True,
                                        tooltip="Experts loaded before; the extracted expert is added to the chain."),
            ],
            outputs=[
                SafetyExpertChain.Output("experts", display_name="experts",
                                         tooltip="The chain with the extracted expert added."),
                io.String.Output("report", display_name="report",
                                 tooltip="Relative error per module and overall, and the differences left out."),
            ])

    @classmethod
    def execute(cls, safe_model, base_model, layers, output, rank, energy, max_rank, categories, name, weight,
                save_name, experts=None) -> io.NodeOutput:
        weight = check_weight(weight)
        chain = check_chain(experts) if experts is not None else ()
        architecture = shared_architecture(safe_model, base_model, layers)
        save_path = bridge.expert_save_path(save_name)
        exact, progress = output == "exact diffs", bridge.Progress(1)
        expert, report = extraction.extract_expert(
            bridge.model_weights(safe_model, "safe_model"), bridge.model_weights(base_model, "base_model"),
            layers=layers, rank=None if exact else (int(rank) or None), energy=None if exact or rank else float(energy),
            max_rank=int(max_rank), name=(name or "safetydpo_extracted").strip(),
            categories=extraction.parse_categories(categories), architecture=architecture,
            progress=lambda done, total: bridge.check_cancel() or progress.update(done, total),
            device=bridge.torch_device())
        text = report.summary()
        if save_path:
            lora_files.save_expert(expert, save_path, uniform_alpha=True)
            text += f"\nsaved to {save_path}"
        source = f"extracted ({expert.name})" + (f" [{save_path.name}]" if save_path else "")
        chain = tuple(chain) + (ExpertChoice(expert, weight, source),)
        text = describe_chain(chain) + "\n" + text
        log.info("safetydpo: %s", text)
        return io.NodeOutput(chain, text, ui={"text": [text]})


NODES = [ExtractSafetyExpert]
