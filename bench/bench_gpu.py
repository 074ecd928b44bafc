"""DPO training step on a GPU at real sizes: step time, peak memory and MFU, official recipe vs ours.

    python bench/bench_gpu.py                  # on a CUDA machine: SD1.5 at 512 px and SDXL at 1024 px (< 5 min)
    python bench/bench_gpu.py --peak-tflops 989 # when the device is not in PEAK_TFLOPS
    python bench/bench_gpu.py --tiny           # seconds, any machine (what the test suite runs)

Models are built with random weights at full width (nothing is downloaded): an SD1.5-shaped UNet
(320/640/1280/1280, CLIP-L context) on 64×64 latents (512 px) and an SDXL-shaped UNet
(320/640/1280, 1/2/10 transformer layers, 2048 context, text_time conditioning) on 128×128 latents
(1024 px), with text encoders and a VAE of the released shapes. Frozen weights in bf16, LoRA (rank 4
on to_q/to_k/to_v/to_out.0) in fp32 under bf16 autocast, AdamW, a batch of ``pairs`` pairs.

- official: SafetyDPO's released recipe as its code does it: a frozen reference copy of the UNet, the
  text encoder(s) and the VAE run on every step (both images encoded, latents sampled).
- ours: the library's step (``training._objective``) on cached latents and embeddings; the reference
  is the same UNet with the LoRA off. The text encoders and the VAE stay resident, as they do in
  ``trainer/train.py`` today.

Each variant runs alone: the previous one is freed and the peak counters reset before it is built.
Reported per variant: median step time (CUDA-synchronised), peak ``torch.cuda.max_memory_allocated``
(weights, optimizer state, activations), FLOPs of one step counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; forward and
backward), and MFU = FLOPs / step time / the device's dense bf16 peak. Goals: MFU ≥ 40 % for ours;
peak memory ≤ 0.5× the official recipe's. A variant that runs out of memory is reported as such.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOALS = {"mfu": 0.40, "memory": 0.5}

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name fragment, from the vendors' sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
               "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
               "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "A6000": 155.0}


def cases(tiny: bool):
    """The model shapes and batch of each case (tiny: fp32, as bf16 kernels on a CPU are slow)."""
    if tiny:
        return {
            "sd15": dict(widths=(32, 64, 128, 128), heads=8, context=64, latent=8, pairs=1, steps=1, bf16=False,
                         vocab=1000, blocks=1, text=[dict(hidden=64, layers=2, heads=4)], vae=(8, 16, 32, 32),
                         xl=False),
            "sdxl": dict(widths=(32, 64, 128), heads=(2, 4, 8), layers=(1, 1, 2), context=64, latent=8, pairs=1,
                         steps=1, bf16=False, vocab=1000, blocks=1,
                         text=[dict(hidden=32, layers=2, heads=4), dict(hidden=32, layers=2, heads=4)],
                         vae=(8, 16, 32, 32), xl=True),
        }
    return {
        "sd15": dict(widths=(320, 640, 1280, 1280), heads=8, context=768, latent=64, pairs=8, steps=5, bf16=True,
                     text=[dict(hidden=768, layers=12, heads=12)], vae=(128, 256, 512, 512), xl=False),
        "sdxl": dict(widths=(320, 640, 1280), heads=(5, 10, 20), layers=(1, 2, 10), context=2048, latent=128,
                     pairs=8, steps=3, bf16=True,
                     text=[dict(hidden=768, layers=12, heads=12), dict(hidden=1280, layers=32, heads=20)],
                     vae=(128, 256, 512, 512), xl=True),
    }


def build(case: dict, device, dtype):
    """(unet, text encoders, vae, alphas_cumprod) with random weights, created on ``device``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        if case["xl"]:
            pooled = case["text"][-1]["hidden"]
            unet = UNet2DConditionModel(
                sample_size=case["latent"], in_channels=4, out_channels=4, layers_per_block=case.get("blocks", 2),
                block_out_channels=case["widths"], attention_head_dim=case["heads"],
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=case["layers"], cross_attention_dim=case["context"],
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256 if
                case["widths"][0] >= 320 else 8, projection_class_embeddings_input_dim=pooled + 6 * (
                    256 if case["widths"][0] >= 320 else 8), norm_num_groups=32 if case["widths"][0] >= 320 else 8)
        else:
            unet = UNet2DConditionModel(
                sample_size=case["latent"], in_channels=4, out_channels=4, layers_per_block=case.get("blocks", 2),
                block_out_channels=case["widths"], attention_head_dim=case["heads"],
                cross_attention_dim=case["context"], norm_num_groups=32 if case["widths"][0] >= 320 else 8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        encoders = []
        for index, text in enumerate(case["text"]):
            config = CLIPTextConfig(vocab_size=case.get("vocab", 49408), hidden_size=text["hidden"],
                                    intermediate_size=4 * text["hidden"], num_hidden_layers=text["layers"],
                                    num_attention_heads=text["heads"], max_position_embeddings=77,
                                    projection_dim=text["hidden"])
            last = case["xl"] and index == len(case["text"]) - 1
            encoders.append((CLIPTextModelWithProjection if last else CLIPTextModel)(config))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=case.get("blocks", 2),
                            norm_num_groups=32 if case["vae"][0] >= 32 else 8, block_out_channels=case["vae"],
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    for module in (unet, vae, *encoders):
        module.to(dtype).requires_grad_(False).eval()
    alphas = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012).alphas_cumprod
    return unet, encoders, vae, alphas


