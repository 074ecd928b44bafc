"""ComfyUI nodes for safety experts: load, merge (Co-Merge, least squares, baselines), calibrate, apply, save.

V3 schema (``comfy_api.latest``): each node is an ``io.ComfyNode`` with ``define_schema`` and an
``execute`` classmethod of short glue; everything that touches ComfyUI itself is in ``comfyui_bridge``.
Shared by the other node modules:

- ``SafetyExpertChain``: the custom type ``SAFETY_EXPERT``, a tuple of ``ExpertChoice(expert, weight,
  source)`` (a chain that every Load node extends);
- ``check_chain``, ``describe_chain``: the chain's checks and its one-line-per-expert text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Sequence, Tuple

from comfy_api.latest import io

from . import comfyui_bridge as bridge
from .comfyui_safetydpo import calibration, least_squares_merge, least_squares_statistics, lora_files, merging
from .comfyui_safetydpo.concepts import load_concept_file
from .comfyui_safetydpo.errors import LoraFormatError, MergeError, SafetyDPOError
from .comfyui_safetydpo.expert import SafetyExpert

log = logging.getLogger(__name__)

SafetyExpertChain = io.Custom("SAFETY_EXPERT")
"""Custom ComfyUI type: a tuple of ``ExpertChoice`` (experts with their per-concept weights)."""
SafetyStatistics = io.Custom("SAFETY_STATISTICS")
"""Custom ComfyUI type: ``calibration.CalibrationStatistics`` (Co-Merge) or
``least_squares_merge.LayerInputStatistics`` (least squares); the merge refuses the wrong kind by name."""

CATEGORY = "safetydpo"
EXPERTS_CATEGORY = f"{CATEGORY}/experts"
MERGE_METHODS = ("co_merge", "least_squares", "linear", "svd", "ties", "dare", "dare_ties", "magnitude_prune")
STATISTICS_METHODS = ("co_merge", "least_squares")


@dataclasses.dataclass(frozen=True)
class ExpertChoice:
    """One expert in a SAFETY_EXPERT chain: the expert, its per-concept weight, where it came from."""

    expert: SafetyExpert
    weight: float
    source: str


def check_chain(chain) -> Tuple[ExpertChoice, ...]:
    """The 'experts' input as a tuple of ExpertChoice, or a MergeError saying what to connect."""
    if not chain:
        raise MergeError(bridge.NO_EXPERTS)
    for choice in chain:
        if not isinstance(choice, ExpertChoice):
            raise MergeError(f"the 'experts' input holds {type(choice).__name__}, not a safety expert; "
                             "connect a Load Safety Expert or Merge Safety Experts node")
    return tuple(chain)


def check_weight(weight, label: str = "") -> float:
    weight = float(weight)
    if not (weight >= 0 and weight == weight):
        raise MergeError(f"{label}weight {weight} must be ≥ 0 (0 leaves the expert out)")
    return weight


def describe_chain(chain: Sequence[ExpertChoice]) -> str:
    """One line per expert: weight, name, categories, architecture, modules, source file."""
    return "\n".join(f"w={c.weight:g}  {c.expert.describe()}  [{c.source}]" for c in chain)


def chain_as_expert(chain: Sequence[ExpertChoice]) -> SafetyExpert:
    """One expert for a chain: the expert itself at weight 1, else the exact weighted sum (linear merge)."""
    chain = check_chain(chain)
    if len(chain) == 1 and chain[0].weight == 1.0:
        return chain[0].expert
    return merging.merge_experts([c.expert for c in chain], [c.weight for c in chain], "linear",
                                 name="+".join(c.expert.name for c in chain))


def load_choice(choice_name: str, weight: float) -> ExpertChoice:
    """The expert file chosen in a dropdown; statistics files and unreadable files are named."""
    _, path = bridge.resolve_model_file(choice_name)
    try:
        metadata = lora_files.read_safetensors(path)[1]
    except LoraFormatError as error:
        raise LoraFormatError(f"{choice_name}: {error}") from None
    if metadata.get("safetydpo_kind") in (calibration.STATISTICS_KIND, least_squares_merge.STATISTICS_KIND):
        raise LoraFormatError(
            f"{choice_name} is a merge statistics file, not an expert; choose it in the 'statistics_file' "
            "input of Merge Safety Experts")
    try:
        expert = lora_files.load_expert(path)
    except SafetyDPOError as error:
        raise type(error)(f"{choice_name}: {error} — choose a LoRA/expert .safetensors file") from None
    return ExpertChoice(expert, float(weight), choice_name)


def statistics_from_file(method: str, statistics_file: str):
    """The chosen statistics file for a statistics-based merge, or a message saying which node makes it."""
    if statistics_file in (None, "", bridge.NO_STATISTICS):
        if method == "least_squares":
            raise MergeError(
                "the least-squares merge needs layer statistics: connect a Record Least-Squares Statistics node to "
                "'statistics' or choose a statistics file, or pick another method (e.g. linear)")
        raise MergeError(
            "Co-Merge needs calibration statistics: connect a Compute Co-Merge Statistics node to "
            "'statistics' or choose a statistics file, or pick another method (e.g. linear)")
    return bridge.load_statistics_file(statistics_file)


def recipe_summary(recipe_json: str) -> str:
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


def parse_timesteps(timesteps: str) -> list:
    try:
        steps = [int(t) for t in str(timesteps).replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise MergeError(f"timesteps {timesteps!r} must be whole numbers separated by commas") from None
    if not steps or any(not 0 <= t <= 999 for t in steps):
        raise MergeError(f"timesteps {timesteps!r}: give one or more values between 0 and 999")
    return steps


def text_lines(text: str) -> list:
    """Non-empty lines of a text widget, without '#' comment lines."""
    return [line.strip() for line in str(text or "").splitlines() if line.strip() and not line.strip().startswith("#")]


def concept_file_pairs(experts: Sequence[SafetyExpert], concept_file: str):
    """The prompt pairs of an optional concept file in ComfyUI's input folder (none when the widget is empty)."""
    if not (concept_file and concept_file.strip()):
        return ()
    path = bridge.input_file(concept_file, "concept file", MergeError,
                             "; put the .csv / .yaml / .txt concept list there (columns unsafe_prompt, "
                             "safe_prompt, category)")
    return load_concept_file(path, extra_categories=sorted({c for e in experts for c in e.categories}))


