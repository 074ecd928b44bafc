"""ComfyUI node: Train Safety Expert (DPO).

Trains a LoRA safety expert with Diffusion-DPO on the MODEL given in the graph, inside the ComfyUI
process (``comfyui_bridge.train_expert``: ComfyUI's UNet has LDM module names, so LoRA layers go onto
its attention projections and are renamed to canonical diffusers names for the expert; the LoRA is
taken off again afterwards). Everything else (loss, checkpoints, resume, NaN guard) is the library's
``train_lora``. The pairs come from Build Safety Pairs: its dataset name is enough here.
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from . import comfyui_bridge as bridge
from .comfyui_safetydpo import names, recipes
from .comfyui_safetydpo.errors import TrainingError
from .comfyui_safetydpo.lora_files import save_expert
from .comfyui_safetydpo.pairs import load_pairs
from .comfyui_safetydpo.training import TrainingConfig
from .comfyui_safetydpo.distillation_merge import DistillationSettings
from .comfyui_safetydpo.errors import MergeError
from .nodes import CATEGORY, EXPERTS_CATEGORY, ExpertChoice, SafetyExpertChain, check_chain, describe_chain

log = logging.getLogger(__name__)

DEFAULT_PAIRS = "my_safety_pairs"
"""Build Safety Pairs' default dataset_name: with both defaults, the Train node reads what Build wrote."""