def batch_inputs(case: dict, device, seed=1):
    """Images and token ids of ``pairs`` pairs (random: only the shapes matter)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = case["latent"] * 8
    n = case["pairs"]
    winners = (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(device)
    losers = (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(device)
    tokens = torch.randint(0, case.get("vocab", 49408), (n, 77), generator=g).to(device)
    return winners, losers, tokens


def encode_text(case, encoders, tokens):
    """Cross-attention states (and SDXL's added conditioning) as the released pipelines compute them."""
    from comfyui_safetydpo.models import PromptEmbeddings

    import torch

    if not case["xl"]:
        return PromptEmbeddings(encoders[0](tokens)[0])
    hidden, pooled = [], None
    for encoder in encoders:
        out = encoder(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    size = case["latent"] * 8
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=tokens.device,
                            dtype=hidden[0].dtype).repeat(tokens.shape[0], 1)
    return PromptEmbeddings(torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids})


def predict(unet, noisy, t, embeddings):
    kwargs = {"added_cond_kwargs": embeddings.added_cond} if embeddings.added_cond else {}
    return unet(noisy, t, encoder_hidden_states=embeddings.encoder_hidden_states, **kwargs).sample


class Official:
    """The released recipe: frozen reference copy; text encoder(s) and VAE on every step."""

    def __init__(self, case, device, dtype):
        import torch

        from comfyui_safetydpo.training import TrainingConfig, inject_lora, lora_parameters

        self.case, self.device = case, device
        self.unet, self.encoders, self.vae, self.alphas = build(case, device, dtype)
        self.reference = copy.deepcopy(self.unet)
        inject_lora(self.unet, TrainingConfig())
        self.params = list(lora_parameters(self.unet).values())
        for p in self.params:
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.inputs = batch_inputs(case, device)
        self.g = torch.Generator(device=device).manual_seed(0)

    def step(self):
        import torch
        import torch.nn.functional as F

        n = self.case["pairs"]
        winners, losers, tokens = self.inputs
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.case["bf16"]):
            with torch.no_grad():
                images = torch.cat([winners, losers]).to(self.vae.dtype)
                latents = self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor
                embeddings = encode_text(self.case, self.encoders, tokens)
                embeddings = type(embeddings).cat([embeddings, embeddings])
            noise = torch.randn(latents[:n].shape, generator=self.g, device=self.device).repeat(2, 1, 1, 1)
            t = torch.randint(0, 1000, (n,), generator=self.g, device=self.device).repeat(2)
            a = self.alphas.to(self.device)[t].reshape(-1, 1, 1, 1)
            noisy = (a.sqrt() * latents.float() + (1 - a).sqrt() * noise).to(latents.dtype)
            with torch.no_grad():
                reference = predict(self.reference, noisy, t, embeddings).float()
            prediction = predict(self.unet, noisy, t, embeddings).float()
        mse = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        ref = (reference - noise).pow(2).mean(dim=(1, 2, 3))
        d = (mse[:n] - mse[n:]) - (ref[:n] - ref[n:])
        loss = -F.logsigmoid(-0.5 * 5000 * d).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Ours:
    """The library's step on cached encodings; reference = the same UNet with the LoRA off."""

    def __init__(self, case, device, dtype):
        import torch

        from comfyui_safetydpo.training import (EncodedPreferenceData, TrainableDenoiser, TrainingConfig,
                                                inject_lora, lora_parameters)

        self.case, self.device = case, device
        self.unet, self.encoders, self.vae, alphas = build(case, device, dtype)
        winners, losers, tokens = batch_inputs(case, device)
        with torch.no_grad():  # the one-off encoding encoding_cache does (cached on disk in the trainer)
            scale = self.vae.config.scaling_factor
            self.data = EncodedPreferenceData(
                (self.vae.encode(winners.to(dtype)).latent_dist.mean * scale).float(),
                (self.vae.encode(losers.to(dtype)).latent_dist.mean * scale).float(),
                encode_text(case, self.encoders, tokens).to(dtype=torch.float32))
        del winners, losers
        self.config = TrainingConfig(batch_size=case["pairs"], mixed_precision="bf16" if case["bf16"] else "no")
        inject_lora(self.unet, self.config)
        self.params = list(lora_parameters(self.unet).values())
        for p in self.params:
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        unet = self.unet
        self.denoiser = TrainableDenoiser(module=unet, predict=lambda x, t, e: predict(unet, x, t, e),
                                          alphas_cumprod=alphas)
        self.g = torch.Generator().manual_seed(0)

    def step(self):
        import torch

        from comfyui_safetydpo.training import _objective

        rows = list(range(self.case["pairs"]))
        loss, _ = _objective(self.denoiser, self.data, self.config, rows, self.g, self.device, 0, 1000)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