def least_squares_prompts(experts: Sequence[SafetyExpert], concept_prompts: str, concept_file: str,
                          safe_prompts: str):
    """(prompts per expert name, safe prompts) from 'Category: prompt' lines, a concept file and safe lines."""
    pairs = concept_file_pairs(experts, concept_file)
    prompts = least_squares_statistics.merge_prompts(pairs, concept_prompts, text_lines(safe_prompts),
                                                     source="Record Least-Squares Statistics concept_prompts")
    return least_squares_statistics.prompts_per_expert(experts, prompts.concept), prompts.safe


def image_size_inputs(maximum: int = 4096, width_tip: str = "Image width.", height_tip: str = "Image height."):
    return [io.Int.Input("width", default=512, min=64, max=maximum, step=8, tooltip=width_tip),
            io.Int.Input("height", default=512, min=64, max=maximum, step=8, tooltip=height_tip)]


# -- nodes -------------------------------------------------------------------------------------

class LoadSafetyExpert(io.ComfyNode):
    """Load Safety Expert: one expert file plus its per-concept weight, appended to a chain."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPOLoadExpert", display_name="Load Safety Expert", category=EXPERTS_CATEGORY,
            description=("Loads a safety expert (a LoRA trained with SafetyDPO for some harm categories) and adds it "
                         "with a weight to a chain. Chain several to merge or apply them together; the "
                         "description output lists each expert's categories from its metadata."),
            inputs=[
                io.Combo.Input("expert_name", options=bridge.expert_file_choices(), tooltip=(
                    "Expert LoRA file: models/safety_experts/ (or its extra_model_paths.yaml entry) "
                    "or models/loras/. Kohya, ComfyUI and PEFT/diffusers keys are read.")),
                io.Float.Input("weight", default=1.0, min=0.0, max=10.0, step=0.05, tooltip=(
                    "Per-concept weight of this expert in the merge or when applied (0 leaves it out).")),
                SafetyExpertChain.Input("experts", optional=True,
                                        tooltip="Experts loaded before; this expert is added to the chain."),
            ],
            outputs=[
                SafetyExpertChain.Output("experts", display_name="experts",
                                         tooltip="The chain of experts with their weights."),
                io.String.Output("description", display_name="description",
                                 tooltip="Name, categories, architecture and size of every expert in the chain."),
            ])

    @classmethod
    def fingerprint_inputs(cls, expert_name, weight, experts=None):
        return bridge.model_file_stamp(expert_name)

    @classmethod
    def execute(cls, expert_name, weight, experts=None) -> io.NodeOutput:
        weight = check_weight(weight, f"{expert_name}: ")
        chain = check_chain(experts) if experts is not None else ()
        choice = load_choice(expert_name, weight)
        for earlier in chain:
            if earlier.expert.name == choice.expert.name:
                raise MergeError(
                    f"{expert_name}: an expert named {choice.expert.name!r} is already in the chain (from "
                    f"{earlier.source}); load each expert once (experts are told apart by name)")
        chain = chain + (choice,)
        text = describe_chain(chain)
        return io.NodeOutput(chain, text, ui={"text": [text]})


class MergeSafetyExperts(io.ComfyNode):
    """Merge Safety Experts: Co-Merge or a baseline over the chain's experts and weights."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPOMergeExperts", display_name="Merge Safety Experts", category=EXPERTS_CATEGORY,
            description=("Merges safety experts into one. Co-Merge (the SafetyDPO paper's method) keeps, for each "
                         "output unit, only the expert that is most active on calibration prompts, scaled by its "
                         "weight; it needs statistics from Compute Co-Merge Statistics. Least squares solves, per "
                         "layer, for the update that acts like each expert on its own concept's prompts and like "
                         "the base model on safe prompts (weight 0 keeps that concept as the base model draws it); "
                         "it needs Record Least-Squares Statistics. Linear, SVD, TIES and DARE are the usual "
                         "baselines."),
            inputs=[
                SafetyExpertChain.Input("experts", tooltip=("The experts to merge, with their per-concept weights "
                                                            "(chain of Load Safety Expert nodes).")),
                io.Combo.Input("method", options=list(MERGE_METHODS), default="co_merge", tooltip=(
                    "co_merge: per output unit keep the most active expert (needs statistics); "
                    "least_squares: per layer the update that reproduces each expert on its own "
                    "concept's prompts and changes nothing on safe prompts (needs Record Least-Squares "
                    "Statistics); linear: weighted sum (exact); svd: weighted sum truncated to 'rank'; ties / dare "
                    "/ dare_ties / magnitude_prune: sparsified sums (peft).")),
                io.Int.Input("rank", default=0, min=0, max=1024, tooltip=(
                    "Target LoRA rank for svd (0 = 8), ties, dare, magnitude_prune and element "
                    "Co-Merge (0 = exact full differences). Ignored by linear and row Co-Merge, which are exact.")),
                io.Combo.Input("granularity", options=["row", "element"], default="row", tooltip=(
                    "Co-Merge only: pick the winning expert per output unit (row, exact LoRA) or per weight "
                    "(element).")),
                io.Float.Input("density", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="ties / dare / magnitude_prune: fraction of each update kept."),
                io.Int.Input("drop_seed", default=0, min=0, max=2**31 - 1, tooltip=(
                    "dare / dare_ties: seed of the random drop (fixed, so a merge repeats exactly).")),
                io.String.Input("name", default="safety_merged",
                                tooltip="Name of the merged expert (stored in its metadata)."),
                io.Combo.Input("statistics_file", options=bridge.statistics_file_choices(), tooltip=(
                    "Statistics saved by Compute Co-Merge Statistics (co_merge) or Record Least-Squares "
                    "Statistics (least_squares) in models/safety_experts/statistics/. Ignored when the "
                    "'statistics' input is connected.")),
                SafetyStatistics.Input("statistics", optional=True, tooltip=(
                    "Statistics from Compute Co-Merge Statistics (co_merge) or Record Least-Squares "
                    "Statistics (least_squares).")),
                io.Float.Input("preserve_weight", optional=True, default=least_squares_merge.DEFAULT_PRESERVE_WEIGHT,
                               min=0.0, max=1000.0, step=0.1, tooltip=(
                                   "least_squares only (λ): how much keeping safe-prompt images unchanged counts "
                                   "against reproducing each expert on its own concept's prompts. Higher = less "
                                   "change on safe prompts, possibly weaker removal; 0 = only the concepts count.")),
            ],
            outputs=[
                SafetyExpertChain.Output("merged", display_name="merged", tooltip="The merged expert (weight 1)."),
                io.String.Output("recipe", display_name="recipe",
                                 tooltip="The merge recipe as JSON (method, weights, wins)."),
            ])

    @classmethod
    def execute(cls, experts, method, rank, granularity, density, drop_seed, name, statistics_file,
                statistics=None, preserve_weight=least_squares_merge.DEFAULT_PRESERVE_WEIGHT) -> io.NodeOutput:
        seed, chain = int(drop_seed), check_chain(experts)
        if method not in MERGE_METHODS:
            raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
        if method in STATISTICS_METHODS and statistics is None:
            statistics = statistics_from_file(method, statistics_file)
        options = {"co_merge": {"granularity": granularity}, "least_squares": {"preserve_weight": preserve_weight},
                   "ties": {"density": density}, "dare": {"density": density, "seed": seed},
                   "dare_ties": {"density": density, "seed": seed},
                   "magnitude_prune": {"density": density}}.get(method, {})
        merged = merging.merge_experts([c.expert for c in chain], [c.weight for c in chain], method,
                                       statistics=statistics if method in STATISTICS_METHODS else None,
                                       rank=int(rank) if rank else None, name=(name or "safety_merged").strip(),
                                       **options)
        if not merged.categories:
            merged.categories = sorted({c for choice in chain if choice.weight > 0 for c in choice.expert.categories})
        recipe = merged.metadata.get(merging.RECIPE_KEY, "{}")
        source = f"merged ({method}) of " + ", ".join(c.source for c in chain if c.weight > 0)
        result = (ExpertChoice(merged, 1.0, source),)
        text = describe_chain(result) + "\n" + recipe_summary(recipe)
        return io.NodeOutput(result, recipe, ui={"text": [text]})


