"""Merging cost: Co-Merge of seven SD1.5-shaped rank-4 experts, the baselines, and the calibration pass.

Experts: random rank-4 factors (alpha 4) of the real SD1.5 shapes on every attention projection
(to_q, to_k, to_v, to_out.0 of attn1 and attn2 in all 16 transformer blocks: 128 modules).
Statistics are given (random, as a file would hold them), so this times the merge itself, checks and
fingerprints included. Every time is the median of several repeats and is reported as a ratio to the
exact linear merge timed in the same process (times on shared machines vary 3-5x between runs).
Goal: Co-Merge (row) < 0.5 s on CPU.

The calibration pass is timed on a reduced-width SD1.5-layout UNet (channels /8, same blocks): one
``collect_statistics`` over all seven experts against seven plain forward passes over the same inputs,
so the ratio is the overhead of the hooks and the temporary weight patching.

    .venv/bin/python bench/bench_merge.py          # full setting
    .venv/bin/python bench/bench_merge.py --tiny   # seconds
"""

from __future__ import annotations

import statistics as stats_lib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXPERTS = 7
RANK = 4
GOAL_SECONDS = 0.5
CONTEXT = 768

# SD1.5: (block prefix, channels) of every transformer block.
SD15_TRANSFORMERS = (
    [(f"down_blocks.{b}.attentions.{a}", c) for b, c in enumerate((320, 640, 1280)) for a in range(2)]
    + [("mid_block.attentions.0", 1280)]
    + [(f"up_blocks.{b}.attentions.{a}", c) for b, c in zip((1, 2, 3), (1280, 640, 320)) for a in range(3)]
)


def sd15_attention_shapes(width_divisor: int = 1, context: int = CONTEXT, blocks=None):
    """Canonical module name -> (out, in) for the attention projections of SD1.5 (optionally narrower)."""
    shapes = {}
    for prefix, channels in (blocks or SD15_TRANSFORMERS):
        dim = channels // width_divisor
        for attention, kv_in in (("attn1", dim), ("attn2", context)):
            base = f"unet.{prefix}.transformer_blocks.0.{attention}"
            shapes[f"{base}.to_q"] = (dim, dim)
            shapes[f"{base}.to_k"] = (dim, kv_in)
            shapes[f"{base}.to_v"] = (dim, kv_in)
            shapes[f"{base}.to_out.0"] = (dim, dim)
    return shapes


def random_experts(shapes, count: int = EXPERTS, rank: int = RANK, seed: int = 0):
    import torch

    from comfyui_safetydpo.expert import LoraModule, SafetyExpert

    generator = torch.Generator().manual_seed(seed)
    experts = []
    for k in range(count):
        modules = {name: LoraModule(torch.randn(rank, i, generator=generator) * 0.05,
                                    torch.randn(o, rank, generator=generator) * 0.05, float(rank))
                   for name, (o, i) in shapes.items()}
        experts.append(SafetyExpert(f"expert{k}", modules, architecture="sd15", categories=[f"concept{k}"]))
    return experts


def random_statistics(experts, seed: int = 1):
    import torch

    from comfyui_safetydpo.calibration import CalibrationStatistics, ModuleStatistics, expert_fingerprint

    generator = torch.Generator().manual_seed(seed)
    per_expert = {}
    for expert in experts:
        per_expert[expert.name] = {
            name: ModuleStatistics(torch.rand(m.weight_shape[0], generator=generator),
                                   torch.rand(m.weight_shape[1], generator=generator), 100)
            for name, m in expert.modules.items()}
    return CalibrationStatistics(per_expert, {e.name: expert_fingerprint(e) for e in experts})


def _restricted(expert, names):
    from comfyui_safetydpo.expert import SafetyExpert

    return SafetyExpert(expert.name, {n: expert.modules[n] for n in names}, architecture=expert.architecture,
                        categories=list(expert.categories))


def median_time(function, repeats: int) -> float:
    function()  # warm-up (first calls pay for lazy imports and allocator growth)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return stats_lib.median(times)


def reduced_unet(width_divisor: int, tiny: bool):
    """An SD1.5-layout diffusers UNet with channels divided by ``width_divisor`` (random weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if tiny:
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8)
    channels = tuple(c // width_divisor for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=8)


def calibration_rows(tiny: bool):
    import torch

    from comfyui_safetydpo import calibration
    from comfyui_safetydpo.expert import LoraModule, SafetyExpert

    unet = reduced_unet(8, tiny).eval()
    context = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(2)
    experts = []
    for k in range(2 if tiny else EXPERTS):
        modules = {}
        for name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-2:] in (["attn1", "to_q"], ["attn1", "to_k"],
                                                                                ["attn1", "to_v"], ["to_out", "0"],
                                                                                ["attn2", "to_q"], ["attn2", "to_k"],
                                                                                ["attn2", "to_v"]):
                modules[f"unet.{name}"] = LoraModule(torch.randn(RANK, module.in_features, generator=generator) * 0.05,
                                                     torch.randn(module.out_features, RANK, generator=generator) * 0.05,
                                                     float(RANK))
        experts.append(SafetyExpert(f"expert{k}", modules, architecture="unknown"))
    batches = 1 if tiny else 2
    timesteps = [500] if tiny else [200, 800]
    size = unet.config.sample_size
    hidden = [torch.randn(2, 77 if not tiny else 5, context, generator=generator) for _ in range(batches)]
    latents = torch.randn(2, 4, size, size, generator=generator)

    def plain_passes():
        with torch.no_grad():
            for _ in experts:
                for h in hidden:
                    for t in timesteps:
                        unet(latents, torch.full((2,), t), encoder_hidden_states=h)

    def calibrate():
        return calibration.calibrate_diffusers_unet(unet, experts, hidden, timesteps, (4, size, size),
                                                    _scheduler(), seed=0)

    plain = median_time(plain_passes, 1 if tiny else 2)
    calib = median_time(calibrate, 1 if tiny else 2)
    modules = len(experts[0].modules)
    return [
        {"measure": f"calibration pass ({len(experts)} experts x {modules} modules, {batches * len(timesteps)} "
                    f"UNet calls each, {'tiny' if tiny else 'SD1.5 layout, width/8, 32x32 latents'})",
         "value": calib, "unit": "s", "ratio": calib / plain, "baseline": f"{plain:.3g} s plain forwards",
         "goal": "report (overhead of hooks + patching)", "verdict": "reported"},
    ]


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def run(tiny: bool = False):
    """Rows for bench/run_all.py: merge times (ratios to the linear merge) and calibration cost.

    Runs on one CPU thread (restored afterwards): on a shared, loaded machine several threads per
    process spin against each other (a 28×28 SVD took 60 ms with 2 threads under load, <1 ms with 1),
    and one thread is the conservative figure for a user's machine.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(tiny)
    finally:
        torch.set_num_threads(threads)