VARIANTS = {"official": Official, "ours": Ours}


def device_peak_tflops(device, override=None):
    """The device's dense bf16 peak in TFLOP/s (None when unknown: no MFU then)."""
    import torch

    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, value in PEAK_TFLOPS.items():
        if fragment in name:
            return value
    return None


def measure(name: str, case: dict, device, peak_tflops=None) -> dict:
    """One variant alone: build, count the FLOPs of one step, time ``steps`` steps, peak memory."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = {"variant": name}
    variant = None
    try:
        variant = VARIANTS[name](case, device, torch.bfloat16 if case["bf16"] else torch.float32)
        counter = FlopCounterMode(display=False)
        with counter:  # also the warm-up: kernels chosen, optimizer state created (not timed)
            variant.step()
        sync()
        result["flops"] = counter.get_total_flops()
        times = []
        for _ in range(case["steps"]):
            start = time.perf_counter()
            variant.step()
            sync()
            times.append(time.perf_counter() - start)
        result["step_s"] = statistics.median(times)
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
        result["achieved_tflops"] = result["flops"] / result["step_s"] / 1e12
        result["mfu"] = result["achieved_tflops"] / peak_tflops if peak_tflops else None
    except torch.OutOfMemoryError:
        result["oom"] = True
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
    finally:
        del variant
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return result


def rows_for(case_name: str, case: dict, results: dict, peak_tflops, measured: bool) -> list:
    """run_all rows: step time, MFU and peak memory of each variant, with verdicts against the goals."""
    rows = []
    label = f"{case_name} {case['latent'] * 8}px, {case['pairs']} pairs, {'bf16' if case['bf16'] else 'fp32'}"
    official, ours = results["official"], results["ours"]
    for name, r in results.items():
        if r.get("oom"):
            rows.append(dict(measure=f"{label}: {name}", value="out of memory", unit="", ratio="", baseline="",
                             goal="runs", verdict="out of memory"))
            continue
        rows.append(dict(measure=f"{label}: step time, {name}", value=round(r["step_s"], 4), unit="s",
                         ratio=round(r["step_s"] / official["step_s"], 3) if "step_s" in official else "",
                         baseline="official recipe", goal="report", verdict="reported"))
        goal = f">= {GOALS['mfu']:.0%}" if name == "ours" else "report"
        if r["mfu"] is None:
            verdict = "no device peak known (pass --peak-tflops)" if measured else "not measured (no GPU)"
            value = f"{r['achieved_tflops']:.3g} TFLOP/s achieved, {r['flops'] / 1e12:.4g} TFLOP/step"
        else:
            verdict = ("meets goal" if r["mfu"] >= GOALS["mfu"] else "misses goal") if name == "ours" else "reported"
            value = round(r["mfu"], 4)
        rows.append(dict(measure=f"{label}: MFU, {name}", value=value, unit="" if r["mfu"] is None else "fraction",
                         ratio="", baseline=f"{r['flops'] / 1e12:.4g} TFLOP/step counted, peak "
                         f"{peak_tflops or 'unknown'} TFLOP/s", goal=goal, verdict=verdict))
    if ours.get("peak_bytes") is not None and official.get("peak_bytes"):
        ratio = ours["peak_bytes"] / official["peak_bytes"]
        rows.append(dict(measure=f"{label}: peak max_memory_allocated, ours",
                         value=round(ours["peak_bytes"] / 2**30, 3), unit="GiB", ratio=round(ratio, 3),
                         baseline=f"official {official['peak_bytes'] / 2**30:.3f} GiB", goal=f"<= {GOALS['memory']}",
                         verdict="meets goal" if ratio <= GOALS["memory"] else "misses goal"))
    elif ours.get("oom") is not None or official.get("oom") is not None:
        pass
    else:
        rows.append(dict(measure=f"{label}: peak max_memory_allocated", value="n/a", unit="", ratio="", baseline="",
                         goal=f"<= {GOALS['memory']} of official", verdict="not measured (no GPU)"))
    return rows


def run(tiny: bool = False, peak_tflops=None, only=None):
    """Rows for bench/run_all.py. Without a GPU the full setting is not attempted (hours on a CPU)."""
    import torch

    cuda = torch.cuda.is_available()
    if not tiny and not cuda:
        return [dict(measure="GPU step time / peak memory / MFU (SD1.5 512 px, SDXL 1024 px)", value="", unit="",
                     ratio="", baseline="", goal=f"MFU >= {GOALS['mfu']:.0%}, memory <= {GOALS['memory']}x official",
                     verdict="not measured: no GPU here; run python bench/bench_gpu.py on a CUDA machine")]
    device = torch.device("cuda" if cuda else "cpu")
    peak = device_peak_tflops(device, peak_tflops)
    rows = []
    for case_name, case in cases(tiny).items():
        if only and case_name not in only:
            continue
        results = {name: measure(name, case, device, peak) for name in VARIANTS}
        rows.extend(rows_for(case_name, case, results, peak, measured=cuda))
    return rows


def main(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small models, seconds, any device (the test's setting)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, TFLOP/s (for MFU)")
    parser.add_argument("--only", default="", help="sd15, sdxl or both (comma separated)")
    args = parser.parse_args(argv)
    started = time.time()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"device: {device}; peak "
          f"{device_peak_tflops(torch.device('cuda' if torch.cuda.is_available() else 'cpu'), args.peak_tflops)} "
          "TFLOP/s", flush=True)
    for row in run(args.tiny, args.peak_tflops, [o for o in args.only.split(",") if o] or None):
        print(json.dumps(row), flush=True)
    print(f"total {time.time() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
