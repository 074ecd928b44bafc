"""Render preference pairs (unsafe vs safe prompt, same seed) with a local model into a dataset folder.

Run from the plugin folder (``ComfyUI/custom_nodes/safetydpo``) with ComfyUI's Python or ``.venv``:

    python trainer/build_pairs.py --model path/to/diffusers_folder_or_checkpoint.safetensors \\
        --concepts my_concepts.csv --images-per-prompt 2 --steps 25 --cfg 7.5 --output pairs/sd15_mine

    python trainer/build_pairs.py --model ... --coprov2 ../shared/data/coprov2 \\
        --categories Sexual,Violence --limit 500 --output pairs/sd15_coprov2

Prompt pairs come from ``--concepts`` (CSV ``unsafe_prompt,safe_prompt,category[,concept]``, YAML
``pairs:`` list, or ``.txt`` lines ``unsafe | safe | category``) or from the CoProV2 training file
(``--coprov2 FILE_OR_FOLDER``; default ``$SAFETYDPO_COPROV2``). The released CoProV2 images need no
model: ``--coprov2-parquet SHARDS`` (a .parquet file or a folder of them; columns caption, jpg_0 = safe
and preferred, jpg_1 = unsafe and rejected, label_0) writes them as a dataset folder, categories matched
from the training CSV (``--coprov2`` or its default location). ``--replay FILE`` (one safe prompt per
line) also renders the base model's own images for the preservation term. The build is resumable:
run the same command again after an interruption. Nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[1]
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

from comfyui_safetydpo.errors import SafetyDPOError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", help="diffusers folder or single-file .safetensors checkpoint (to render)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--concepts", help="concept file: .csv, .yaml/.yml or .txt")
    source.add_argument("--coprov2-parquet", help="released CoProV2 image shards: a .parquet file or a folder "
                                                  "(no rendering, no --model)")
    source.add_argument("--coprov2", nargs="?", const="", help="CoProV2 training CSV or its folder")
    parser.add_argument("--coprov2-csv", help="with --coprov2-parquet: the training CSV (or its folder) whose "
                                              "prompts give each pair its categories (default $SAFETYDPO_COPROV2)")
    parser.add_argument("--categories", default="", help="comma-separated categories to keep (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N prompt pairs (after --categories)")
    parser.add_argument("--output", required=True, help="dataset folder to write (resumes if it exists)")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed; each pair's seeds derive from it and its prompts "
                             "(same seed for unsafe and safe)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--replay", default=None, help="text file of safe prompts for replay images")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                        help="bad rows in the prompt file: stop with a list (raise) or skip them with a count")
    return parser.parse_args(argv)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def load_prompt_pairs(args):
    from comfyui_safetydpo.concepts import load_concept_file
    from comfyui_safetydpo.coprov2 import load_coprov2_train

    categories = [c.strip() for c in args.categories.split(",") if c.strip()] or None
    if args.concepts:
        pairs = load_concept_file(args.concepts, on_error=args.on_error).select(categories)
        if args.limit is not None:
            pairs = pairs[: args.limit]
        return pairs, f"concepts:{Path(args.concepts).name}"
    pairs = load_coprov2_train(args.coprov2 or None, categories=categories, on_error=args.on_error, limit=args.limit)
    return pairs, "coprov2"


def from_parquet(args) -> int:
    """The released images as a dataset folder: nothing is rendered."""
    from comfyui_safetydpo.coprov2 import coprov2_from_parquet, load_coprov2_train

    categories = [c.strip() for c in args.categories.split(",") if c.strip()] or None
    try:
        try:
            prompt_pairs = load_coprov2_train(args.coprov2_csv or None, on_error="skip")
        except SafetyDPOError:
            if args.coprov2_csv:
                raise
            prompt_pairs = None
            print("warning: no CoProV2 training CSV found (--coprov2-csv / $SAFETYDPO_COPROV2): every pair is "
                  "'Uncategorised'", file=sys.stderr)
        dataset = coprov2_from_parquet(args.coprov2_parquet, args.output, prompt_pairs=prompt_pairs,
                                       on_error=args.on_error)
        if categories is not None or args.limit is not None:
            from comfyui_safetydpo.pairs import normalise_category

            extra = dataset.info.get("extra_categories", [])
            wanted = None if categories is None else [normalise_category(c, extra) for c in categories]
            chosen = dataset.select(wanted).pairs[: args.limit]
            if not chosen:
                raise SafetyDPOError(f"no pair of categories {wanted} in the shards (present: {dataset.categories})")
            dataset.pairs = chosen
            dataset.save(args.output)
    except SafetyDPOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(dataset)} pairs from the released images in {args.output} ({dataset.info['unmatched']} without a "
          f"CoProV2 prompt match); categories {dataset.category_counts()}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.coprov2_parquet:
        return from_parquet(args)
    if not args.model:
        print("error: --model is required to render pairs (only --coprov2-parquet needs none)", file=sys.stderr)
        return 2
    import torch

    from comfyui_safetydpo.model_loading import load_bundle
    from comfyui_safetydpo.pair_builder import build_pairs

    try:
        prompt_pairs, source = load_prompt_pairs(args)
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            args.dtype, torch.float16 if args.device.startswith("cuda") else torch.float32)
        bundle = load_bundle(args.model, dtype=dtype, device=args.device, resolution=args.resolution)
        render = functools.partial(bundle.sample, steps=args.steps, guidance_scale=args.cfg,
                                   negative_prompt=args.negative_prompt, keep_latents=True)
        replay = []
        if args.replay:
            replay = [line.strip() for line in Path(args.replay).read_text(encoding="utf-8").splitlines()
                      if line.strip() and not line.strip().startswith("#")]
        model_info = {"name": Path(args.model).name, "architecture": bundle.architecture,
                      "prediction_type": bundle.prediction_type, "resolution": bundle.resolution}
        sampler = {"sampler": "ddim", "steps": args.steps, "cfg": args.cfg,
                   "negative_prompt": args.negative_prompt, "source": source}

        def progress(done, total):
            print(f"\r{done}/{total} prompt units", end="", file=sys.stderr, flush=True)

        dataset = build_pairs(render, prompt_pairs, args.output, images_per_prompt=args.images_per_prompt,
                              base_seed=args.seed, model_info=model_info, sampler_settings=sampler,
                              progress=progress, replay_prompts=replay)
    except SafetyDPOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\n{len(dataset)} pairs ({dataset.info['rendered_now']} prompt units rendered now) in {args.output}; "
          f"categories {dataset.category_counts()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
