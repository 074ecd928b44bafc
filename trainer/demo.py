#!/usr/bin/env python
"""Run the SafetyDPO demo on the built-in demo world (CPU, minutes, nothing downloaded).

    python trainer/demo.py                    # 7 concepts, seed 0, report in demo_output/
    python trainer/demo.py --seeds 0 1 2      # three seeds: report with mean and range (the README's table)
    python trainer/demo.py --seed 5           # any other seed (a new seed trains its world model first)
    python trainer/demo.py --quick            # the test-suite size (3 concepts, fewer steps)
    python trainer/demo.py --scaling          # the scaling curve, k = 1, 7, 15, 30, 50 concepts (1.5 h on 2 cores)
    python trainer/demo.py --fresh            # forget the cache (pairs, experts, trained world models) first
    python trainer/demo.py --retrain-world    # train the world model again instead of the shipped weights
    python trainer/demo.py --world-only       # only check how faithfully the world model draws the prompts

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
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--output", type=Path, default=ROOT / "demo_output",
                        help="folder for report.md, figures, summary.json and the merged LoRA (default: demo_output/)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "demo_world",
                        help="cache folder for the demo model, pairs and experts (default: .cache/demo_world)")
    parser.add_argument("--concepts", type=int, default=None,
                        help="number of unsafe concepts (7 = one per CoProV2 category; more are further concept "
                             "words, each drawn as one of the seven colours and taught to the world model by textual "
                             "inversion)")
    parser.add_argument("--quick", action="store_true",
                        help="the small test-suite setting (3 concepts, a few minutes)")
    parser.add_argument("--fresh", action="store_true", help="delete the cache first and build everything again")
    parser.add_argument("--expert-steps", type=int, default=None, help="training steps per expert")
    parser.add_argument("--expert-learning-rate", type=float, default=None,
                        help="learning rate of the DPO experts (default: the demo recipe's 3e-3; docs/demo.md "
                             "also has 1e-3, the default before three seeds were measured)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the world model, the pairs, the experts and the held-out evaluation (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run several seeds and write seeds.md with the mean and range of every measure")
    parser.add_argument("--no-baselines", action="store_true",
                        help="only the default merge (no Co-Merge, linear, TIES or one-expert-on-all comparison)")
    parser.add_argument("--all-baselines", action="store_true",
                        help="also row Co-Merge and the supervised (non-DPO) experts")
    parser.add_argument("--all-checks", action="store_true",
                        help="also train one expert on all data (measured alone and behind the prompt gate), apply "
                             "each expert alone, check the default merge's per-concept weights and test the prompt "
                             "gate on synonyms the world model learns afterwards (what the README's three-seed table "
                             "measures; the default run leaves them out to stay short)")
    parser.add_argument("--weight-check", nargs="+", metavar="CONCEPT", default=None,
                        help="check the default merge's per-concept weights for these concepts only (each at 0 in "
                             "turn; each check is one more merge: for the distillation merge, minutes of training); "
                             "--all-checks checks every concept")
    parser.add_argument("--merge", choices=("distillation", "least_squares", "co_merge", "linear", "ties"),
                        default=None, help="the merge written as the demo's LoRA (default distillation)")
    parser.add_argument("--scaling", action="store_true",
                        help="the scaling curve: removal and collateral against the number of concepts (k = 1, 7, 15, "
                             "30, 50) for the default merge (--merge), least squares, Co-Merge, linear, the gated "
                             "experts and one expert on all data (at k = 7 and 50); 50 concepts unless --concepts "
                             "says otherwise, without the per-concept checks (1.5-2 hours on a 2-core CPU)")
    parser.add_argument("--retrain-world", action="store_true",
                        help="train the world model again (and write it where the shipped weights live)")
    parser.add_argument("--world-only", action="store_true",
                        help="stop after the world model: print how often it draws what the prompt says")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that train experts at once, one torch thread each (0 = one per CPU core; "
                             "1 = all in this process)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from comfyui_safetydpo import demo
    from comfyui_safetydpo.errors import SafetyDPOError

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = demo.quick_settings() if args.quick else demo.DemoSettings()
    if args.scaling:
        settings.concepts, settings.baselines = 50, False
        settings.weight_zero_checks = settings.experts_alone = False
        settings.scaling_one_on_all = (7, 50)
    if args.concepts is not None:
        if args.concepts < 1:
            parser.error("--concepts must be at least 1")
        settings.concepts = args.concepts
    if args.expert_steps is not None:
        settings.expert_steps = args.expert_steps
    if args.expert_learning_rate is not None:
        settings.recipe = dict(settings.recipe, learning_rate=args.expert_learning_rate)
    if args.no_baselines:
        settings.baselines = False
    if args.all_baselines:
        settings.all_baselines = True
    if args.all_checks:
        settings.one_on_all = settings.experts_alone = settings.synonyms = settings.merged_weight_zero = True
    if args.merge:
        settings.merge_method = args.merge
    if args.weight_check:
        from comfyui_safetydpo.demo_world import DemoWorld

        known = [c.name for c in DemoWorld(settings.concepts).concepts]
        unknown = [name for name in args.weight_check if name not in known]
        if unknown:
            parser.error(f"--weight-check: unknown concept(s) {', '.join(unknown)}; the demo's are {', '.join(known)}")
        settings.merged_weight_zero = True
        settings.merged_weight_zero_concepts = tuple(args.weight_check)
    if args.workers < 0:
        parser.error("--workers must be 0 (one per CPU core) or more")
    settings.workers = args.workers
    if args.seed is not None and args.seeds is not None:
        parser.error("give --seed or --seeds, not both")
    if args.seed is not None:
        settings = settings.with_seed(args.seed)
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    try:
        if args.world_only:
            for seed in args.seeds or [settings.seed]:
                demo.check_world_model(args.cache, settings.with_seed(seed), retrain=args.retrain_world,
                                       report=lambda line: print(line, flush=True))
        elif args.seeds:
            demo.run_seeds(args.output, args.cache, settings, args.seeds, fresh=args.fresh,
                           report=lambda line: print(line, flush=True), retrain_world=args.retrain_world)
        else:
            demo.run_demo(args.output, args.cache, settings, fresh=args.fresh,
                          report=lambda line: print(line, flush=True), retrain_world=args.retrain_world)
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
