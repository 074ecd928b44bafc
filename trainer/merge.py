"""Merge safety-expert LoRA files (Co-Merge or a baseline), and compute Co-Merge calibration statistics.

Run from the plugin folder (``ComfyUI/custom_nodes/safetydpo``) with ComfyUI's Python or ``.venv``:

    # merge with per-concept weights (0 leaves an expert out)
    python trainer/merge.py hate.safetensors violence.safetensors --weights 1,0.5 \\
        --method co_merge --statistics stats.safetensors --output merged.safetensors

    # compute the statistics once from a diffusers model folder and calibration prompts
    python trainer/merge.py statistics hate.safetensors violence.safetensors \\
        --model path/to/diffusers_pipeline --prompts prompts.txt --output stats.safetensors

    # least-squares merge: record layer inputs by sampling each expert's own concept prompts (from a
    # concept list: unsafe_prompt,safe_prompt,category) and safe prompts, then merge (λ = --preserve-weight)
    python trainer/merge.py statistics hate.safetensors violence.safetensors --method least_squares \\
        --model path/to/sd15 --concepts concepts.csv --safe-prompts safe.txt --output ls_stats.safetensors
    python trainer/merge.py hate.safetensors violence.safetensors --weights 1,1 --method least_squares \\
        --statistics ls_stats.safetensors --preserve-weight 1 --output merged.safetensors

    # distillation merge: one LoRA taught each expert's predictions on its own category's pairs and the base
    # model's on the dataset's replay items (needs the model and the pairs dataset the experts were trained on)
    python trainer/merge.py distill hate.safetensors violence.safetensors --weights 1,1 \\
        --model path/to/sd15 --pairs path/to/pairs --output merged.safetensors

Methods: co_merge (granularity row = exact LoRA of rank Σ r_k, or element = exact diffs / SVD at
--rank), least_squares (per layer the ΔW that reproduces each expert on its own concept's inputs and the
base model on safe inputs; exact LoRA of rank Σ r_k; weight 0 keeps that concept as the base model draws
it), linear (exact), svd (--rank), ties, dare, dare_ties, magnitude_prune (--density, --seed;
diffs, or SVD at --rank). The result is a kohya-key LoRA with explicit alpha, loadable by ComfyUI's
LoraLoader, with the merge recipe in its metadata. Statistics depend only on the experts and the
model, so re-merging with new weights needs no model pass.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[1]
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

from comfyui_safetydpo import (calibration, least_squares_merge, least_squares_statistics, lora_files,  # noqa: E402
                               merging)
from comfyui_safetydpo.errors import SafetyDPOError  # noqa: E402

STATISTICS_METHODS = ("co_merge", "least_squares")

PROMPT_COLUMNS = ("prompt", "unsafe_prompt", "unsafe prompt", "text", "caption")


# -- inputs ------------------------------------------------------------------------------------

def parse_weights(text, count: int):
    """'1,0.5,0' -> [1.0, 0.5, 0.0]; None -> all ones."""
    if text is None:
        return [1.0] * count
    try:
        weights = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SafetyDPOError(f"--weights must be comma-separated numbers, e.g. 1,0.5 (got {text!r})") from None
    if len(weights) != count:
        raise SafetyDPOError(f"--weights has {len(weights)} numbers for {count} expert files: give one per file")
    return weights


def read_prompts(path) -> list:
    """Prompts from a .txt file (one per line) or a .csv file (a 'prompt'-like column)."""
    path = Path(path)
    if not path.is_file():
        raise SafetyDPOError(f"{path}: no such prompt file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = {c.lower().strip(): c for c in (reader.fieldnames or [])}
            column = next((columns[c] for c in PROMPT_COLUMNS if c in columns), None)
            if column is None:
                raise SafetyDPOError(f"{path}: no prompt column; expected one of {', '.join(PROMPT_COLUMNS)}, "
                                     f"found {reader.fieldnames}")
            prompts = [row[column].strip() for row in reader if (row.get(column) or "").strip()]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SafetyDPOError(f"{path}: holds no prompts")
    return prompts


def load_diffusers_bundle(folder, device: str = "cpu"):
    """A ``DiffusionBundle`` from a local diffusers pipeline folder (unet/, text_encoder/, tokenizer/ ...)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from comfyui_safetydpo import unet_keys
    from comfyui_safetydpo.models import DiffusionBundle

    folder = Path(folder)
    missing = [part for part in ("unet", "text_encoder", "tokenizer") if not (folder / part).is_dir()]
    if missing:
        raise SafetyDPOError(
            f"{folder}: not a diffusers pipeline folder (missing {', '.join(missing)}/). Calibration needs the "
            "UNet, text encoder(s) and tokenizer(s) of the model the experts were trained for; give the folder "
            "that holds model_index.json, or pass an existing --statistics file.")
    options = dict(local_files_only=True, use_safetensors=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **options)
        encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **options)]
        tokenizers = [AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)]
        if (folder / "text_encoder_2").is_dir():
            encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **options))
            tokenizers.append(AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True))
        if (folder / "scheduler").is_dir():
            scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        else:
            scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    except (OSError, ValueError, EnvironmentError) as error:
        raise SafetyDPOError(f"{folder}: could not load the model ({error}); it must be a local diffusers "
                             "folder with .safetensors weights") from None
    unet.to(device).eval()
    for encoder in encoders:
        encoder.to(device).eval()
    width = int(unet.config.cross_attention_dim if not isinstance(unet.config.cross_attention_dim, (list, tuple))
                else unet.config.cross_attention_dim[0])
    architecture = unet_keys.CONTEXT_WIDTH_TO_ARCHITECTURE.get(width, "unknown")
    scale = 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1) \
        if (folder / "vae" / "config.json").is_file() else 1
    return DiffusionBundle(
        unet=unet, text_encoders=encoders, tokenizers=tokenizers, noise_scheduler=scheduler, vae=None,
        architecture=architecture, prediction_type=scheduler.config.prediction_type,
        resolution=int(unet.config.sample_size) * scale, name=folder.name)