class ComputeCoMergeStatistics(io.ComfyNode):
    """Compute Co-Merge Statistics: run the model with each expert alone on noisy latents of the prompts."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPOComputeCoMergeStatistics", display_name="Compute Co-Merge Statistics",
            category=EXPERTS_CATEGORY,
            description=("Measures how active each expert is in each layer: the UNet runs on noisy latents of the "
                         "prompts at the given timesteps with one expert applied at a time. Co-Merge uses this to "
                         "keep the most active expert per output unit. Weights are restored exactly afterwards."),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint the experts were trained on (its UNet is run)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the calibration prompts."),
                SafetyExpertChain.Input("experts", tooltip="The experts to measure (chain of Load Safety Expert)."),
                io.String.Input("prompts", multiline=True, default="", tooltip=(
                    "Calibration prompts, one per line, from every category the experts cover.")),
                io.String.Input("timesteps", default="100, 300, 500, 700, 900", tooltip=(
                    "Diffusion timesteps (0–999) at which the UNet is run, comma separated.")),
                *image_size_inputs(width_tip="Image width of the noisy latents (pixels).",
                                   height_tip="Image height of the noisy latents (pixels)."),
                io.Int.Input("latent_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the latents and noise (the same for every expert)."),
                io.String.Input("save_name", default="", tooltip=(
                    "If set, also save to models/safety_experts/statistics/<save_name>.safetensors "
                    "for re-merging without this node.")),
            ],
            outputs=[
                SafetyStatistics.Output("statistics", display_name="statistics",
                                        tooltip="Per-expert, per-layer activation statistics for Co-Merge."),
                io.String.Output("summary", display_name="summary", tooltip="What was measured."),
            ])

    @classmethod
    def execute(cls, model, clip, experts, prompts, timesteps, width, height, latent_seed,
                save_name) -> io.NodeOutput:
        seed, chain = int(latent_seed), check_chain(experts)
        prompt_list = [p.strip() for p in str(prompts).splitlines() if p.strip()]
        if not prompt_list:
            raise MergeError("Compute Co-Merge Statistics needs prompts (one per line, of every category the "
                             "experts cover)")
        steps = parse_timesteps(timesteps)
        save_path = bridge.statistics_save_path(save_name)
        bridge.check_experts_fit(chain, model, clip)
        statistics = bridge.collect_comfy_statistics(model, clip, [c.expert for c in chain], prompt_list, steps,
                                                     width, height, seed)
        if save_path:
            statistics.save(save_path)
        summary = (f"statistics of {len(chain)} experts on {len(prompt_list)} prompts × {len(steps)} "
                   f"timesteps ({width}×{height}, seed {seed})" + (f"; saved to {save_path}" if save_path else ""))
        return io.NodeOutput(statistics, summary, ui={"text": [summary]})


class RecordLeastSquaresStatistics(io.ComfyNode):
    """Record Least-Squares Statistics: sample each expert's concept prompts with it applied, safe prompts without."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPORecordLeastSquaresStatistics", display_name="Record Least-Squares Statistics",
            category=EXPERTS_CATEGORY,
            description=("Records what the least-squares merge needs: the layer inputs while the model, with one "
                         "expert applied at a time, samples that expert's own concept prompts, and while the base "
                         "model samples safe prompts. Connect it to Merge Safety Experts (method least_squares). "
                         "Weights are restored exactly afterwards."),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint the experts were trained on (it is sampled)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the prompts."),
                SafetyExpertChain.Input("experts", tooltip=("The experts to merge (chain of Load Safety Expert); "
                                                            "each draws the prompts of the categories it records.")),
                io.String.Input("concept_prompts", multiline=True, default="", tooltip=(
                    "Unsafe prompts of each expert's concept, one 'Category: prompt' per line (e.g. "
                    "'Violence: a bloody street fight'); # starts a comment. Added to concept_file.")),
                io.String.Input("concept_file", default="", tooltip=(
                    "Optional concept list in ComfyUI's input folder (.csv / .yaml / .txt with "
                    "unsafe_prompt, safe_prompt, category): unsafe prompts go to the experts of their "
                    "category, safe rewrites to the safe prompts.")),
                io.String.Input("safe_prompts", multiline=True, default="", tooltip=(
                    "Prompts whose images must not change, one per line (besides the concept file's safe "
                    "rewrites).")),
                io.Int.Input("steps", default=least_squares_statistics.DEFAULT_STEPS, min=1, max=200,
                             tooltip="Sampling steps per image (the layer inputs of every step count)."),
                io.Float.Input("cfg", default=least_squares_statistics.DEFAULT_GUIDANCE, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance, as you sample with the model."),
                io.Combo.Input("sampler_name", options=bridge.sampler_names(), tooltip="Sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=bridge.scheduler_names(), tooltip="Scheduler, as in KSampler."),
                *image_size_inputs(),
                io.Int.Input("images_per_prompt", default=least_squares_statistics.DEFAULT_IMAGES_PER_PROMPT,
                             min=1, max=64, tooltip="Images drawn per prompt."),
                io.Int.Input("sampling_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Noise seed (the same for every prompt and expert)."),
                io.String.Input("save_name", default="", tooltip=(
                    "If set, also save to models/safety_experts/statistics/<save_name>.safetensors "
                    "for re-merging with other weights or λ without this node.")),
            ],
            outputs=[
                SafetyStatistics.Output("statistics", display_name="statistics",
                                        tooltip="Per-layer input statistics for the least-squares merge."),
                io.String.Output("summary", display_name="summary", tooltip="What was recorded."),
            ])

    @classmethod
    def execute(cls, model, clip, experts, concept_prompts, concept_file, safe_prompts, steps, cfg, sampler_name,
                scheduler, width, height, images_per_prompt, sampling_seed, save_name) -> io.NodeOutput:
        chain = check_chain(experts)
        experts_list = [c.expert for c in chain]
        save_path = bridge.statistics_save_path(save_name)
        per_expert, safe = least_squares_prompts(experts_list, concept_prompts, concept_file, safe_prompts)
        bridge.check_experts_fit(chain, model, clip)
        statistics = bridge.collect_comfy_least_squares_statistics(
            model, clip, experts_list, per_expert, safe, steps, cfg, sampler_name, scheduler, width, height,
            images_per_prompt, sampling_seed)
        if save_path:
            statistics.save(save_path)
        counts = ", ".join(f"{name} {len(p)}" for name, p in per_expert.items())
        summary = (f"least-squares statistics of {len(experts_list)} experts (concept prompts: {counts}; safe "
                   f"prompts: {len(safe)}; {images_per_prompt} images × {steps} steps, cfg {cfg}, seed "
                   f"{sampling_seed})" + (f"; saved to {save_path}" if save_path else ""))
        return io.NodeOutput(statistics, summary, ui={"text": [summary]})


