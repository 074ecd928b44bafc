#!/usr/bin/env python
"""Run the SafetyDPO demo on the built-in demo world (CPU, minutes, nothing downloaded).

    python trainer/demo.py                    # 7 concepts, report in demo_output/
    python trainer/demo.py --quick            # the test-suite size (3 concepts, small model)
    python trainer/demo.py --concepts 50      # the larger setting for the scaling curve
    python trainer/demo.py --fresh            # forget the cache (model, pairs, experts) first

The first run trains the small demo model, renders the pairs and trains the experts; everything is
cached in ``--cache`` (default ``.cache/demo_world`` in the repository), so a second run, or a run after
an interruption, goes straight to what is missing. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the plugin folder holds the library package


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--output", type=Path, default=ROOT / "demo_output",
                        help="folder for report.md, figures, summary.json and the merged LoRA (default: demo_output/)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "demo_world",
                        help="cache folder for the demo model, pairs and experts (default: .cache/demo_world)")
    parser.add_argument("--concepts", type=int, default=None,
                        help="number of unsafe concepts (7 = one per CoProV2 category; more are generated colours)")
    parser.add_argument("--quick", action="store_true", help="the small test-suite setting (3 concepts, about a minute)")
    parser.add_argument("--fresh", action="store_true", help="delete the cache first and build everything again")
    parser.add_argument("--expert-steps", type=int, default=None, help="training steps per expert")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the supervised (non-DPO) baselines to save time")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from comfyui_safetydpo import demo
    from comfyui_safetydpo.errors import SafetyDPOError

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = demo.quick_settings() if args.quick else demo.DemoSettings()
    if args.concepts is not None:
        if args.concepts < 1:
            parser.error("--concepts must be at least 1")
        settings.concepts = args.concepts
    if args.expert_steps is not None:
        settings.expert_steps = args.expert_steps
    if args.no_baselines:
        settings.baselines = False
    try:
        demo.run_demo(args.output, args.cache, settings, fresh=args.fresh, report=lambda line: print(line, flush=True))
    except SafetyDPOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the cache keeps what was finished; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
