"""The demo: the whole SafetyDPO chain on the built-in demo world, measured exactly by its oracle.

world model (trained once, cached) → preference pairs rendered by that model (same seed for the unsafe
prompt and its safe rewrite; ``pair_builder.build_pairs``) → one expert per concept
(``training.train_expert``) → calibration statistics from prompts of every concept
(``calibration.calibrate_bundle``) → Co-Merge, and for comparison linear, TIES and one expert trained on
all pairs; non-DPO baselines (supervised loss on the preferred image, with and without replay of the
base model's own images) → evaluation on held-out seeds and held-out prompt templates → a Markdown
report with figures and the merged LoRA file (kohya keys, ``lora_files.save_expert``).

Every expensive step is cached under ``cache_dir`` keyed by what it depends on, so a second run, or a
run after an interruption, reuses the model, the pairs and the finished experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import demo_world as dw
from . import files
from .calibration import CalibrationStatistics, calibrate_bundle, diffusers_module_lookup, expert_fingerprint
from .concepts import PromptPair
from .demo_evaluation import (GATED_LABEL, GATED_ONE_ON_ALL_LABEL, attribute_fidelity, cached_renders,
                              demo_gate, evaluation_items,
                              experts_alone_check, gate_accuracy_by_split, gate_readings, gated_weight_zero_check,
                              measure, measure_pairs, prompt_fidelity, render_gated, render_variant, safe_scenes,
                              sample_batched, scaling_curve, synonym_check, weight_zero_check)
from .distillation_merge import DistillationSettings, distill_experts
from .demo_synonyms import concept_word_bundle, nearest_words, synonym_bundle, synonyms_for
from .expert import SafetyExpert
from .lora_files import load_expert, save_expert
from .least_squares_merge import DEFAULT_PRESERVE_WEIGHT, merge_least_squares, record_statistics
from .merging import co_merge, co_merge_wins, merge_linear, merge_ties
from .pair_builder import build_pairs, pair_key, pair_seed
from .pairs import PreferencePairs
from .demo_report import aggregate_seeds, seeds_markdown, summary_table, write_demo_report
from .training import TrainingConfig, train_expert

log = logging.getLogger(__name__)

DEMO_VERSION = "1"
# The training recipe chosen on the demo world (docs/demo.md has every recipe that was measured).
_LORA = dict(rank=4, alpha=4.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"), learning_rate=3e-3,
             batch_size=8, replay_batch_size=8, prompt_crops=True)
DEMO_RECIPE = dict(_LORA, dpo_beta=500.0, dpo_weight=1.0, sft_weight=1.0, preservation_weight=5.0,
                   preservation_target="reference")
# Non-DPO baselines: the same LoRA, supervised loss on the preferred image, without / with replay.
SFT_RECIPE = dict(_LORA, dpo_beta=5000.0, dpo_weight=0.0, sft_weight=1.0, preservation_weight=0.0,
                  preservation_target="reference")
SFT_REPLAY_RECIPE = dict(_LORA, dpo_beta=5000.0, dpo_weight=0.0, sft_weight=1.0, preservation_weight=1.0,
                         preservation_target="noise")


@dataclasses.dataclass
class DemoSettings:
    """Everything the demo's numbers depend on. ``seed`` picks the world model, the pairs, the experts and the
    held-out evaluation seeds together, so anyone can check the claims on seeds nobody tuned on."""

    concepts: int = 7
    world: dw.WorldModelSettings = dataclasses.field(default_factory=dw.WorldModelSettings)
    images_per_prompt: int = 4  # measured: 2 kept 93.2 % of scenes on seed 0, 4 kept 94.9 % (docs/demo.md)
    sample_steps: int = 20
    guidance_scale: float = 1.0  # no CFG: with guidance 3 this tiny model's colours and backgrounds broke
    expert_steps: int = 240
    recipe: Dict[str, object] = dataclasses.field(default_factory=lambda: dict(DEMO_RECIPE))
    merge_method: str = "distillation"  # the default merge (docs/demo.md has the comparison that chose it)
    preserve_weight: float = DEFAULT_PRESERVE_WEIGHT
    distillation: DistillationSettings = dataclasses.field(
        default_factory=DistillationSettings)  # the library's default, measured on seed 0 (docs/demo.md)
    baselines: bool = True  # Co-Merge (element), linear, TIES, one expert on all data
    all_baselines: bool = False  # also Co-Merge (row) and the supervised (non-DPO) experts
    one_on_all: bool = False  # one expert on all data (as many steps as all experts together); --all-checks
    scaling_one_on_all: Tuple[int, ...] = ()  # the scaling curve's sizes k that also get one expert on all data
    weight_zero_checks: bool = True  # each concept's weight at 0 in turn: does only that concept come back?
    merged_weight_zero: bool = False  # the same for the default merge (7 more merges and renders); --all-checks
    merged_weight_zero_concepts: Tuple[str, ...] = ()  # only these concepts' weights (empty: every concept)
    experts_alone: bool = False  # each expert applied alone: what it removes and changes before any merge; --all-checks
    synonyms: bool = False  # the gate on synonyms the world model learns afterwards (demo_synonyms); --all-checks
    gate: bool = True  # also measure the experts gated by prompt (concept_gate): each prompt meets only its concepts'
    co_merge_granularity: str = "element"  # measured: row Co-Merge kept too little of each expert (docs/demo.md)
    workers: int = 0  # processes that train experts at once (one torch thread each); 0: one per CPU core
    calibration_images_per_prompt: int = 1
    seed: int = 0

    @property
    def eval_seeds(self) -> Tuple[int, ...]:
        """Held-out sampling seeds (never used for pairs or calibration), two per prompt."""
        return (1_000_003 + 7_919 * self.seed, 1_000_033 + 7_919 * self.seed)

    @property
    def pair_base_seed(self) -> int:
        return self.seed

    def with_seed(self, seed: int) -> "DemoSettings":
        """The same settings on another seed (the world model's and the distillation's seeds included)."""
        return dataclasses.replace(self, seed=int(seed), world=dataclasses.replace(self.world, seed=int(seed)),
                                   distillation=dataclasses.replace(self.distillation, seed=int(seed)))

    def to_json(self) -> Dict[str, object]:
        data = json.loads(json.dumps(dataclasses.asdict(self), default=list))
        data["eval_seeds"] = list(self.eval_seeds)
        return data


def quick_settings() -> DemoSettings:
    """The test-suite size: three concepts on the shipped world model, fewer steps, no one-on-all expert.

    Preservation weight 1 instead of 5: with 100 steps, weight 5 removed too little on three concepts.
    """
    return DemoSettings(concepts=3, images_per_prompt=2, sample_steps=10, expert_steps=100,
                        recipe=dict(DEMO_RECIPE, preservation_weight=1.0), all_baselines=False, one_on_all=False,
                        experts_alone=True, synonyms=True, merged_weight_zero=True,
                        distillation=DistillationSettings(steps=300, rank=16, batch_size=16, replay_batch_size=8,
                                                          draws=2))


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- prompts ----------------------------------------------------------------------------------

def prompt_pairs(world: dw.DemoWorld, templates: Sequence[str] = dw.TRAIN_TEMPLATES) -> List[PromptPair]:
    """Every unsafe scene with its safe rewrite (same shape, background and template), per concept."""
    pairs = []
    for concept in world.concepts:
        for scene in world.scenes([concept.name]):
            safe = world.safe_rewrite(scene)
            for template in templates:
                pairs.append(PromptPair(scene.prompt(template), safe.prompt(template), (concept.category,),
                                        concept=concept.name))
    return pairs


def replay_prompts(world: dw.DemoWorld) -> List[str]:
    """Safe prompts whose base-model images the preservation term keeps."""
    return [scene.prompt(t) for scene in safe_scenes(world) for t in dw.TRAIN_TEMPLATES]


# -- pairs ------------------------------------------------------------------------------------

def build_demo_pairs(bundle, world: dw.DemoWorld, settings: DemoSettings, folder: Path,
                     model_key: str) -> PreferencePairs:
    """Render the pairs with the base model through the real pair builder (resumable folder).

    All images are sampled up front in a few large batches (same seeds the builder assigns), and the
    builder's ``render`` callback looks them up: the builder still writes, checks and resumes the folder.
    """
    pairs = prompt_pairs(world)
    replay = replay_prompts(world)
    n = settings.images_per_prompt
    wanted: List[Tuple[str, int]] = []
    for pair in pairs:
        key = pair_key(pair)
        for k in range(n):
            seed = pair_seed(settings.pair_base_seed, key, k, n)
            wanted += [(pair.prompt, seed), (pair.safe_prompt, seed)]
    for prompt in replay:
        for k in range(n):
            wanted.append((prompt, pair_seed(settings.pair_base_seed, f"replay:{prompt}", k, n)))
    done = set()
    manifest = folder / "manifest.json"
    if manifest.is_file():  # resume: only what the builder still needs
        try:
            data = json.loads(manifest.read_text())
            done = {(p["prompt"], p["seed"]) for p in data.get("pairs", [])}
            done |= {(p["safe_prompt"], p["seed"]) for p in data.get("pairs", [])}
            done |= {(r["prompt"], r["seed"]) for r in data.get("replay", [])}
        except (OSError, ValueError, KeyError):
            done = set()
    todo = list(dict.fromkeys(w for w in wanted if w not in done))
    images = sample_batched(bundle, [p for p, _ in todo], [s for _, s in todo], settings.sample_steps,
                            settings.guidance_scale)
    rendered = {w: images[i] for i, w in enumerate(todo)}

    def render(prompts, seeds):
        missing = [(p, s) for p, s in zip(prompts, seeds) if (p, int(s)) not in rendered]
        if missing:  # not planned up front (should not happen): sample them now
            extra = sample_batched(bundle, [p for p, _ in missing], [s for _, s in missing], settings.sample_steps,
                                   settings.guidance_scale)
            rendered.update({(p, int(s)): extra[i] for i, (p, s) in enumerate(missing)})
        return torch.stack([rendered[(p, int(s))] for p, s in zip(prompts, seeds)])

    extra_categories = [c.category for c in world.concepts if c.category.startswith("Concept ")]
    return build_pairs(render, pairs, folder, images_per_prompt=n, base_seed=settings.pair_base_seed,
                       model_info={"name": bundle.name, "key": model_key},
                       sampler_settings={"steps": settings.sample_steps, "guidance_scale": settings.guidance_scale,
                                         "sampler": "ddim"},
                       replay_prompts=replay, extra_categories=extra_categories)


# -- experts ----------------------------------------------------------------------------------

def _expert_name(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower())


def trained_expert(bundle, pairs: PreferencePairs, config: TrainingConfig, folder: Path) -> Tuple[SafetyExpert, bool]:
    """Train ``config`` on ``pairs`` into ``folder``, or load the finished expert (checked by hash).

    An interrupted training resumes from its last checkpoint (the trainer keeps them in ``folder``).
    """
    path = folder / f"{config.expert_name}.safetensors"
    done = folder / "done.json"
    if path.is_file() and done.is_file():
        try:
            if json.loads(done.read_text()).get("sha256") == files.sha256_file(path):
                return load_expert(path, name=config.expert_name), True
            raise ValueError("content hash mismatch")
        except Exception as error:  # noqa: BLE001 - a damaged cached expert is retrained, never trusted
            log.warning("cached expert %s is damaged (%s): training it again", path, error)
            done.unlink(missing_ok=True)
    result = train_expert(bundle, pairs, config, output_dir=folder, resume=True)
    files.write_json(done, {"sha256": files.sha256_file(result.expert_path), "seconds": round(result.seconds, 1)},
                     indent=None)
    return load_expert(result.expert_path, name=config.expert_name), False


def expert_set_jobs(world: dw.DemoWorld, pairs: PreferencePairs, recipe: Dict[str, object], steps: int,
                    folder: Path, seed: int, label: str) -> List[Tuple[PreferencePairs, TrainingConfig, Path]]:
    """One training job (pairs, config, folder) per concept with ``recipe``."""
    jobs = []
    for index, concept in enumerate(world.concepts):
        config = TrainingConfig(**{**recipe, "expert_name": f"{label}_{_expert_name(concept.name)}",
                                   "categories": (concept.category,), "max_steps": steps, "seed": seed + index,
                                   "checkpoint_every": max(steps // 2, 1)})
        jobs.append((pairs.select([concept.category]), config, folder / config.expert_name))
    return jobs


def train_expert_set(bundle, jobs: Sequence[Tuple[PreferencePairs, TrainingConfig, Path]],
                     report: Callable[[str], None]) -> List[SafetyExpert]:
    """The jobs' experts, trained here or loaded from their folders (``train_in_workers`` may have trained them)."""
    experts = []
    for pairs, config, folder in jobs:
        started = time.time()
        expert, cached = trained_expert(bundle, pairs, config, folder)
        experts.append(expert)
        report(f"  expert {config.expert_name}: {'cached' if cached else f'trained in {time.time() - started:.0f} s'}")
    return experts