class ApplySafetyExperts(io.ComfyNode):
    """Apply Safety Experts: patched clones of MODEL (and CLIP); the inputs stay as they were."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPOApplyExperts", display_name="Apply Safety Experts", category=EXPERTS_CATEGORY,
            description=("Applies safety experts to a model through ComfyUI's own LoRA patching (clone + "
                         "add_patches): the same result as saving them with Save Safety LoRA and loading that file "
                         "with LoraLoader. Experts of another architecture or model are refused with a message."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to make safer (SD1.5, SD2.1 or SDXL)."),
                SafetyExpertChain.Input("experts", tooltip=(
                    "Experts to apply (a merged expert, or a chain applied as a weighted sum).")),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05, tooltip=(
                    "Overall strength; each expert is applied at strength × its weight. 0 returns the inputs "
                    "unchanged.")),
                io.Clip.Input("clip", optional=True,
                              tooltip="Needed only when an expert also changes the text encoder."),
            ],
            outputs=[
                io.Model.Output("model", display_name="model",
                                tooltip="The patched model (the input MODEL is unchanged for other branches)."),
                io.Clip.Output("clip", display_name="clip",
                               tooltip="The patched CLIP, or the input CLIP when the experts do not change it."),
            ])

    @classmethod
    def execute(cls, model, experts, strength, clip=None) -> io.NodeOutput:
        return io.NodeOutput(*bridge.apply_experts(model, clip, check_chain(experts), float(strength)))


class ApplySafetyExpertsByPrompt(io.ComfyNode):
    """Apply Safety Experts by Prompt: each expert only when the prompt carries its concept."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPOApplyExpertsByPrompt", display_name="Apply Safety Experts by Prompt",
            category=EXPERTS_CATEGORY,
            description=("Applies each safety expert only when the prompt carries its concept, judged from CLIP's "
                         "token states and token embeddings (a small classifier fitted to the expert's own training "
                         "prompt pairs, stored "
                         "in experts this pack trains): a safe prompt gets the unchanged model, a prompt with one "
                         "concept gets that concept's expert alone. Merging every expert into every prompt is what "
                         "changed safe prompts on the demo world (docs/demo.md). Feed it the same text as your "
                         "positive prompt. It reads the text encoder, not words, but a wording the encoder maps "
                         "elsewhere is missed: check the report on your own paraphrases."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to make safer (SD1.5, SD2.1 or SDXL)."),
                io.Clip.Input("clip", tooltip="The CLIP you encode the prompt with (the gate reads its states)."),
                SafetyExpertChain.Input("experts", tooltip=(
                    "The experts to gate (a Load Safety Expert chain); each weight is used where its concept is "
                    "found.")),
                io.String.Input("prompt", multiline=True, default="", tooltip=(
                    "The positive prompt you sample with: convert the CLIP Text Encode text to an input and connect "
                    "the same string to both.")),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05, tooltip=(
                    "Overall strength of the experts that are on; 0 returns the inputs unchanged.")),
                io.String.Input("concept_file", default="", optional=True, tooltip=(
                    "Only for experts without stored reference prompts (older files, other tools): a concept list "
                    "in ComfyUI's input folder (CSV/YAML/text: unsafe prompt, safe prompt, category); the pairs "
                    "that share an expert's category become its references.")),
                io.String.Input("safe_prompts", multiline=True, default="", optional=True, tooltip=(
                    "More prompts that must never turn an expert on, one per line (# starts a comment).")),
            ],
            outputs=[
                io.Model.Output("model", display_name="model", tooltip=(
                    "The model with the experts whose concept the prompt carries (unchanged when none).")),
                io.Clip.Output("clip", display_name="clip", tooltip=(
                    "The patched CLIP when an expert that is on changes the text encoder, else the input CLIP.")),
                io.String.Output("report", display_name="report", tooltip=(
                    "One line per expert: on/off and the gate's score (on above 0.5).")),
            ])

    @classmethod
    def execute(cls, model, clip, experts, prompt, strength, concept_file="", safe_prompts="") -> io.NodeOutput:
        chain = check_chain(experts)
        pairs = concept_file_pairs([c.expert for c in chain], concept_file)
        model, clip, report = bridge.apply_experts_by_prompt(model, clip, chain, prompt, float(strength), pairs,
                                                             text_lines(safe_prompts))
        return io.NodeOutput(model, clip, report, ui={"text": [report]})


