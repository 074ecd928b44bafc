"""bench/bench_gpu.py works before it ever meets a GPU: its tiny setting runs the real code path
(models built, official and our steps, FLOPs counted, steps timed, MFU and verdict rows) on this CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from shared_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_bench_gpu():
    return load_script("bench/bench_gpu.py", "safetydpo_bench_gpu")


def test_tiny_setting_counts_flops_times_steps_and_computes_mfu():
    bench = load_bench_gpu()
    case = bench.cases(tiny=True)["sd15"]
    results = {name: bench.measure(name, case, torch.device("cpu"), peak_tflops=1.0) for name in bench.VARIANTS}
    for result in results.values():
        assert not result.get("oom")
        assert result["flops"] > 0 and result["step_s"] > 0
        assert abs(result["mfu"] - result["flops"] / result["step_s"] / 1e12) < 1e-12
    # the official recipe also runs the VAE, the text encoder and a reference copy every step: more FLOPs
    assert results["official"]["flops"] > results["ours"]["flops"]
    rows = bench.rows_for("sd15", case, results, 1.0, measured=True)
    mfu = next(r for r in rows if r["measure"].endswith("MFU, ours"))
    assert isinstance(mfu["value"], float) and mfu["verdict"] in ("meets goal", "misses goal")
    assert any("step time, ours" in r["measure"] and r["ratio"] for r in rows)


def test_full_setting_without_a_gpu_says_it_was_not_measured():
    if torch.cuda.is_available():
        return
    rows = load_bench_gpu().run(tiny=False)
    assert len(rows) == 1 and rows[0]["verdict"].startswith("not measured: no GPU")


def test_full_size_models_have_the_released_shapes():
    """The GPU setting's models, built on the meta device (no memory, no compute): released parameter
    counts (SD1.5 UNet 859.5 M, SDXL UNet 2567.5 M, CLIP-L 123.1 M, OpenCLIP bigG 694.7 M, VAE 83.7 M) and
    a forward pass at 512 / 1024 px gives latents of the right shape."""
    bench = load_bench_gpu()
    meta = torch.device("meta")
    expected = {"sd15": (859.5, [123.1]), "sdxl": (2567.5, [123.1, 694.7])}
    for name, case in bench.cases(tiny=False).items():
        unet, encoders, vae, _ = bench.build(case, meta, torch.bfloat16)
        millions = lambda module: round(sum(p.numel() for p in module.parameters()) / 1e6, 1)  # noqa: E731
        assert (millions(unet), [millions(e) for e in encoders]) == expected[name]
        assert millions(vae) == 83.7
        embeddings = bench.encode_text(case, encoders, torch.zeros(1, 77, dtype=torch.long, device=meta))
        latent = case["latent"]
        out = bench.predict(unet, torch.zeros(1, 4, latent, latent, device=meta, dtype=torch.bfloat16),
                            torch.zeros(1, dtype=torch.long, device=meta), embeddings)
        assert out.shape == (1, 4, latent, latent) and latent * 8 == {"sd15": 512, "sdxl": 1024}[name]