def _run(tiny: bool):
    from comfyui_safetydpo import merging

    if tiny:
        shapes = sd15_attention_shapes(width_divisor=16, context=48, blocks=SD15_TRANSFORMERS[:2])
        repeats, count = 2, 3
    else:
        shapes = sd15_attention_shapes()
        repeats, count = 5, EXPERTS
    experts = random_experts(shapes, count)
    statistics = random_statistics(experts)
    weights = [1.0 - 0.1 * k for k in range(count)]
    setting = f"{count} experts x {len(shapes)} modules, rank {RANK}" + (" (tiny shapes)" if tiny else ", SD1.5 shapes")
    target = RANK * count

    linear = median_time(lambda: merging.merge_linear(experts, weights), repeats)
    co_row = median_time(lambda: merging.co_merge(experts, weights, statistics, "row"), repeats)
    svd = median_time(lambda: merging.merge_svd(experts, weights, rank=target), repeats)
    rows = [
        {"measure": f"linear merge (exact, rank concatenation), {setting}", "value": linear, "unit": "s",
         "ratio": 1.0, "baseline": "itself", "goal": "baseline", "verdict": "reported"},
        {"measure": f"Co-Merge row (exact, statistics given), {setting}", "value": co_row, "unit": "s",
         "ratio": co_row / linear, "baseline": f"linear {linear:.3g} s", "goal": f"< {GOAL_SECONDS} s on CPU",
         "verdict": "met" if co_row < GOAL_SECONDS else "missed"},
        {"measure": f"SVD of the linear merge to rank {target} (exact, via factors), {setting}", "value": svd,
         "unit": "s", "ratio": svd / linear, "baseline": f"linear {linear:.3g} s", "goal": "report",
         "verdict": "reported"},
    ]

    # Full-rank methods touch every weight (~94 M per SD1.5 expert): timed once each on the modules of
    # one transformer block per width (3 of 16 blocks), against the linear merge of the same modules.
    subset_blocks = [b for b in SD15_TRANSFORMERS if b[0].endswith("attentions.0") and b[0].startswith("down")]
    subset_blocks = [b for b in subset_blocks if any(n.startswith(f"unet.{b[0]}.") for n in shapes)]
    subset = [n for n in shapes if any(n.startswith(f"unet.{prefix}.") for prefix, _ in subset_blocks)]
    import peft.utils.merge_utils  # noqa: F401  (imported before timing)
    part = [_restricted(e, subset) for e in experts]
    part_stats = random_statistics(part)
    part_linear = median_time(lambda: merging.merge_linear(part, weights), repeats)
    where = f"{count} experts x {len(subset)} modules ({len(subset_blocks)} block(s), one per width)"
    timings = [
        ("Co-Merge element, exact diffs", lambda: merging.co_merge(part, weights, part_stats, "element")),
        (f"Co-Merge element, SVD to rank {target}",
         lambda: merging.co_merge(part, weights, part_stats, "element", rank=target)),
        ("TIES via peft (density 0.5, diffs)", lambda: merging.merge_ties(part, weights, density=0.5)),
        ("DARE via peft (density 0.5, diffs)", lambda: merging.merge_dare(part, weights, density=0.5, seed=0)),
        ("magnitude prune via peft (density 0.5, diffs)",
         lambda: merging.merge_magnitude_prune(part, weights, density=0.5)),
    ]
    rows.append({"measure": f"linear merge, {where}", "value": part_linear, "unit": "s", "ratio": 1.0,
                 "baseline": "itself", "goal": "baseline", "verdict": "reported"})
    for label, function in timings:
        start = time.perf_counter()
        function()
        seconds = time.perf_counter() - start
        rows.append({"measure": f"{label}, {where}", "value": seconds, "unit": "s", "ratio": seconds / part_linear,
                     "baseline": f"linear {part_linear:.3g} s (same modules)", "goal": "report",
                     "verdict": "reported"})
    rows += calibration_rows(tiny)
    if tiny:
        for row in rows:
            row["verdict"] = "tiny setting: " + row["verdict"]
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rows = run(tiny="--tiny" in argv)
    print(f"{'measure':<120} {'value':>10} {'ratio':>8}  goal / verdict")
    for row in rows:
        print(f"{row['measure']:<120} {row['value']:>8.4f} {row['unit']:<2}{row['ratio']:>7.2f}x  "
              f"{row['goal']} / {row['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