def load_experts(paths):
    experts = [lora_files.load_expert(path) for path in paths]
    names = [e.name for e in experts]
    for index, expert in enumerate(experts):  # two files with one internal name: keep them apart
        if names.count(expert.name) > 1:
            expert.name = f"{expert.name}_{Path(paths[index]).stem}_{index}"
    return experts


# -- commands ----------------------------------------------------------------------------------

def compute_statistics(args, experts):
    if not args.model:
        raise SafetyDPOError(
            "Co-Merge needs calibration statistics: pass --statistics FILE (computed earlier) or "
            "--model DIFFUSERS_FOLDER --prompts FILE to compute them now (`python trainer/merge.py statistics --help`)")
    if not args.prompts:
        raise SafetyDPOError("computing statistics needs --prompts FILE: prompts of every category the experts cover")
    bundle = load_diffusers_bundle(args.model, args.device)
    for expert in experts:
        lora_files.check_compatible(expert, bundle.architecture, str(args.model))
    timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    prompts = read_prompts(args.prompts)
    print(f"calibrating {len(experts)} experts on {len(prompts)} prompts x {len(timesteps)} timesteps "
          f"({bundle.architecture}, {args.device})", flush=True)
    return calibration.calibrate_bundle(bundle, experts, prompts, timesteps, args.seed, args.batch_size)


