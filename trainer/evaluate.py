"""Evaluate a model with and without safety LoRAs on a prompt list: unsafe rate per category, fidelity, report.

Run from the plugin folder (``ComfyUI/custom_nodes/safetydpo``) with ComfyUI's Python or ``.venv``:

    python trainer/evaluate.py --model path/to/diffusers_or_checkpoint.safetensors \\
        --lora merged=experts/merged.safetensors --strengths 0.5,1.0 \\
        --prompts prompts.txt --seeds 4 --steps 25 --classifier opennsfw --output eval_runs/sd15

Prompt lists: ``--prompts`` takes a ``.txt`` file (``prompt | category`` per line), a CSV with
``prompt`` and ``category`` columns (I2P, UD, Ring-A-Bell... exported that way) or YAML;
``--coprov2 FILE`` reads the CoProV2 test split. Variants: ``base`` plus every ``--lora NAME=FILE``
at every ``--strengths`` value (named ``NAME`` at strength 1, else ``NAME@S``). The run is resumable:
run the same command again after an interruption. Another configuration in the same ``--output`` is
refused; use a new folder. Classifiers: skin_tone (no weights; a crude heuristic), opennsfw, nudenet,
q16 and clip_zero_shot (local CLIP: ``--clip-dir``; Q16 prompts: ``--q16-prompts``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[1]
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

from comfyui_safetydpo import classifiers, evaluation, files, reports  # noqa: E402
from comfyui_safetydpo.errors import DatasetError, SafetyDPOError  # noqa: E402


def _file_digest(path: Path) -> str:
    return files.sha256_file(path)[:16]


def parse_loras(values):
    loras = []
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep:
            path, name = value, Path(value).stem
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"--lora {value}: file {path} does not exist")
        loras.append((name.strip(), path))
    names = [n for n, _ in loras]
    if len(set(names)) != len(names):
        raise DatasetError(f"--lora names repeat: {names}; write NAME=FILE")
    return loras


def parse_seeds(text: str):
    if "," in text or "-" in text[1:]:
        seeds = []
        for part in text.split(","):
            if "-" in part[1:]:
                start, end = part.split("-", 1)
                seeds.extend(range(int(start), int(end) + 1))
            elif part.strip():
                seeds.append(int(part))
        return seeds
    return list(range(int(text)))


def load_prompts(args):
    if args.coprov2:
        return evaluation.coprov2_prompts(args.coprov2, split=args.split)
    if args.prompts:
        return evaluation.load_prompt_file(args.prompts)
    raise DatasetError("give a prompt list: --prompts FILE (txt/csv/yaml) or --coprov2 FILE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="diffusers folder or single-file .safetensors checkpoint")
    parser.add_argument("--lora", action="append", help="NAME=FILE of an aligned LoRA (repeatable)")
    parser.add_argument("--strengths", default="1.0", help="comma-separated LoRA strengths (quality-vs-safety curve)")
    parser.add_argument("--prompts", help="prompt list: .txt ('prompt | category'), .csv or .yaml")
    parser.add_argument("--coprov2", help="CoProV2 CSV (its --split is used)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--seeds", default="2", help="number of seeds (0..N-1) or a list such as 1,2,7-9")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--classifier", default="skin_tone", choices=sorted(classifiers.CLASSIFIERS))
    parser.add_argument("--threshold", type=float, default=None, help="classifier threshold (default: its own)")
    parser.add_argument("--clip-dir", help=f"local CLIP folder (or {evaluation.CLIP_ENV})")
    parser.add_argument("--q16-prompts", help=f"Q16 prompt embeddings .npy/.safetensors (or {classifiers.Q16_ENV})")
    parser.add_argument("--tokenizer-dir", help="CLIP tokenizer folder for single-file checkpoints")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", required=True, help="run folder (resumable; one configuration per folder)")
    parser.add_argument("--no-blur", action="store_true", help="show unsafe images unblurred in the grid")
    return parser


def classifier_options(args):
    options = {}
    if args.threshold is not None:
        options["threshold"] = args.threshold
    if args.classifier in ("q16", "clip_zero_shot") and args.clip_dir:
        options["clip_dir"] = args.clip_dir
    if args.classifier == "q16" and args.q16_prompts:
        options["prompts_path"] = args.q16_prompts
    return options


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompts = load_prompts(args)
        seeds = parse_seeds(args.seeds)
        loras = parse_loras(args.lora)
        strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
        classifier = classifiers.create_classifier(args.classifier, **classifier_options(args))

        import torch

        from comfyui_safetydpo import calibration, lora_files
        from comfyui_safetydpo.model_loading import load_bundle

        bundle = load_bundle(args.model, device=args.device, tokenizer_dir=args.tokenizer_dir,
                             resolution=args.resolution)
        lookup = calibration.diffusers_module_lookup(
            bundle.unet, {f"text_encoder{'' if i == 0 else '_2'}": e for i, e in enumerate(bundle.text_encoders)})
        base_render = evaluation.bundle_renderer(bundle, steps=args.steps, guidance_scale=args.cfg)
        variants = [evaluation.Variant("base", 0.0, f"{Path(args.model).name}")]
        renderers = {"base": base_render}
        for name, path in loras:
            expert = lora_files.load_expert(path, name=name)
            for strength in strengths:
                variant = name if strength == 1.0 and len(strengths) == 1 else f"{name}@{strength:g}"

                def render(prompts_, seeds_, expert=expert, strength=strength):
                    with calibration.expert_applied(expert, lookup, strength), torch.no_grad():
                        return base_render(prompts_, seeds_)

                variants.append(evaluation.Variant(variant, strength,
                                                   f"{path.name} ({_file_digest(path)}) at {strength:g}"))
                renderers[variant] = render
        settings = {"model": str(Path(args.model).resolve()), "steps": args.steps, "cfg": args.cfg,
                    "resolution": args.resolution or bundle.resolution,
                    "loras": {n: _file_digest(p) for n, p in loras}}
        run = evaluation.EvaluationRun(args.output, prompts, seeds, variants, settings).open()

        def progress(done, total, _image):
            print(f"\rimages {done}/{total}", end="", flush=True)

        run.generate(renderers, batch_size=args.batch_size, progress=progress)
        print()
        counts = run.classify(classifier)
        summary = evaluation.summarize(run, classifier.name)
        report = reports.write_report(summary, blur_unsafe=not args.no_blur)
    except SafetyDPOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"classified {counts['classified']} new image(s), {summary.failures} failure(s) in total")
    print(f"{'variant':<16} {'category':<20} {'n':>4} {'unsafe %':>9}  95% CI")
    for row in summary.rates:
        print(f"{row['variant']:<16} {row['category']:<20} {row['n']:>4} {100 * row['rate']:>8.1f}%  "
              f"{100 * row['ci_low']:.1f}–{100 * row['ci_high']:.1f}")
    for row in summary.fidelity:
        print(f"{row['variant']:<16} safe prompts changed {100 * row['changed_rate']:.1f}% "
              f"(MAD {row['mad']:.4f}, SSIM {row['ssim']:.4f}, n={row['n']})")
    print(f"report: {report.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
