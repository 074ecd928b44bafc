"""DPO training step: our trainer against our reimplementation of the official SafetyDPO recipe.

    .venv/bin/python bench/bench_dpo.py [--tiny]

Models: an SD1.5-shaped UNet (4 levels, 2 res blocks, transformers on the top three, CLIP-width
context) reduced in width to fit a CPU, with a text encoder and a VAE reduced by the same factor.
All variants train the same peft LoRA (rank 4 on to_q/to_k/to_v/to_out.0) with AdamW, batch of
``pairs`` pairs, fp32.

- official: the released recipe as its code does it: a separate frozen reference UNet copy, and the
  text encoder and VAE run on every step (winner and loser images encoded, prompt encoded);
  winner+loser batched through the policy and through the reference.
- ours: ``comfyui_safetydpo.training``'s real step (``_objective``): cached latents and embeddings,
  the reference is the same UNet with the LoRA off (one batched no-grad pass for winner+loser), one
  batched policy pass for winner+loser; variants with gradient checkpointing on every block
  (``ours+gc``) and only on the full-resolution blocks (``ours+gc-top``), where the activations are
  largest.
- sft: a plain LoRA SFT step on the same images (winners and losers as 2·pairs samples, cached).

Step time: the variants run interleaved in one process (median of the repeats), so machine load
hits all alike. Peak memory: each variant runs alone in a fresh subprocess; the measure is the peak
resident set (``ru_maxrss``) minus the resident set after imports, i.e. everything the run holds:
weights (the official reference copy, text encoder and VAE included), optimizer state and
activations. This works on any CPU, counts what a user's machine must hold, and is not fooled by
caching allocators (on CPU torch uses malloc directly). Whole-run wall time includes our one-off
encoding of the pairs, so no cost is merely moved out of the step.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOALS = {"time": 0.75, "memory": 0.55, "sft": 1.4}


def settings(tiny: bool):
    if tiny:
        return dict(width=8, context=96, text_layers=2, image=64, pairs=1, repeats=2, run_steps=2, dataset=2)
    # SD1.5 widths (320, 640, 1280, 1280) / 4, context 768 / 4, 256 px images (32x32 latents)
    return dict(width=80, context=192, text_layers=6, image=256, pairs=2, repeats=5, run_steps=6, dataset=8)


def build_models(cfg, seed=0):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    w = cfg["width"]
    unet = UNet2DConditionModel(
        sample_size=cfg["image"] // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(w, 2 * w, 4 * w, 4 * w), cross_attention_dim=cfg["context"], attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=cfg["context"], intermediate_size=4 * cfg["context"],
                                        num_hidden_layers=cfg["text_layers"], num_attention_heads=4,
                                        max_position_embeddings=77))
    vae_width = max(8, w * 128 // 320)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=8,
                        block_out_channels=(vae_width, 2 * vae_width, 4 * vae_width, 4 * vae_width),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    for module in (unet, text, vae):
        module.requires_grad_(False).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    return unet, text, vae, scheduler


def fake_data(cfg, count, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    images_w = torch.rand(count, 3, cfg["image"], cfg["image"], generator=g) * 2 - 1
    images_l = torch.rand(count, 3, cfg["image"], cfg["image"], generator=g) * 2 - 1
    tokens = torch.randint(0, 1000, (count, 77), generator=g)
    return images_w, images_l, tokens


# -- the three step functions ------------------------------------------------------------------

class Official:
    """SafetyDPO's released recipe: frozen reference copy; text encoder and VAE every step."""

    def __init__(self, cfg, models, data):
        import torch

        from comfyui_safetydpo.training import TrainingConfig, inject_lora, lora_parameters

        unet, self.text, self.vae, self.scheduler = models
        self.reference = copy.deepcopy(unet)  # the second UNet the official code keeps
        self.unet = unet
        inject_lora(self.unet, TrainingConfig())
        self.params = list(lora_parameters(self.unet).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.images_w, self.images_l, self.tokens = data
        self.pairs = cfg["pairs"]
        self.g = torch.Generator().manual_seed(0)

    def step(self, i):
        import torch
        import torch.nn.functional as F

        n = self.pairs
        rows = [(i * n + k) % len(self.tokens) for k in range(n)]
        with torch.no_grad():
            images = torch.cat([self.images_w[rows], self.images_l[rows]])
            latents = self.vae.encode(images).latent_dist.sample() * 0.18215
            hidden = self.text(self.tokens[rows])[0].repeat(2, 1, 1)
        noise = torch.randn(latents[:n].shape, generator=self.g).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (n,), generator=self.g).repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            reference = self.reference(noisy, t, hidden).sample
        prediction = self.unet(noisy, t, hidden).sample
        mse = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        ref = (reference - noise).pow(2).mean(dim=(1, 2, 3))
        d = (mse[:n] - mse[n:]) - (ref[:n] - ref[n:])
        loss = -F.logsigmoid(-0.5 * 5000 * d).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def encode_once(cfg, models, data):
    """Our one-off encoding (what encoding_cache does): latents and prompt embeddings for every pair."""
    import torch

    from comfyui_safetydpo.models import PromptEmbeddings
    from comfyui_safetydpo.training import EncodedPreferenceData

    unet, text, vae, scheduler = models
    images_w, images_l, tokens = data
    with torch.no_grad():
        winners = torch.cat([vae.encode(images_w[i:i + 4]).latent_dist.mean for i in range(0, len(tokens), 4)]) * 0.18215
        losers = torch.cat([vae.encode(images_l[i:i + 4]).latent_dist.mean for i in range(0, len(tokens), 4)]) * 0.18215
        hidden = torch.cat([text(tokens[i:i + 8])[0] for i in range(0, len(tokens), 8)])
    return EncodedPreferenceData(winners, losers, PromptEmbeddings(hidden))


