"""Extract a safety expert from a safety-aligned model and the base it was fine-tuned from.

Run from the plugin folder (``ComfyUI/custom_nodes/safetydpo``) with ComfyUI's Python or ``.venv``:

    # the released SafetyDPO SD1.5 model (a diffusers folder) against SD1.5 (a single-file checkpoint)
    python trainer/extract.py --safe path/to/safe-stable-diffusion-v1-5 \\
        --base models/checkpoints/v1-5-pruned-emaonly.safetensors --rank 32 \\
        --output models/safety_experts/safetydpo_sd15.safetensors

Models: single-file checkpoints (``.safetensors``), UNet-only files, diffusers folders (``unet/``) or
bare UNet folders, in any mix of LDM and diffusers key names. Nothing is downloaded; pickles
(.ckpt/.bin) are refused. ``--rank N`` writes a LoRA of rank N per module; ``--energy 0.99`` the
smallest rank per module keeping 99 % of ‖ΔW‖² (up to ``--max-rank``); neither writes the exact
weight differences (``.diff``, loadable by ComfyUI, larger files). ``--layers`` takes presets
(attention — what SafetyDPO trained —, cross_attention, cross_attention_kv, self_attention,
transformer, unet, text_encoder), globs over module names (``*attn2.to_k``) or ``re:<regex>``,
comma-separated. Differences in other layers are listed in the report, never dropped silently.
The output is a kohya-key LoRA with explicit alpha (ComfyUI LoraLoader, A1111/Forge, diffusers), its
categories and the extraction report (relative error per module and overall) in the metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[1]
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

from comfyui_safetydpo import extraction, files, lora_files  # noqa: E402
from comfyui_safetydpo.errors import SafetyDPOError  # noqa: E402
from comfyui_safetydpo.pairs import CATEGORIES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer/extract.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--safe", required=True, help="the safety-aligned model (file or diffusers folder)")
    parser.add_argument("--base", required=True, help="the model it was fine-tuned from (file or diffusers folder)")
    parser.add_argument("--output", required=True, help="expert file to write (.safetensors)")
    parser.add_argument("--layers", default="attention",
                        help=f"presets ({', '.join(extraction.LAYER_PRESETS)}), globs or re:<regex>, comma-separated "
                             "(default %(default)s)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="LoRA rank per module")
    size.add_argument("--energy", type=float, help="share of ‖ΔW‖² to keep per module, in (0, 1]")
    parser.add_argument("--max-rank", type=int, default=128, help="rank cap for --energy (default %(default)s)")
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help="harm categories the aligned model covers, comma-separated; CoProV2 names or your own "
                             "(default: all seven CoProV2 categories)")
    parser.add_argument("--name", help="expert name (default: output file name)")
    parser.add_argument("--format", default="kohya", choices=("kohya", "native"), help="key format of the output")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="tensor type in the file (default %(default)s)")
    parser.add_argument("--device", default=None, help="where the SVDs run: cpu, cuda, mps (default: cuda when "
                                                      "available, else cpu)")
    parser.add_argument("--report", help="also write the full report (per-module errors, unrequested "
                                         "differences) as JSON here")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    try:
        categories = extraction.parse_categories(args.categories)
        safe = extraction.weights_from_path(args.safe)
        base = extraction.weights_from_path(args.base)
        output = Path(args.output)
        expert, report = extraction.extract_expert(
            safe, base, layers=args.layers, rank=args.rank, energy=args.energy, max_rank=args.max_rank,
            name=args.name or output.stem, categories=categories,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        lora_files.save_expert(expert, output, key_format=args.format, dtype=getattr(torch, args.dtype),
                                uniform_alpha=True)
        if args.report:
            files.write_text(args.report, json.dumps(json.loads(report.to_json()), indent=2), what="extraction report")
    except SafetyDPOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {expert.describe()} to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