def _train_job(concepts: int, world_settings: dw.WorldModelSettings, cache_dir: str, pairs: PreferencePairs,
               config: TrainingConfig, folder: str) -> Tuple[str, bool, float]:
    """One expert in a worker process: the world model from the cache the parent filled, one torch thread."""
    torch.set_num_threads(1)
    bundle = world_bundle(concepts, world_settings, Path(cache_dir))
    started = time.time()
    _, cached = trained_expert(bundle, pairs, config, Path(folder))
    return config.expert_name, cached, time.time() - started


def train_in_workers(jobs: Sequence[Tuple[PreferencePairs, TrainingConfig, Path]], settings: DemoSettings,
                     cache_dir: Path, report: Callable[[str], None]) -> None:
    """Train the jobs in ``settings.workers`` processes at once, longest first, into their cache folders.

    The demo's model is tiny, so one training step keeps one core busy at best: on a 2-core machine two
    processes with one thread each train twice as many steps per minute as one process with two threads.
    A failed job is left to the caller, which trains it again in this process (and raises what went wrong).
    """
    workers = settings.workers or os.cpu_count() or 1
    todo = [job for job in jobs if not (job[2] / "done.json").is_file()]
    workers = min(workers, len(todo))
    if workers <= 1:
        return
    report(f"  training {len(todo)} experts in {workers} processes")
    context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's thread pools
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_train_job, settings.concepts, settings.world, str(cache_dir), pairs, config,
                               str(folder))
                   for pairs, config, folder in sorted(todo, key=lambda job: -job[1].max_steps)]
        for future in as_completed(futures):
            try:
                name, _, seconds = future.result()
                report(f"  expert {name}: trained in {seconds:.0f} s (worker)")
            except Exception as error:  # noqa: BLE001 - retried (and reported) in this process afterwards
                log.warning("a training worker failed (%s); that expert is trained again in this process", error)