def record_least_squares(args, experts):
    """Least-squares statistics: sample each expert's concept prompts with it applied, safe prompts without."""
    from comfyui_safetydpo.concepts import load_concept_file
    from comfyui_safetydpo.model_loading import load_bundle

    if not args.model or not args.concepts:
        raise SafetyDPOError(
            "the least-squares merge needs layer statistics: pass --statistics FILE (recorded earlier) or "
            "--model MODEL --concepts FILE (unsafe_prompt,safe_prompt,category; optional --safe-prompts FILE) to "
            "record them now (`python trainer/merge.py statistics --method least_squares --help`)")
    pairs = load_concept_file(args.concepts, extra_categories=sorted({c for e in experts for c in e.categories}))
    extra_safe = read_prompts(args.safe_prompts) if args.safe_prompts else []
    prompts = least_squares_statistics.merge_prompts(pairs, extra_safe=extra_safe, source=str(args.concepts))
    per_expert = least_squares_statistics.prompts_per_expert(experts, prompts.concept)
    bundle = load_bundle(args.model, device=args.device)
    for expert in experts:
        lora_files.check_compatible(expert, bundle.architecture, str(args.model))
    print(f"recording least-squares statistics of {len(experts)} experts ({prompts.summary()}; {args.steps} steps, "
          f"guidance {args.guidance}, {args.images_per_prompt} images per prompt; {bundle.architecture}, "
          f"{args.device})", flush=True)
    return least_squares_statistics.record_bundle_statistics(
        bundle, experts, per_expert, prompts.safe, steps=args.steps, guidance_scale=args.guidance,
        images_per_prompt=args.images_per_prompt, seed=args.seed, batch_size=args.batch_size,
        progress=lambda text: print(text, flush=True))


def load_statistics(path, method: str):
    """A statistics file of either kind, detected from its metadata; the wrong kind for ``method`` is an error."""
    metadata = lora_files.read_safetensors(path)[1]
    kind = metadata.get("safetydpo_kind")
    kinds = {calibration.STATISTICS_KIND: "co_merge", least_squares_merge.STATISTICS_KIND: "least_squares"}
    if kind not in kinds:
        raise SafetyDPOError(f"{path}: not a statistics file (no safetydpo statistics metadata); record one with "
                             f"`python trainer/merge.py statistics --method {method} ...`")
    if kinds[kind] != method:
        raise SafetyDPOError(
            f"{path} holds statistics for method {kinds[kind]!r}, but --method {method} needs its own; record them "
            f"with `python trainer/merge.py statistics --method {method} ...` (or use --method {kinds[kind]})")
    if method == "least_squares":
        return least_squares_merge.LayerInputStatistics.load(path)
    return calibration.CalibrationStatistics.load(path)


def make_statistics(args, experts):
    if args.method == "least_squares":
        return record_least_squares(args, experts)
    return compute_statistics(args, experts)


def run_statistics(args) -> int:
    experts = load_experts(args.experts)
    statistics = make_statistics(args, experts)
    path = statistics.save(args.output)
    if args.method == "least_squares":
        print(f"wrote {path} (least-squares statistics for {', '.join(sorted(statistics.projections))})")
    else:
        print(f"wrote {path} (statistics for {', '.join(sorted(statistics.experts))}; "
              f"hash {statistics.content_hash()})")
    return 0


def run_merge(args) -> int:
    experts = load_experts(args.experts)
    weights = parse_weights(args.weights, len(experts))
    statistics = None
    if args.method in STATISTICS_METHODS:
        if args.statistics and Path(args.statistics).is_file():
            statistics = load_statistics(args.statistics, args.method)
        else:
            statistics = make_statistics(args, experts)
            if args.statistics:
                statistics.save(args.statistics)
                print(f"wrote statistics to {args.statistics}")
    options = {"granularity": args.granularity if args.method == "co_merge" else None,
               "density": args.density if args.method in ("ties", "dare", "dare_ties", "magnitude_prune") else None,
               "seed": args.seed if args.method in ("dare", "dare_ties") else None,
               "preserve_weight": args.preserve_weight if args.method == "least_squares" else None}
    merged = merging.merge_experts(experts, weights, args.method, statistics=statistics, rank=args.rank,
                                   name=args.name or Path(args.output).stem, **options)
    path = lora_files.save_expert(merged, args.output, key_format=args.format, uniform_alpha=True)
    recipe = merging.merge_recipe(merged)
    print(merged.describe())
    if "wins_overall" in recipe:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in recipe["wins_overall"].items())
        print(f"Co-Merge winners (share of {recipe['granularity']}s, mean over modules): {shares}")
    if args.method == "least_squares":
        fit = least_squares_merge.fit_report(experts, weights, merged, statistics)
        print(f"least squares (λ {recipe['preserve_weight']:g}): change on safe inputs is "
              f"{fit['safe_change_vs_linear']:.3%} of the linear merge's")
    if "svd_relative_error" in recipe:
        print(f"SVD at rank {recipe['rank']}: relative Frobenius error {recipe['svd_relative_error']:.4g}")
    print(f"wrote {path}")
    return 0