class TrainSafetyExpertDPO(io.ComfyNode):
    """Train Safety Expert (DPO): one LoRA expert on a pairs dataset, on the graph's MODEL."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPOTrainExpert", display_name="Train Safety Expert (DPO)", category=f"{CATEGORY}/training",
            is_output_node=True, hidden=[io.Hidden.unique_id],
            description=(
                "Trains one safety expert (a LoRA on the UNet's attention projections) with Diffusion-DPO on the "
                "MODEL in this graph: for each unsafe prompt of the pairs dataset, the safe image is preferred and "
                "the unsafe image rejected. The reference model is the same UNet with the LoRA off. Checkpoints are "
                "kept in output/safetydpo_training/<name>; Cancel stops within one step and keeps the last "
                "checkpoint (turn on resume to continue). The expert is saved to "
                "models/safety_experts/<name>.safetensors (kohya format) and output for Merge/Apply nodes. This node "
                "trains in the ComfyUI process on one device. For more than one GPU (or machine), run the "
                "command-line trainer with accelerate from the extension's folder, e.g. `accelerate launch "
                "--num_processes 4 trainer/train.py --model <checkpoint> --pairs <pairs folder> --output <run "
                "folder>` (data parallel), or add --per-category to train one expert per GPU at once (README: More "
                "than one GPU)."),
            inputs=[
                io.Model.Input("model", tooltip=("The model to align (SD1.5, SD2.1 or SDXL). Its UNet is trained; "
                                                 "LoRAs already applied to it stay part of the base.")),
                io.Clip.Input("clip", tooltip="Text encoder of the model, used once to encode the prompts."),
                io.Vae.Input("vae", tooltip="VAE of the model, used once to encode the pair images to latents."),
                io.String.Input("pairs_folder", default=DEFAULT_PAIRS, tooltip=(
                    "The dataset_name given to Build Safety Pairs (it writes output/safety_pairs/<name>), or its "
                    "dataset_path output, or any folder with a manifest.json relative to ComfyUI's input/ or "
                    "output/ folder.")),
                io.String.Input("expert_name", default="safety_expert", tooltip=(
                    "File name of the expert (models/safety_experts/<name>.safetensors) and of its checkpoint "
                    "folder; other characters than letters, digits, '_', '-', '.' become '_'.")),
                io.String.Input("category", default="", tooltip=(
                    "Train on the pairs of this category only (e.g. Violence); empty = all pairs (one expert on "
                    "all data).")),
                io.Int.Input("steps", default=300, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-6, round=False,
                               tooltip="AdamW learning rate of the LoRA (official recipe: 1e-5)."),
                io.Int.Input("batch_size", default=2, min=1, max=64, tooltip=(
                    "Pairs per step (each pair = winner + loser). Lower it if out of memory.")),
                io.Int.Input("rank", default=4, min=1, max=128, tooltip="LoRA rank (official recipe: 4)."),
                io.Float.Input("alpha", default=4.0, min=0.01, max=1024.0,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank."),
                io.Float.Input("dpo_beta", default=5000.0, min=0.0, max=1e6, step=10.0, tooltip=(
                    "DPO β with the ½ inside: loss = −log σ(−β/2 · d) (official recipe: 5000).")),
                io.Float.Input("sft_weight", default=0.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of a plain denoising loss on the preferred (safe) image."),
                io.Float.Input("preservation_weight", default=0.0, min=0.0, max=100.0, step=0.01, tooltip=(
                    "Weight of the replay term: on the dataset's safe prompts, stay close to the frozen model "
                    "(needs replay items in the dataset).")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed for noise, timesteps and data order."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000, tooltip=(
                    "Save a resumable checkpoint every N steps (0 = only at the end).")),
                io.Boolean.Input("resume", default=False, tooltip=(
                    "Continue from the last checkpoint of this expert_name instead of starting over.")),
                io.Combo.Input("mixed_precision", optional=True, options=["auto", "no", "fp16", "bf16"], default="auto",
                               tooltip="Autocast of the UNet (LoRA weights stay fp32). auto: the model's own dtype."),
                io.Combo.Input("recipe", optional=True, options=[*recipes.RECIPES, recipes.CUSTOM],
                               default=recipes.DEFAULT_RECIPE, tooltip=(
                                   "Training preset; it sets rank, alpha, learning_rate, dpo_beta, sft_weight and "
                                   "preservation_weight (those widgets count only with 'custom'). " +
                                   " ".join(f"{k}: {v}." for k, v in recipes.DESCRIPTIONS.items()))),
            ],
            outputs=[
                SafetyExpertChain.Output("expert", display_name="expert", tooltip=(
                    "The trained expert (weight 1.0), ready for Merge / Apply Safety Experts.")),
                io.String.Output("expert_path", display_name="expert_path", tooltip="Where the expert file was saved."),
            ])

    @classmethod
    def execute(cls, model, clip, vae, pairs_folder, expert_name, category, steps, learning_rate, batch_size, rank,
                alpha, dpo_beta, sft_weight, preservation_weight, seed, checkpoint_every, resume,
                mixed_precision="auto", recipe=recipes.CUSTOM) -> io.NodeOutput:
        name = names.safe_name(expert_name, "expert_name", TrainingError)
        categories = [category.strip()] if category and category.strip() else None
        pairs = load_pairs(bridge.pairs_folder(pairs_folder), categories=categories)
        precision = bridge.training_precision(model, mixed_precision)
        widgets = dict(rank=rank, alpha=alpha, learning_rate=learning_rate, dpo_beta=dpo_beta, sft_weight=sft_weight,
                       preservation_weight=preservation_weight)  # an API graph without 'recipe' means its widgets
        preset = recipes.recipe_settings(recipe) if recipe != recipes.CUSTOM else widgets
        config = TrainingConfig(**preset, expert_name=name, categories=tuple(categories or pairs.categories),
                                max_steps=steps, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every,
                                mixed_precision=precision)
        recipes.require_replay(config, pairs, "" if recipe == recipes.CUSTOM else recipe,
                               f"pairs folder {pairs_folder!r}")
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        result = bridge.train_expert(model, clip, vae, pairs, config, bridge.training_run_folder(name), resume, node_id)
        target = bridge.experts_folder() / f"{name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        path = save_expert(result.expert, target)
        log.info("Train Safety Expert: saved %s (%d steps, %.0f s)", path, result.steps, result.seconds)
        return io.NodeOutput((ExpertChoice(result.expert, 1.0, str(path)),), str(path))


class DistillSafetyExperts(io.ComfyNode):
    """Distill Safety Experts: the experts merged into one LoRA by teaching it their predictions (distillation)."""

    @classmethod
    def define_schema(cls):
        defaults = DistillationSettings()
        return io.Schema(
            node_id="SafetyDPODistillExperts", display_name="Distill Safety Experts", category=EXPERTS_CATEGORY,
            is_output_node=True, hidden=[io.Hidden.unique_id],
            description=(
                "Merges safety experts into one LoRA by distillation: a new LoRA on the MODEL is trained to predict "
                "what each expert predicts on its own category's pairs, and what the base model predicts on the "
                "dataset's replay items (safe prompts). Unlike weight merges, which add some of every expert to "
                "every prompt, it learns to act where each expert acts and nowhere else (on the built-in demo: "
                "docs/demo.md). Per-concept weights: an expert's weight scales its target; 0 leaves that concept "
                "as the base model draws it. Needs the pairs dataset the experts were trained on, with replay "
                "items. Trains in the ComfyUI process (progress bar; Cancel stops within one step) and saves to "
                "models/safety_experts/<name>.safetensors. Command line: trainer/merge.py distill."),
            inputs=[
                io.Model.Input("model", tooltip="The model the experts were trained on (SD1.5, SD2.1 or SDXL)."),
                io.Clip.Input("clip", tooltip="Text encoder of the model, used once to encode the prompts."),
                io.Vae.Input("vae", tooltip="VAE of the model, used once to encode the pair images to latents."),
                SafetyExpertChain.Input("experts", tooltip=("The experts to merge, with their per-concept weights "
                                                            "(chain of Load Safety Expert nodes).")),
                io.String.Input("pairs_folder", default=DEFAULT_PAIRS, tooltip=(
                    "The pairs dataset the experts were trained on (Build Safety Pairs' dataset_name, or a folder "
                    "with a manifest.json relative to ComfyUI's input/ or output/ folder); it needs replay items.")),
                io.String.Input("name", default="safety_distilled", tooltip=(
                    "File name of the result (models/safety_experts/<name>.safetensors).")),
                io.Int.Input("steps", default=defaults.steps, min=1, max=100000, tooltip="Training steps."),
                io.Int.Input("rank", default=defaults.rank, min=1, max=256, tooltip="LoRA rank of the result."),
                io.Float.Input("learning_rate", default=defaults.learning_rate, min=1e-7, max=1e-1, step=1e-5,
                               round=False, tooltip="AdamW learning rate (cosine decay to 0)."),
                io.Int.Input("batch_size", default=defaults.batch_size, min=1, max=256, tooltip=(
                    "Concept samples per step (half as many safe samples). Lower it if out of memory.")),
                io.Int.Input("draws", default=defaults.draws, min=1, max=64, tooltip=(
                    "Noise draws per image when the experts' predictions are recorded (memory grows with it).")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed for noise, timesteps and order."),
            ],
            outputs=[
                SafetyExpertChain.Output("merged", display_name="merged", tooltip="The distilled expert (weight 1)."),
                io.String.Output("expert_path", display_name="expert_path", tooltip="Where the result was saved."),
            ])

    @classmethod
    def execute(cls, model, clip, vae, experts, pairs_folder, name, steps, rank, learning_rate, batch_size, draws,
                seed) -> io.NodeOutput:
        file_name = names.safe_name(name, "name", MergeError)
        chain = check_chain(experts)
        pairs = load_pairs(bridge.pairs_folder(pairs_folder))
        settings = DistillationSettings(steps=steps, rank=rank, learning_rate=learning_rate, batch_size=batch_size,
                                        replay_batch_size=max(batch_size // 2, 1), draws=draws, seed=seed)
        settings.validate()
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        merged = bridge.distill_experts(model, clip, vae, pairs, [c.expert for c in chain], [c.weight for c in chain],
                                        settings, bridge.training_run_folder(file_name), file_name, node_id)
        target = bridge.experts_folder() / f"{file_name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        path = save_expert(merged, target)
        result = (ExpertChoice(merged, 1.0, str(path)),)
        log.info("Distill Safety Experts: saved %s", path)
        return io.NodeOutput(result, str(path), ui={"text": [describe_chain(result)]})


NODES = [TrainSafetyExpertDPO, DistillSafetyExperts]