class Ours:
    """Our trainer's step: cached encodings, adapter-off reference, batched passes (library code)."""

    def __init__(self, cfg, models, encoded, checkpointing: str = "none", sft: bool = False):
        import torch

        from comfyui_safetydpo.training import (TrainableDenoiser, TrainingConfig, inject_lora, lora_parameters)

        unet, _, _, scheduler = models
        self.unet = unet
        self.sft = sft
        self.config = TrainingConfig(batch_size=cfg["pairs"], dpo_weight=0.0 if sft else 1.0, sft_weight=1.0 if sft else 0.0)
        inject_lora(unet, self.config)
        set_checkpointing(unet, checkpointing)
        self.params = list(lora_parameters(unet).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.denoiser = TrainableDenoiser(module=unet, predict=lambda x, t, e: unet(x, t, e.encoder_hidden_states).sample,
                                          alphas_cumprod=scheduler.alphas_cumprod)
        self.data = encoded
        self.pairs = cfg["pairs"]
        self.g = torch.Generator().manual_seed(0)

    def step(self, i):
        import torch

        from comfyui_safetydpo.training import _objective

        n = self.pairs
        rows = [(i * n + k) % len(self.data) for k in range(n)]
        if self.sft:
            # plain LoRA SFT on the same images: winners and losers as 2n ordinary samples
            from comfyui_safetydpo.dpo_loss import per_sample_mse

            latents = torch.cat([self.data.winner_latents[rows], self.data.loser_latents[rows]])
            hidden = self.data.embeddings.encoder_hidden_states[rows].repeat(2, 1, 1)
            noise = torch.randn(latents.shape, generator=self.g)
            t = torch.randint(0, 1000, (2 * n,), generator=self.g)
            noisy = self.denoiser.add_noise(latents, noise, t)
            loss = per_sample_mse(self.unet(noisy, t, hidden).sample, noise).mean()
        else:
            loss, _ = _objective(self.denoiser, self.data, self.config, rows, self.g, torch.device("cpu"), 0, 1000)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def set_checkpointing(unet, mode: str) -> None:
    """none | all | top: recompute activations in backward for all blocks or the full-resolution ones."""
    if mode == "none":
        return
    unet.enable_gradient_checkpointing()
    if mode == "top":
        keep = {id(unet.down_blocks[0]), id(unet.up_blocks[-1])}
        for module in unet.modules():
            if hasattr(module, "gradient_checkpointing") and module is not unet and id(module) not in keep:
                module.gradient_checkpointing = False


VARIANTS = ("official", "ours", "ours+gc-top", "ours+gc", "sft")


def make_variant(name, cfg, seed=0):
    models = build_models(cfg, seed)
    data = fake_data(cfg, cfg["dataset"])
    if name == "official":
        return Official(cfg, models, data)
    encoded = encode_once(cfg, models, data)
    # ours never needs the text encoder or the VAE again: let them go (the official recipe keeps both)
    models = (models[0], None, None, models[3])
    if name == "sft":
        return Ours(cfg, models, encoded, sft=True)
    mode = {"ours": "none", "ours+gc-top": "top", "ours+gc": "all"}[name]
    return Ours(cfg, models, encoded, checkpointing=mode)


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(name, cfg) -> float:
    """Peak RSS growth (MB) of one variant's whole run, alone in this (fresh) process."""
    import torch  # noqa: F401 - imported before the baseline is taken
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    baseline = rss_mb()
    variant = make_variant(name, cfg)
    for i in range(2):
        variant.step(i)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline


def memory_in_subprocess(name, cfg, tiny) -> float:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory", name] + (["--tiny"] if tiny else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ}).stdout
    return float(json.loads(output.strip().splitlines()[-1])["peak_mb"])


def step_times(cfg):
    """Median seconds per step of every variant, interleaved round-robin in this process."""
    variants = {name: make_variant(name, cfg) for name in VARIANTS}
    for variant in variants.values():  # warm-up
        variant.step(0)
    times = {name: [] for name in variants}
    for r in range(cfg["repeats"]):
        for name, variant in variants.items():
            start = time.perf_counter()
            variant.step(r + 1)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def whole_run_times(cfg):
    """Wall time of a short run including our encoding of the dataset (official: none needed)."""
    import torch

    out = {}
    for name in ("official", "ours"):
        models = build_models(cfg)
        data = fake_data(cfg, cfg["dataset"])
        start = time.perf_counter()
        if name == "official":
            variant = Official(cfg, models, data)
        else:
            variant = Ours(cfg, models, encode_once(cfg, models, data))
        for i in range(cfg["run_steps"]):
            variant.step(i)
        out[name] = time.perf_counter() - start
        del variant, models
        torch.manual_seed(0)
    return out


def verdict(ratio, goal):
    return "meets goal" if ratio <= goal else "misses goal"


def run(tiny: bool = False):
    """Rows for bench/run_all.py."""
    cfg = settings(tiny)
    times = step_times(cfg)
    memory = {name: memory_in_subprocess(name, cfg, tiny) for name in ("official", "ours", "ours+gc-top", "ours+gc")}
    runs = whole_run_times(cfg)
    rows = []
    base = f"official recipe (frozen UNet copy; text encoder and VAE every step), {cfg['pairs']} pairs/step"
    for name in ("ours", "ours+gc-top", "ours+gc"):
        ratio = times[name] / times["official"]
        rows.append(dict(measure=f"DPO step time, {name}", value=round(times[name], 4), unit="s", ratio=round(ratio, 3),
                         baseline=base, goal=f"<= {GOALS['time']}", verdict=verdict(ratio, GOALS["time"])))
    for name in ("ours", "ours+gc-top", "ours+gc"):
        ratio = memory[name] / memory["official"]
        rows.append(dict(measure=f"DPO peak memory (RSS growth), {name}", value=round(memory[name], 1), unit="MB",
                         ratio=round(ratio, 3), baseline=base + f" = {memory['official']:.0f} MB",
                         goal=f"<= {GOALS['memory']}", verdict=verdict(ratio, GOALS["memory"])))
    for name in ("ours", "ours+gc-top"):
        ratio = times[name] / times["sft"]
        rows.append(dict(measure=f"DPO step vs plain LoRA SFT step on the same images, {name}",
                         value=round(times[name], 4), unit="s", ratio=round(ratio, 3),
                         baseline=f"SFT step, {2 * cfg['pairs']} samples = {times['sft']:.4f} s",
                         goal=f"<= {GOALS['sft']} (floor about 1.33)", verdict=verdict(ratio, GOALS["sft"])))
    ratio = runs["ours"] / runs["official"]
    rows.append(dict(measure=f"whole run: encode {cfg['dataset']} pairs once + {cfg['run_steps']} steps, ours",
                     value=round(runs["ours"], 3), unit="s", ratio=round(ratio, 3),
                     baseline=f"official, {cfg['run_steps']} steps = {runs['official']:.3f} s", goal="< 1 (informative)",
                     verdict="faster" if ratio < 1 else "slower"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="seconds-long settings (what the tests run)")
    parser.add_argument("--memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory:
        print(json.dumps({"peak_mb": peak_memory(args.memory, settings(args.tiny))}))
        return 0
    for row in run(args.tiny):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