def build_parser(statistics_only: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer/merge.py" + (" statistics" if statistics_only else ""),
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experts", nargs="+", help="expert LoRA files (.safetensors: kohya, ComfyUI or PEFT keys)")
    parser.add_argument("--output", required=True,
                        help="statistics file to write" if statistics_only else "merged LoRA file to write")
    if statistics_only:
        parser.add_argument("--method", default="co_merge", choices=STATISTICS_METHODS,
                            help="which merge the statistics are for (default %(default)s)")
    calib = parser.add_argument_group("calibration (Co-Merge statistics)")
    calib.add_argument("--model", help="the base model: local diffusers pipeline folder (unet/, text_encoder/, ...); "
                                        "least_squares also takes a single-file .safetensors checkpoint")
    calib.add_argument("--prompts", help="calibration prompts of every category: .txt (one per line) or .csv")
    calib.add_argument("--timesteps", default=",".join(map(str, calibration.DEFAULT_TIMESTEPS)),
                       help="comma-separated timesteps (default %(default)s)")
    calib.add_argument("--batch-size", type=int, default=4)
    calib.add_argument("--device", default="cpu", help="torch device for calibration (cpu, cuda, mps)")
    record = parser.add_argument_group(
        "least-squares statistics (sampled: each expert on its own concept's prompts, the base model on safe ones)")
    record.add_argument("--concepts", help="concept list (.csv/.yaml/.txt: unsafe_prompt, safe_prompt, category): an "
                                           "expert draws the unsafe prompts of its categories; safe rewrites are kept")
    record.add_argument("--safe-prompts", dest="safe_prompts",
                        help="extra prompts that must not change (.txt, one per line, or .csv)")
    record.add_argument("--steps", type=int, default=least_squares_statistics.DEFAULT_STEPS,
                        help="sampling steps (default %(default)s)")
    record.add_argument("--guidance", type=float, default=least_squares_statistics.DEFAULT_GUIDANCE,
                        help="classifier-free guidance scale (default %(default)s)")
    record.add_argument("--images-per-prompt", dest="images_per_prompt", type=int,
                        default=least_squares_statistics.DEFAULT_IMAGES_PER_PROMPT,
                        help="images drawn per prompt, seeds --seed, --seed+1, … (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for calibration noise, sampling and DARE drops")
    if statistics_only:
        return parser
    parser.add_argument("--weights", help="one weight ≥ 0 per expert, comma-separated (default all 1)")
    parser.add_argument("--method", default="co_merge", choices=merging.METHODS)
    parser.add_argument("--statistics", help="statistics file for co_merge / least_squares: read if it exists, "
                                             "else computed (co_merge: --model and --prompts; least_squares: "
                                             "--model and --concepts) and written here")
    parser.add_argument("--preserve-weight", dest="preserve_weight", type=float,
                        default=least_squares_merge.DEFAULT_PRESERVE_WEIGHT,
                        help="least_squares λ: how much keeping safe inputs unchanged counts against reproducing "
                             "each expert on its concept (default %(default)s)")
    parser.add_argument("--granularity", default="row", choices=("row", "element"), help="Co-Merge granularity")
    parser.add_argument("--rank", type=int, help="target rank (svd; element Co-Merge, ties, dare, magnitude_prune: "
                                                 "SVD of the result; default exact diffs)")
    parser.add_argument("--density", type=float, default=0.5, help="fraction kept by ties/dare/magnitude_prune")
    parser.add_argument("--name", help="name of the merged expert (default: output file name)")
    parser.add_argument("--format", default="kohya", choices=("kohya", "native"), help="key format of the output")
    return parser


def build_distill_parser() -> argparse.ArgumentParser:
    from comfyui_safetydpo.distillation_merge import DistillationSettings

    defaults = DistillationSettings()
    parser = argparse.ArgumentParser(
        prog="trainer/merge.py distill", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distillation merge: one LoRA taught to predict what each expert predicts on its own "
                    "category's pairs and what the base model predicts on the dataset's replay items (safe "
                    "prompts), so it acts where each expert acts and nowhere else (docs/demo.md).")
    parser.add_argument("experts", nargs="+", help="expert LoRA files (.safetensors) trained on --pairs")
    parser.add_argument("--model", required=True, help="the base model the experts were trained on: diffusers "
                                                       "folder or single-file .safetensors checkpoint")
    parser.add_argument("--pairs", required=True, help="the pairs dataset the experts were trained on, with replay "
                                                       "items (safe prompts)")
    parser.add_argument("--output", required=True, help="merged LoRA file to write")
    parser.add_argument("--weights", help="one weight ≥ 0 per expert, comma-separated (default all 1); 0 leaves "
                                          "that concept as the base model draws it")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default %(default)s)")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank of the result (default "
                                                                        "%(default)s)")
    parser.add_argument("--learning-rate", dest="learning_rate", type=float, default=defaults.learning_rate,
                        help="AdamW learning rate, cosine decay (default %(default)s)")
    parser.add_argument("--draws", type=int, default=defaults.draws,
                        help="noise draws per image when the experts' predictions are recorded (default %(default)s; "
                             "memory grows with it)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=defaults.batch_size,
                        help="concept samples per step (default %(default)s; half as many safe samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="torch device (default cuda when available, else cpu)")
    parser.add_argument("--architecture", choices=("sd15", "sd21", "sdxl"), help="check the model is this one")
    parser.add_argument("--name", help="name of the merged expert (default: output file name)")
    parser.add_argument("--format", default="kohya", choices=("kohya", "native"), help="key format of the output")
    return parser


def run_distill(args) -> int:
    import torch

    from comfyui_safetydpo.distillation_merge import DistillationSettings, distill_experts
    from comfyui_safetydpo.model_loading import load_bundle
    from comfyui_safetydpo.pairs import load_pairs

    experts = load_experts(args.experts)
    weights = parse_weights(args.weights, len(experts))
    settings = DistillationSettings(steps=args.steps, rank=args.rank, learning_rate=args.learning_rate,
                                    draws=args.draws, batch_size=args.batch_size,
                                    replay_batch_size=max(args.batch_size // 2, 1), seed=args.seed)
    settings.validate()
    pairs = load_pairs(args.pairs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_bundle(args.model, architecture=args.architecture, device=device)

    def progress(step, total, loss):
        if step == total or step % max(total // 20, 1) == 0:
            print(f"distillation step {step}/{total} loss {loss:.5f}", flush=True)

    merged = distill_experts(bundle, experts, weights, pairs, settings, name=args.name or Path(args.output).stem,
                             progress=progress)
    path = lora_files.save_expert(merged, args.output, key_format=args.format, uniform_alpha=True)
    print(merged.describe())
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("statistics", "distill") else ""
    if command:
        argv = argv[1:]
    args = (build_distill_parser() if command == "distill" else build_parser(command == "statistics")).parse_args(argv)
    try:
        if command == "distill":
            return run_distill(args)
        return run_statistics(args) if command == "statistics" else run_merge(args)
    except SafetyDPOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