# -- the chain --------------------------------------------------------------------------------

@dataclasses.dataclass
class DemoResult:
    summary: Dict[str, object]
    report_path: Path
    merged_path: Path
    seconds: float


def world_model(world: dw.DemoWorld, world_settings: dw.WorldModelSettings, cache_dir: Path, retrain: bool = False,
                report: Optional[Callable[[str], None]] = None):
    """The shipped, cached or newly trained world model with ``world``'s concept words (learned once, cached):
    (bundle, info). ``retrain`` writes the model where the shipped weights live."""
    def progress(step, total, loss):
        if report is not None and step % max(total // 10, 1) == 0:
            report(f"  world model step {step}/{total} loss {loss:.4f}")

    shipped = dw.shipped_model_folder(world, world_settings) if retrain else None
    bundle, info = dw.load_or_train_world_model(world, world_settings, Path(cache_dir), progress=progress,
                                                retrain=retrain, shipped_dir=shipped)
    bundle, key = concept_word_bundle(bundle, world, Path(cache_dir), info["key"], world_settings.seed, report)
    return bundle, {**info, "key": key, "learned_words": len(world.learned_words)}


def world_bundle(concepts: int, world_settings: dw.WorldModelSettings, cache_dir: Path):
    """The world model as the demo made it (from the cache): for worker processes."""
    return world_model(dw.DemoWorld(concepts), world_settings, Path(cache_dir))[0]


def run_demo(output_dir, cache_dir, settings: Optional[DemoSettings] = None, fresh: bool = False,
             report: Callable[[str], None] = print, retrain_world: bool = False) -> DemoResult:
    """Run the whole chain and write the report; returns the summary numbers.

    ``retrain_world``: train the world model again instead of using the shipped (or cached) weights.
    Renders are cached too (keyed by the weights that made them), so a second run only samples what changed.
    """
    with cached_renders(Path(cache_dir) / "renders"):
        return _run_demo(output_dir, cache_dir, settings, fresh, report, retrain_world)


def _run_demo(output_dir, cache_dir, settings: Optional[DemoSettings], fresh: bool, report: Callable[[str], None],
              retrain_world: bool) -> DemoResult:
    from .evaluation import wilson_interval

    started = time.time()
    settings = settings or DemoSettings()
    output_dir, cache_dir = Path(output_dir), Path(cache_dir)
    if fresh and cache_dir.exists():  # only what the demo itself writes there, never other files
        import shutil

        for entry in cache_dir.iterdir():
            if entry.is_dir() and entry.name.startswith(("world_model_", "pairs_", "experts_", "merges_", "renders")):
                shutil.rmtree(entry)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    torch.manual_seed(settings.seed)

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.time() - since, 1)
        return time.time()

    # 1. world and base model
    t = time.time()
    world = dw.DemoWorld(settings.concepts)
    oracle = dw.DemoOracle(world)
    oracle_accuracy = oracle.accuracy()
    report(f"demo world (seed {settings.seed}): {len(world.concepts)} unsafe concepts, {len(world.scenes())} scenes; "
           f"oracle accuracy on held-out renders {oracle_accuracy['all']:.1%} ({oracle_accuracy['renders']} renders)")

    bundle, model_info = world_model(world, settings.world, cache_dir, retrain_world, report)
    model_key = model_info["key"]
    origin = {"shipped": "shipped with the repository", "cache": "cached"}.get(model_info.get("origin"), "trained")
    report(f"world model: {origin} ({model_info.get('train_seconds')} s to train)")
    t = lap("world model", t)

    # 2. pairs rendered by the base model
    pair_key_ = _hash({"model": model_key, "n": settings.images_per_prompt, "steps": settings.sample_steps,
                       "cfg": settings.guidance_scale, "seed": settings.pair_base_seed, "v": DEMO_VERSION,
                       "concepts": [c.name for c in world.concepts]})
    pairs = build_demo_pairs(bundle, world, settings, cache_dir / f"pairs_{pair_key_}", model_key)
    pairs_check = measure_pairs(oracle, pairs)
    report(f"pairs: {len(pairs)} pairs + {len(pairs.replay)} replay images; rejected images unsafe "
           f"{pairs_check['rejected_unsafe']:.1%}, preferred images safe {pairs_check['preferred_safe']:.1%}, "
           f"same shape and background {pairs_check['same_scene']:.1%}")
    t = lap("pairs", t)

    # 3. experts
    experts_root = cache_dir / f"experts_{pair_key_}"

    def recipe_folder(recipe):
        return experts_root / _hash({"recipe": recipe, "steps": settings.expert_steps, "seed": settings.seed})
    report(f"training {len(world.concepts)} DPO experts ({settings.expert_steps} steps each)")
    jobs = expert_set_jobs(world, pairs, settings.recipe, settings.expert_steps, recipe_folder(settings.recipe),
                           settings.seed, "dpo")
    all_steps = settings.expert_steps * len(world.concepts)
    all_data_job = None
    if settings.one_on_all and settings.baselines:
        config_all = TrainingConfig(**{**settings.recipe, "expert_name": "dpo_all_data",
                                       "categories": tuple(c.category for c in world.concepts), "max_steps": all_steps,
                                       "seed": settings.seed, "checkpoint_every": max(all_steps // 2, 1)})
        all_data_job = (pairs, config_all, recipe_folder(settings.recipe) / "all_data")
    scaling_jobs = {}  # one expert on the first k concepts' data, for the scaling curve
    for k in sorted(set(settings.scaling_one_on_all)):
        if k >= len(world.concepts) and all_data_job is not None:
            continue  # that one is all_data_job
        k = min(k, len(world.concepts))
        chosen = tuple(c.category for c in world.concepts[:k])
        config_k = TrainingConfig(**{**settings.recipe, "expert_name": f"dpo_all_data_{k}", "categories": chosen,
                                     "max_steps": settings.expert_steps * k, "seed": settings.seed,
                                     "checkpoint_every": max(settings.expert_steps * k // 2, 1)})
        scaling_jobs[k] = (pairs.select(list(chosen)), config_k, recipe_folder(settings.recipe) / f"all_data_{k}")
    baseline_jobs = {}
    if settings.all_baselines:
        for label, recipe in (("sft", SFT_RECIPE), ("sft_replay", SFT_REPLAY_RECIPE)):
            baseline_jobs[label] = expert_set_jobs(world, pairs, recipe, settings.expert_steps, recipe_folder(recipe),
                                                   settings.seed, label)
    train_in_workers(jobs + ([all_data_job] if all_data_job else []) + list(scaling_jobs.values())
                     + [j for js in baseline_jobs.values() for j in js], settings, cache_dir, report)
    experts = train_expert_set(bundle, jobs, report)
    one_on_all = None
    if all_data_job is not None:
        one_on_all, cached = trained_expert(bundle, *all_data_job)
        report(f"  one expert on all data ({all_steps} steps): {'cached' if cached else 'trained'}")
    scaling_one_on_all = {len(world.concepts): one_on_all} if one_on_all is not None else {}
    for k, job in scaling_jobs.items():
        scaling_one_on_all[k], cached = trained_expert(bundle, *job)
        report(f"  one expert on the first {k} concepts' data ({job[1].max_steps} steps): "
               f"{'cached' if cached else 'trained'}")
    baseline_sets = {}
    for label, label_jobs in baseline_jobs.items():
        report(f"training {len(world.concepts)} {label} baseline experts")
        baseline_sets[label] = train_expert_set(bundle, label_jobs, report)
    t = lap("experts", t)

    # 4. merging
    weights = [1.0] * len(experts)
    default_name = MERGE_LABELS[settings.merge_method]
    merger = DemoMerger(bundle, world, settings, pairs, cache_dir / f"merges_{pair_key_}")
    merged_default = merger.merge(settings.merge_method, experts, weights,
                                  name=f"safety_expert_demo_{settings.merge_method}")
    variants: Dict[str, Optional[SafetyExpert]] = {"base": None, default_name: merged_default}
    if settings.baselines:
        for method in ("distillation", "least_squares", "co_merge", "linear", "ties"):
            if method != settings.merge_method:
                variants[MERGE_LABELS[method]] = merger.merge(method, experts, weights)
        if one_on_all is not None:
            variants["DPO, one expert on all data"] = one_on_all
    if settings.all_baselines:
        variants["DPO + Co-Merge (row)"] = merger.merge("co_merge_row", experts, weights)
        for label, group in baseline_sets.items():
            name = "supervised" if label == "sft" else "supervised + replay"
            variants[f"{name} + {MERGE_LABELS[settings.merge_method].split(' + ', 1)[1]}"] = merger.merge(
                settings.merge_method, group, weights, name=f"{label}_merged")
    merged_path = save_expert(merged_default, output_dir / "safety_expert_demo.safetensors")
    t = lap("merging", t)

    # 5. evaluation on held-out seeds and templates
    items = evaluation_items(world, settings.eval_seeds)
    base_images = render_variant(bundle, None, items, settings)
    base_readings = [oracle.read(image) for image in base_images]
    results, images = {}, {}
    for name, expert in variants.items():
        images[name] = base_images if expert is None else render_variant(bundle, expert, items, settings)
        results[name] = measure(oracle, items, base_images, images[name], base_readings)
        low, high = wilson_interval(results[name]["unsafe_count"], results[name]["unsafe_n"])
        results[name]["unsafe_ci"] = [low, high]
    base_rate = results["base"]["unsafe_rate"]
    for name, row in results.items():
        row["removed"] = 1.0 - row["unsafe_rate"] / base_rate if base_rate > 0 else float("nan")
    base_fidelity = prompt_fidelity(items, base_readings)
    gate_summary = None
    if settings.gate:
        gate = demo_gate(bundle, world, pairs)
        present = gate_readings(gate, bundle, items)
        gate_summary = gate_accuracy_by_split(items, present)
        report(f"prompt gate: finds the concept in {gate_summary['found']:.1%} of unsafe prompts "
               f"({gate_summary['found_held_out']:.1%} on held-out templates), turns an expert on for "
               f"{gate_summary['safe_on']:.1%} of safe prompts")
        names = [c.name for c in world.concepts]
        # the per-concept experts, and (with --all-checks) the one expert on all data, each behind the same gate
        gated_sets = {GATED_LABEL: list(experts)}
        if one_on_all is not None:
            gated_sets[GATED_ONE_ON_ALL_LABEL] = [one_on_all] * len(names)
        for label, gated_experts in gated_sets.items():
            images[label] = render_gated(bundle, gated_experts, names, present, weights, items, settings, base_images)
            results[label] = measure(oracle, items, base_images, images[label], base_readings)
            results[label]["unsafe_ci"] = list(wilson_interval(results[label]["unsafe_count"],
                                                               results[label]["unsafe_n"]))
            results[label]["removed"] = 1.0 - results[label]["unsafe_rate"] / base_rate if base_rate > 0 \
                else float("nan")
        if settings.synonyms and synonyms_for(world):
            learned, synonyms = synonym_bundle(bundle, world, cache_dir, model_key, settings.seed)
            check = synonym_check(learned, gate, experts, names, items, synonyms, oracle, settings)
            check["nearest_word"] = nearest_words(learned, list(synonyms.values()), world.vocabulary[1:])
            gate_summary["synonyms"] = check
            report(f"synonyms ({', '.join(f'{w} for {c}' for c, w in synonyms.items())}; learned by the world model "
                   f"afterwards, in no reference): the base model draws them as the concept in "
                   f"{check['drawn_as_concept']:.1%}, the gate finds the concept in {check['found']:.1%}, the gated "
                   f"experts remove {check['removed']:.1%} (scenes kept {check['scene_kept_on_unsafe_prompts']:.1%})")
        if settings.weight_zero_checks and len(experts) > 1:
            gate_summary["weight_zero"] = gated_weight_zero_check(
                bundle, experts, names, present, items, base_images, images[GATED_LABEL], base_readings, oracle,
                settings, results["base"]["per_concept"], report)
            if one_on_all is not None:
                gate_summary["weight_zero_one_on_all"] = gated_weight_zero_check(
                    bundle, gated_sets[GATED_ONE_ON_ALL_LABEL], names, present, items, base_images,
                    images[GATED_ONE_ON_ALL_LABEL], base_readings, oracle, settings, results["base"]["per_concept"],
                    report, label="gated one expert on all data, ")
    weight_zero = None
    if settings.weight_zero_checks and settings.merged_weight_zero and len(experts) > 1:
        weight_zero = weight_zero_check(bundle, merger, settings.merge_method, experts, items, base_images,
                                        base_readings, oracle, settings, results["base"]["per_concept"], report,
                                        results[default_name]["per_concept"],
                                        concepts=settings.merged_weight_zero_concepts or None)
    alone = None
    if settings.experts_alone:
        alone = experts_alone_check(bundle, experts, items, base_images, base_readings, oracle, settings,
                                    results["base"]["per_concept"], report)
    scaling = None
    if len(experts) > len(dw.CONCEPTS):
        scaling = scaling_curve(bundle, world, oracle, experts, scaling_one_on_all, merger, settings, report,
                                pairs if settings.gate else None)
    t = lap("evaluation", t)

    # 6. report
    summary = {
        "settings": settings.to_json(), "seed": settings.seed, "oracle_accuracy": oracle_accuracy,
        "world_model": model_info, "base_prompt_fidelity": base_fidelity, "pairs": pairs_check, "results": results,
        "default_variant": default_name, "weight_zero": weight_zero, "experts_alone": alone, "timings": timings,
        "gate": gate_summary,
        "base_attribute_fidelity": attribute_fidelity(items, base_readings),
        "co_merge_wins": (co_merge_wins(variants[MERGE_LABELS["co_merge"]]) if MERGE_LABELS["co_merge"] in variants
                          else {}),
        "co_merge_granularity": settings.co_merge_granularity,
        "concepts": [dataclasses.asdict(c) for c in world.concepts],
        "eval_items": len(items), "scaling": scaling, "torch_threads": torch.get_num_threads(),
    }
    report_path = write_demo_report(output_dir, summary, world, items, images)
    lap("report", t)
    summary["timings"]["total"] = round(time.time() - started, 1)
    files.write_json(output_dir / "summary.json", summary, default=str)
    report("")
    report(summary_table(summary))
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
    report(f"\nreport: {report_path}\nmerged LoRA: {merged_path}\ntotal {summary['timings']['total']:.0f} s ({stages})")
    return DemoResult(summary, report_path, merged_path, time.time() - started)


def run_seeds(output_dir, cache_dir, settings: DemoSettings, seeds: Sequence[int], fresh: bool = False,
              report: Callable[[str], None] = print, retrain_world: bool = False) -> Dict[str, object]:
    """The demo on several seeds (world model, pairs, experts, evaluation), then mean and range of every measure.

    Writes ``seed_N/`` (each run's report) and ``seeds.md`` / ``seeds.json`` in ``output_dir``.
    """
    output_dir = Path(output_dir)
    runs = {}
    for seed in seeds:
        report(f"=== seed {seed} ===")
        result = run_demo(output_dir / f"seed_{seed}", cache_dir, settings.with_seed(seed), fresh=fresh and not runs,
                          report=report, retrain_world=retrain_world)
        runs[int(seed)] = result.summary
    aggregate = aggregate_seeds(runs)
    files.write_json(output_dir / "seeds.json", aggregate, default=str)
    files.write_text(output_dir / "seeds.md", seeds_markdown(aggregate))
    report("")
    report(seeds_markdown(aggregate))
    return aggregate


MERGE_LABELS = {
    "distillation": "DPO + distillation merge",
    "least_squares": "DPO + least-squares merge",
    "co_merge": "DPO + Co-Merge",
    "co_merge_row": "DPO + Co-Merge (row)",
    "linear": "DPO + linear",
    "ties": "DPO + TIES",
}


class DemoMerger:
    """Merges the demo's experts by any method, recording each method's statistics once per expert set."""

    def __init__(self, bundle, world: dw.DemoWorld, settings: DemoSettings, pairs: Optional[PreferencePairs] = None,
                 cache_dir: Optional[Path] = None):
        self.bundle, self.world, self.settings, self.pairs = bundle, world, settings, pairs
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None  # distilled merges, keyed by their inputs
        self._statistics: Dict[Tuple[str, Tuple[str, ...]], object] = {}

    def _key(self, kind: str, experts: Sequence[SafetyExpert]):
        return kind, tuple(expert_fingerprint(e) for e in experts)

    def co_merge_statistics(self, experts: Sequence[SafetyExpert]):
        """Co-Merge statistics of these experts; each expert is calibrated once (same prompts, noise and
        timesteps for every expert), so the scaling curve's subsets reuse the larger sets' entries."""
        known = self._statistics.setdefault(("co_merge", "per expert"), {})
        fingerprints = [expert_fingerprint(e) for e in experts]
        missing = list({f: e for e, f in zip(experts, fingerprints) if f not in known}.values())
        if missing:
            prompts = [p.prompt for p in prompt_pairs(self.world)] + replay_prompts(self.world)
            measured = calibrate_bundle(self.bundle, missing, prompts, seed=self.settings.seed, batch_size=64)
            for expert in missing:
                known[measured.fingerprints[expert.name]] = (measured.experts[expert.name], measured.info)
        info = dict(known[fingerprints[0]][1])
        return CalibrationStatistics({e.name: known[f][0] for e, f in zip(experts, fingerprints)},
                                     {e.name: f for e, f in zip(experts, fingerprints)}, info)

    def least_squares_statistics(self, experts: Sequence[SafetyExpert]):
        key = self._key("least_squares", experts)
        if key not in self._statistics:
            self._statistics[key] = record_demo_statistics(self.bundle, self.world, experts, self.settings)
        return self._statistics[key]

    def merge(self, method: str, experts: Sequence[SafetyExpert], weights: Sequence[float],
              name: Optional[str] = None) -> SafetyExpert:
        name = name or f"demo_{method}"
        if method == "least_squares":
            return merge_least_squares(experts, weights, self.least_squares_statistics(experts),
                                       preserve_weight=self.settings.preserve_weight, name=name)
        if method in ("co_merge", "co_merge_row"):
            granularity = "row" if method == "co_merge_row" else self.settings.co_merge_granularity
            return co_merge(experts, weights, self.co_merge_statistics(experts), granularity=granularity, name=name)
        if method == "distillation":
            return self.distilled(experts, weights, name)
        if method == "linear":
            return merge_linear(experts, weights, name=name)
        if method == "ties":
            return merge_ties(experts, weights, density=0.5, name=name)
        raise ValueError(f"unknown demo merge method {method!r}")


    def distilled(self, experts: Sequence[SafetyExpert], weights: Sequence[float], name: str) -> SafetyExpert:
        """The distillation merge, taught on each expert's own training pairs (with the prompt crops it was
        trained on) and the replay items: never on the evaluation's seeds or held-out templates."""
        if self.pairs is None:
            raise ValueError("the distillation merge needs the demo's pairs (DemoMerger(..., pairs=...))")
        if self.cache_dir is None:
            return distill_experts(self.bundle, experts, weights, self.pairs, self.settings.distillation, name=name)
        key = _hash({"experts": [expert_fingerprint(e) for e in experts], "weights": [float(w) for w in weights],
                     "settings": dataclasses.asdict(self.settings.distillation), "v": DEMO_VERSION})
        path, done = self.cache_dir / f"{key}.safetensors", self.cache_dir / f"{key}.json"
        if path.is_file() and done.is_file():
            try:
                if json.loads(done.read_text()).get("sha256") == files.sha256_file(path):
                    return load_expert(path, name=name)
                raise ValueError("content hash mismatch")
            except Exception as error:  # noqa: BLE001 - a damaged cached merge is distilled again, never trusted
                log.warning("cached merge %s is damaged (%s): distilling it again", path, error)
        merged = distill_experts(self.bundle, experts, weights, self.pairs, self.settings.distillation, name=name)
        save_expert(merged, path)
        files.write_json(done, {"sha256": files.sha256_file(path)}, indent=None)
        return merged


def record_demo_statistics(bundle, world: dw.DemoWorld, experts: Sequence[SafetyExpert], settings: DemoSettings):
    """Least-squares statistics: each expert drawing its own concept's prompts, the base model drawing safe prompts.

    Training templates only, with calibration seeds disjoint from the evaluation seeds: the evaluation's
    held-out templates and seeds are never seen by the merge.
    """
    by_category = {c.category: c for c in world.concepts}
    count = settings.calibration_images_per_prompt

    def draw(prompts):
        prompts = [p for p in prompts for _ in range(count)]
        seeds = [500_000 + 7_919 * settings.seed + 13 * i for i in range(len(prompts))]
        # never from the render cache: the recording hooks must see the model run
        sample_batched(bundle, prompts, seeds, settings.sample_steps, settings.guidance_scale, cache=False)

    def run_concept(expert: SafetyExpert):
        concepts = [by_category[c] for c in expert.categories if c in by_category]
        if not concepts:
            raise ValueError(f"expert {expert.name!r} covers none of the demo's concepts ({expert.categories})")
        draw([s.prompt(t) for c in concepts for s in world.scenes([c.name]) for t in dw.TRAIN_TEMPLATES])

    return record_statistics(experts, diffusers_module_lookup(bundle.unet), run_concept,
                             lambda: draw(replay_prompts(world)),
                             info={"source": "demo sampling trajectories", "steps": settings.sample_steps,
                                   "images_per_prompt": count})


def check_world_model(cache_dir, settings: Optional[DemoSettings] = None, retrain: bool = False,
                      report: Callable[[str], None] = print) -> Dict[str, object]:
    """Load (or train, with ``retrain``) the world model and measure how faithfully it draws held-out prompts.

    The demo's numbers only mean something on a world model that draws what the prompt says; this is the
    check behind ``trainer/demo.py --world-only``.
    """
    settings = settings or DemoSettings()
    world = dw.DemoWorld(settings.concepts)
    oracle = dw.DemoOracle(world)
    bundle, info = world_model(world, settings.world, Path(cache_dir), retrain, report)
    items = evaluation_items(world, settings.eval_seeds)
    readings = [oracle.read(image) for image in render_variant(bundle, None, items, settings)]
    result = {"seed": settings.seed, "origin": info.get("origin"), "train_seconds": info.get("train_seconds"),
              "images": len(items), "prompt_fidelity": prompt_fidelity(items, readings),
              "attributes": attribute_fidelity(items, readings)}
    attributes = result["attributes"]
    report(f"world model seed {settings.seed} ({result['origin']}): draws the prompt in {attributes['all']:.1%} of "
           f"{len(items)} held-out images (colour {attributes['colour']:.1%}, shape {attributes['shape']:.1%}, "
           f"background {attributes['background']:.1%})")
    return result
