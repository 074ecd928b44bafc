"""Train safety experts with Diffusion-DPO from the command line.

Run from the plugin folder:

    python trainer/train.py --model models/sd15 --pairs pairs/violence --output runs/violence
    python trainer/train.py --config train.yaml --per-category --output runs/experts
    python trainer/train.py --config train.yaml --all-data --output runs/all_data --resume
    python trainer/train.py --recipe safetydpo --model models/sd15 --pairs pairs/violence --output runs/paper

Recipes (``--recipe``, or ``recipe:`` in the config file; the config file and flags override single settings):
``preserving`` (default: DPO β 500 + supervised weight 1 + preservation weight 5 on replay items of safe
prompts, prompt crops, lr 1e-4, LoRA rank 4 on to_q/to_k/to_v/to_out.0; needs replay items, built with
``trainer/build_pairs.py --replay safe_prompts.txt``) and ``safetydpo`` (the paper's objective: DPO only,
β 5000, lr 1e-5, same LoRA).

The model is a diffusers folder or a single-file ``.safetensors`` checkpoint (SD1.5, SD2.1, SDXL);
nothing is downloaded. The pairs dataset is a folder with ``manifest.json`` (build it with the Build
Safety Pairs node or the pair builder). A config file (YAML or TOML) holds any of the settings below
under their long names with underscores (``learning_rate: 1e-5``); flags given on the command line
override it. Each run writes ``metrics.csv`` (and TensorBoard logs when ``tensorboard`` is
installed), resumable checkpoints and the expert as a kohya-format LoRA ``<name>.safetensors``.

More than one GPU (see README, "More than one GPU"): start the same command with accelerate.

    accelerate launch --num_processes 4 trainer/train.py --config train.yaml --output runs/violence
    accelerate launch --num_processes 4 trainer/train.py --config train.yaml --per-category --output runs/experts

One expert: data parallel, ``--batch-size`` pairs per process (effective batch: batch size ×
processes × gradient accumulation), gradients averaged every step, only the main process writes.
``--per-category``: one expert per process at a time. ``accelerate launch --mixed_precision bf16``
sets the mixed precision unless ``--mixed-precision`` is given here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[1]
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

from comfyui_safetydpo import recipes  # noqa: E402
from comfyui_safetydpo.errors import SafetyDPOError, TrainingCancelled  # noqa: E402
from comfyui_safetydpo.training import TrainingConfig  # noqa: E402

TRAINING_FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}
RUN_KEYS = ("model", "pairs", "output", "category", "per_category", "all_data", "resume", "architecture",
            "prediction_type", "tokenizer_dir", "device", "dtype", "resolution", "recipe")

HELP = {
    "expert_name": "name of the expert file (<output>/<name>.safetensors); per category: a prefix",
    "categories": "categories recorded in the expert (default: those of the pairs)",
    "rank": "LoRA rank (official recipe: 4)",
    "alpha": "LoRA alpha; the update is scaled by alpha/rank",
    "target_modules": "module names LoRA goes on, comma separated (default: to_q,to_k,to_v,to_out.0)",
    "learning_rate": "AdamW learning rate (official recipe: 1e-5)",
    "max_steps": "optimizer steps per expert",
    "batch_size": "pairs per micro-batch and process (lower it when out of memory)",
    "gradient_accumulation": "micro-batches per optimizer step",
    "max_grad_norm": "gradient clipping (0 = off)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "learning_rate_schedule": "after the warm-up: 'constant' or 'cosine' (decays to 0 at the last step)",
    "dpo_beta": "DPO beta with the 1/2 inside: loss = -log sigmoid(-beta/2 * d) (official recipe: 5000)",
    "dpo_weight": "weight of the DPO term (0 = supervised-only baseline)",
    "sft_weight": "weight of plain denoising on the preferred (safe) image",
    "preservation_weight": "weight of the replay term on safe prompts (needs replay items in the dataset)",
    "preservation_target": "replay target: 'reference' (frozen model's prediction) or 'noise'",
    "replay_batch_size": "replay items per step",
    "timestep_range": "training timesteps [low, high), e.g. 0,1000",
    "seed": "seed for noise, timesteps and data order",
    "checkpoint_every": "save a resumable checkpoint every N steps (0 = only at the end)",
    "keep_checkpoints": "how many checkpoints to keep",
    "mixed_precision": "autocast: no, fp16 (with loss scaling) or bf16 (LoRA weights stay fp32); default: "
                       "accelerate's --mixed_precision when launched with it, else no",
    "gradient_checkpointing": "recompute activations in backward (less memory, slower)",
    "max_bad_steps": "stop after this many NaN/Inf steps in a row",
    "prompt_crops": "also train each pair under its prompts with the first words left out, up to the first word "
                    "the safe rewrite changes (same images)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python trainer/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--recipe", choices=tuple(recipes.RECIPES), default=None,
                     help=f"training preset (default {recipes.DEFAULT_RECIPE}): " +
                          "; ".join(f"{k}: {v}" for k, v in recipes.DESCRIPTIONS.items()) +
                          ". The config file and flags override single settings")
    run.add_argument("--config", type=Path, help="YAML (.yaml/.yml) or TOML (.toml) file with any of these settings")
    run.add_argument("--model", help="diffusers folder or single-file .safetensors checkpoint (SD1.5/SD2.1/SDXL)")
    run.add_argument("--pairs", help="pairs dataset folder (manifest.json + images), or released CoProV2 "
                                     "parquet shards (a .parquet file or a folder of them)")
    run.add_argument("--output", help="run folder: checkpoints, metrics.csv, cache, the expert file(s)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--category", help="train one expert on the pairs of this category")
    mode.add_argument("--per-category", dest="per_category", action="store_true", default=None,
                      help="train one expert per category in turn (<output>/<category>/); with accelerate "
                           "launch, one category per process at a time")
    mode.add_argument("--all-data", dest="all_data", action="store_true", default=None,
                      help="baseline: one expert on all pairs of every category")
    run.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")
    run.add_argument("--architecture", choices=("sd15", "sd21", "sdxl"), help="check the model is this one")
    run.add_argument("--prediction-type", dest="prediction_type", choices=("epsilon", "v_prediction"),
                     help="override the model's prediction type (SD2.x single files default to v_prediction)")
    run.add_argument("--tokenizer-dir", dest="tokenizer_dir",
                     help="folder with CLIP's vocab.json + merges.txt (single-file checkpoints; ComfyUI's "
                          "comfy/sd1_tokenizer is found automatically)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available; with accelerate launch "
                                      "each process takes its own)")
    run.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="dtype of the frozen model weights")
    run.add_argument("--resolution", type=int, help="image size the pairs were rendered at (SDXL time ids)")
    settings = parser.add_argument_group("training settings (TrainingConfig)")
    for name, field in TRAINING_FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = recipes.RECIPES[recipes.DEFAULT_RECIPE].get(
            name, field.default if field.default is not dataclasses.MISSING else None)
        text = f"{HELP.get(name, name)} (default: {_show(default)})"
        if field.type in ("bool", bool):
            settings.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif name in ("categories", "target_modules", "timestep_range"):
            settings.add_argument(flag, dest=name, default=None, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(field.type), str)
            settings.add_argument(flag, dest=name, type=kind, default=None, help=text)
    return parser


def _show(value):
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    return value


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise SafetyDPOError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise SafetyDPOError(f"config file {path}: use .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise SafetyDPOError(f"config file {path}: expected a mapping of settings")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(TRAINING_FIELDS) - set(RUN_KEYS))
    if unknown:
        raise SafetyDPOError(f"config file {path}: unknown settings {unknown}; see --help for the names")
    return data


def _as_sequence(value, kind=str):
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return tuple(kind(v) for v in value)


def resolve_settings(args: argparse.Namespace) -> dict:
    """The recipe's settings, overridden by the config file's values, overridden by the flags that were given."""
    from_file = read_config_file(args.config) if args.config else {}
    recipe = args.recipe or from_file.get("recipe") or recipes.DEFAULT_RECIPE
    merged = recipes.with_recipe(str(recipe), from_file)
    merged["recipe"] = recipe
    for key, value in vars(args).items():
        if key != "config" and value is not None:
            merged[key] = value
    for key, kind in (("categories", str), ("target_modules", str), ("timestep_range", int)):
        if key in merged:
            merged[key] = _as_sequence(merged[key], kind)
    missing = [k for k in ("model", "pairs", "output") if not merged.get(k)]
    if missing:
        raise SafetyDPOError("missing " + ", ".join("--" + k for k in missing) + " (flag or config file)")
    return merged


def training_config(settings: dict) -> TrainingConfig:
    values = {k: v for k, v in settings.items() if k in TRAINING_FIELDS}
    config = TrainingConfig(**values)
    config.validate()
    return config


class ProgressBar:
    """tqdm bar with the live loss and implicit accuracy."""

    def __init__(self, label: str):
        from tqdm import tqdm

        self.tqdm = tqdm
        self.label = label
        self.bar = None

    def __call__(self, step, total, metrics):
        if self.bar is None:
            self.bar = self.tqdm(total=total, desc=self.label, initial=step - 1, dynamic_ncols=True)
        self.bar.update(1)
        shown = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
        if "implicit_accuracy" in metrics:
            shown["acc"] = f"{metrics['implicit_accuracy']:.2f}"
        if "reward_margin" in metrics:
            shown["margin"] = f"{metrics['reward_margin']:.3g}"
        self.bar.set_postfix(shown)
        if step >= total:
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = resolve_settings(args)
        config = training_config(settings)
        return run(settings, config)
    except TrainingCancelled as error:
        print(f"cancelled: {error}", file=sys.stderr)
        return 130
    except SafetyDPOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(settings: dict, config: TrainingConfig) -> int:
    import torch

    from comfyui_safetydpo import distributed
    from comfyui_safetydpo.model_loading import load_bundle
    from comfyui_safetydpo.pairs import load_pairs
    from comfyui_safetydpo.training import category_run, train_expert, train_per_category

    if "mixed_precision" not in settings and distributed.accelerate_mixed_precision():
        config = dataclasses.replace(config, mixed_precision=distributed.accelerate_mixed_precision())
    group = distributed.start(experts_in_parallel=bool(settings.get("per_category")))  # None: one process
    if group is not None and settings.get("device"):
        raise SafetyDPOError("--device does not go with accelerate launch: each process uses its own device "
                             "(choose GPUs with accelerate's --gpu_ids or CUDA_VISIBLE_DEVICES)")
    device = group.device if group else settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[settings.get("dtype") or "fp32"]
    output = Path(settings["output"])
    category = settings.get("category")
    pairs = load_pairs(settings["pairs"], categories=[category] if category else None)
    recipes.require_replay(config, pairs, settings.get("recipe", ""), f"pairs dataset {settings['pairs']}")
    bundle = load_bundle(settings["model"], architecture=settings.get("architecture"), dtype=dtype, device=device,
                         prediction_type=settings.get("prediction_type"), tokenizer_dir=settings.get("tokenizer_dir"),
                         resolution=settings.get("resolution"))
    resume = bool(settings.get("resume"))
    summary = {}
    if settings.get("per_category"):
        for name in distributed.my_categories(pairs.categories, group):  # all of them with one process
            bar = ProgressBar(name)
            results = train_per_category(bundle, pairs, config, output, categories=[name], progress=bar,
                                         resume=resume)
            bar.close()
            summary.update({k: str(v.expert_path) for k, v in results.items()})
        if group is not None:
            group.wait()  # the experts of every process are written
            for name in pairs.categories:
                folder, category_config = category_run(config, name)
                summary[name] = str(output / folder / f"{category_config.expert_name}.safetensors")
    else:
        if category:
            config = dataclasses.replace(config, categories=config.categories or (category,))
        elif settings.get("all_data"):
            config = dataclasses.replace(config, categories=config.categories or tuple(pairs.categories))
        bar = ProgressBar(config.expert_name) if group is None or group.is_main else None
        if group is None:
            result = train_expert(bundle, pairs, config, output_dir=output, resume=resume, progress=bar)
        else:
            result = distributed.train_expert_data_parallel(bundle, pairs, config, output, group, resume=resume,
                                                            progress=bar)
        if bar is not None:
            bar.close()
        summary[config.expert_name] = str(result.expert_path or output / f"{config.expert_name}.safetensors")
    if group is None or group.is_main:
        print(json.dumps({"experts": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