class SaveSafetyLora(io.ComfyNode):
    """Save Safety LoRA: the (merged) expert as a kohya LoRA in models/loras for any LoRA loader."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyDPOSaveLora", display_name="Save Safety LoRA", category=EXPERTS_CATEGORY,
            is_output_node=True,
            description=("Writes the expert as a LoRA file (kohya keys with explicit alpha and metadata: name, "
                         "categories, architecture, merge recipe) to models/loras, where ComfyUI's LoraLoader, "
                         "A1111/Forge and diffusers load it."),
            inputs=[
                SafetyExpertChain.Input("experts", tooltip=(
                    "The expert to save; a chain of several is saved as their weighted sum (exact).")),
                io.String.Input("filename_prefix", default="safetydpo/safety_merged", tooltip=(
                    "File name inside models/loras (subfolders allowed); a counter and .safetensors are added. "
                    "Never leaves the loras folder.")),
            ],
            outputs=[io.String.Output("lora_name", display_name="lora_name", tooltip=(
                "The saved file's name relative to models/loras (what LoraLoader lists)."))])

    @classmethod
    def execute(cls, experts, filename_prefix) -> io.NodeOutput:
        expert = chain_as_expert(experts)
        path, relative = bridge.lora_save_path(filename_prefix)
        lora_files.save_expert(expert, path, key_format="kohya", uniform_alpha=True)
        text = f"saved {expert.describe()} to models/loras/{relative}"
        log.info("safetydpo: %s", text)
        return io.NodeOutput(relative, ui={"text": [text]})


NODES = [LoadSafetyExpert, MergeSafetyExperts, ComputeCoMergeStatistics, RecordLeastSquaresStatistics,
         ApplySafetyExperts, ApplySafetyExpertsByPrompt, SaveSafetyLora]
