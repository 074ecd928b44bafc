"""DPO training step and whole run: our trainer against our reimplementation of the official recipe.

    .venv/bin/python bench/bench_dpo.py [--tiny]

Models: an SD1.5-shaped UNet (4 levels, 2 res blocks, transformers on the top three, CLIP-width
context) reduced in width to fit a CPU, with a text encoder and a VAE reduced by the same factor.
All variants train the same peft LoRA (rank 4 on to_q/to_k/to_v/to_out.0) with AdamW, batch of
``pairs`` pairs, fp32, one CPU thread each.

- official: the released recipe as its code does it: a separate frozen reference UNet copy; every
  step loads the pair's image files, runs the VAE on winner and loser and the text encoder on the
  prompt; winner+loser batched through the policy and through the reference.
- ours: ``comfyui_safetydpo.training``'s real step (``_objective``) on encoded pairs: the reference is
  the same UNet with the LoRA off (one batched no-grad pass for winner+loser), one batched policy pass;
  variants with gradient checkpointing on every block (``ours+gc``) and only on the full-resolution
  blocks (``ours+gc-top``), where the activations are largest.
- sft: a plain LoRA SFT step on the same images (winners and losers as 2·pairs samples, encoded).

Step time: the variants run interleaved in one process (median of the repeats), so machine load hits
all alike; one step of ours is profiled to say where its time goes. Peak memory: each variant runs
alone in a fresh subprocess; the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5)
after the models are built, so the peak covers the training steps only; the peak is reported as growth
over the resident set after imports (everything the steps need resident: weights, optimizer state,
activations) and split by torch's own accounting into weights, optimizer state + gradients,
activations saved for backward and the rest (temporaries). Every variant runs with the same fixed glibc
mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so freed blocks are returned to the OS and the peak is
what the step holds rather than what the allocator keeps cached (measured: ~220 MB of "other" without it,
the same for every variant). Whole run: the real library loop
(``train_lora`` on ``LazyEncodedPreferenceData``, each pair encoded on first use, from image files)
against the official loop on the same files, interleaved step by step; wall time from start to the end
of step k, read for 1 step, one epoch and several epochs from the same runs. The same again for a dataset
from our pair builder, which keeps the sampler's latents beside the images, so our loop reads them and
never runs the VAE (here and at SD1.5's real widths; the latents are written before the clock starts, as
the images are for both loops).

One thread everywhere: on this shared 2-core machine two OpenMP threads per process ran 3-5x slower
than one as soon as other jobs used the cores (measured: encoding 8 pairs 29 s vs 10 s, one step 27-59 s
vs 11 s). That, not the encoding, is what made the last "encode 8 pairs once + 6 steps" take 254 s.
"""
from __future__ import annotations

import argparse
import copy
import gc
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

GOALS = {"time": 0.70, "memory": 0.50, "sft": 1.35, "run": 0.75}


def settings(tiny: bool):
    if tiny:
        return dict(width=8, context=96, text_layers=2, image=64, pairs=1, repeats=2, epochs=2, dataset=2)
    # SD1.5 widths (320, 640, 1280, 1280) / 4, context 768 / 4, 256 px images (32x32 latents)
    return dict(width=80, context=192, text_layers=6, image=256, pairs=2, repeats=4, epochs=2, dataset=8)


def real_settings():
    """SD1.5 at its real widths (860M UNet, SD VAE, CLIP-L text encoder; random weights) at 256 px, one pair per
    step: the step a user trains, at the smallest size this CPU times in minutes."""
    return dict(real=True, image=256, pairs=1, repeats=6, dataset=4, epochs=2)


def _real_models():
    """SD1.5's UNet, VAE and text encoder configurations (diffusers' / transformers' classes, no weights read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD1.5's UNet
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    return unet, text, vae


def build_models(cfg, seed=0):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    if cfg.get("real"):
        unet, text, vae = _real_models()
        for module in (unet, text, vae):
            module.requires_grad_(False).eval()
        return unet, text, vae, scheduler
    w = cfg["width"]
    unet = UNet2DConditionModel(
        sample_size=cfg["image"] // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(w, 2 * w, 4 * w, 4 * w), cross_attention_dim=cfg["context"], attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=cfg["context"],
                                        intermediate_size=4 * cfg["context"],
                                        num_hidden_layers=cfg["text_layers"], num_attention_heads=4,
                                        max_position_embeddings=77))
    vae_width = max(8, w * 128 // 320)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=8,
                        block_out_channels=(vae_width, 2 * vae_width, 4 * vae_width, 4 * vae_width),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    for module in (unet, text, vae):
        module.requires_grad_(False).eval()
    return unet, text, vae, scheduler


class BenchData:
    """Image files of ``count`` random pairs (PNG, as a pair builder writes them) and prompt tokens."""

    def __init__(self, cfg, count, seed=1):
        import tempfile

        import torch

        from comfyui_safetydpo.pairs import PreferencePair, PreferencePairs, save_image_tensor

        g = torch.Generator().manual_seed(seed)
        self.root = Path(tempfile.mkdtemp(prefix="bench_dpo_pairs_"))
        pairs = []
        for i in range(count):
            for kind in ("w", "l"):
                image = torch.rand(3, cfg["image"], cfg["image"], generator=g) * 2 - 1
                save_image_tensor(image, self.root / f"{kind}{i}.png")
            pairs.append(PreferencePair(f"p{i}", f"prompt {i}", f"safe {i}", ("Violence",), f"w{i}.png",
                                        f"l{i}.png", i))
        self.pairs = PreferencePairs(root=self.root, pairs=pairs)
        self.tokens = torch.randint(0, 1000, (count, 77), generator=g)

    def images(self, rows):
        """Winners then losers of ``rows`` read from their files (what the official data loader does)."""
        import torch

        from comfyui_safetydpo.pairs import load_image_tensor

        paths = [self.pairs.pairs[r].preferred_image for r in rows] + [self.pairs.pairs[r].rejected_image for r in rows]
        return torch.stack([load_image_tensor(self.root / p) for p in paths])

    def close(self):
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)


class BenchBundle:
    """What ``encoding_cache`` needs of a model: encode_images / encode_prompts (prompt i -> token row i)."""

    def __init__(self, models, data: BenchData, kept_latents: bool = False):
        self.unet, self.text, self.vae, _ = models
        self.data = data
        self.name, self.architecture, self.resolution = "bench", "sd15-bench", 256
        self.text_encoders = [self.text]
        if kept_latents:  # read the latents our pair builder keeps beside the images, as the trainer does
            from comfyui_safetydpo.encoding_cache import vae_fingerprint

            self.latent_space = vae_fingerprint(self.vae, 0.18215, "bench")

    def encode_images(self, images):
        import torch

        with torch.no_grad():
            return self.vae.encode(images).latent_dist.mean * 0.18215

    def encode_prompts(self, prompts):
        import torch

        from comfyui_safetydpo.models import PromptEmbeddings

        rows = [int(p.split()[-1]) for p in prompts]
        with torch.no_grad():
            return PromptEmbeddings(self.text(self.data.tokens[rows])[0])


# -- the three step functions ------------------------------------------------------------------

class Official:
    """SafetyDPO's released recipe: frozen reference copy; image files, VAE and text encoder every step."""

    def __init__(self, cfg, models, data):
        import torch

        from comfyui_safetydpo.training import TrainingConfig, inject_lora, lora_parameters

        unet, self.text, self.vae, self.scheduler = models
        self.reference = copy.deepcopy(unet)  # the second UNet the official code keeps
        self.unet = unet
        inject_lora(self.unet, TrainingConfig())
        self.params = list(lora_parameters(self.unet).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.data = data
        self.pairs = cfg["pairs"]
        self.g = torch.Generator().manual_seed(0)
        self.encode_seconds = []

    def step(self, i):
        import torch
        import torch.nn.functional as F

        n = self.pairs
        rows = [(i * n + k) % len(self.data.tokens) for k in range(n)]
        start = time.perf_counter()
        with torch.no_grad():
            images = self.data.images(rows)
            latents = self.vae.encode(images).latent_dist.sample() * 0.18215
            hidden = self.text(self.data.tokens[rows])[0].repeat(2, 1, 1)
        self.encode_seconds.append(time.perf_counter() - start)
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
    """Every pair encoded by the library (``encode_preference_pairs``): the steady state of our loop."""
    from comfyui_safetydpo.encoding_cache import encode_preference_pairs

    return encode_preference_pairs(BenchBundle(models, data), data.pairs)


class Ours:
    """Our trainer's step: cached encodings, adapter-off reference, batched passes (library code)."""

    def __init__(self, cfg, models, encoded, checkpointing: str = "none", sft: bool = False):
        import torch

        from comfyui_safetydpo.training import (TrainableDenoiser, TrainingConfig, inject_lora, lora_parameters)

        unet, _, _, scheduler = models
        self.unet = unet
        self.sft = sft
        self.config = TrainingConfig(batch_size=cfg["pairs"], dpo_weight=0.0 if sft else 1.0,
                                     sft_weight=1.0 if sft else 0.0)
        inject_lora(unet, self.config)
        set_checkpointing(unet, checkpointing)
        self.params = list(lora_parameters(unet).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.denoiser = TrainableDenoiser(module=unet,
                                          predict=lambda x, t, e: unet(x, t, e.encoder_hidden_states).sample,
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
TIMED = ("official", "ours", "ours+gc-top", "sft")
MEMORY = ("official", "ours", "ours+gc-top", "ours+gc")
_DATA = {}


def bench_data(cfg) -> BenchData:
    key = (cfg["image"], cfg["dataset"])
    if key not in _DATA:
        _DATA[key] = BenchData(cfg, cfg["dataset"])
    return _DATA[key]


def make_variant(name, cfg, seed=0):
    models = build_models(cfg, seed)
    data = bench_data(cfg)
    if name == "official":
        return Official(cfg, models, data)
    encoded = encode_once(cfg, models, data)
    # ours never needs the text encoder or the VAE again: let them go (the official recipe keeps both)
    models = (models[0], None, None, models[3])
    if name == "sft":
        return Ours(cfg, models, encoded, sft=True)
    mode = {"ours": "none", "ours+gc-top": "top", "ours+gc": "all"}[name]
    return Ours(cfg, models, encoded, checkpointing=mode)


# -- memory --------------------------------------------------------------------------------------

def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _held_modules(variant):
    if isinstance(variant, Official):
        return [variant.unet, variant.reference, variant.text, variant.vae]
    return [variant.unet]


def peak_memory(name, cfg) -> dict:
    """Peak RSS growth (MB) over the training steps of one variant, alone in this (fresh) process, and its split."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401 - code loaded before
    from transformers import CLIPTextModel  # noqa: F401 - the baseline is taken
    import peft.tuners.lora  # noqa: F401

    from comfyui_safetydpo import encoding_cache, training  # noqa: F401

    torch.set_num_threads(1)
    _release_freed_memory()
    baseline = _status_mb("VmRSS")
    variant = make_variant(name, cfg)
    _release_freed_memory()
    before_steps = _status_mb("VmRSS")
    reset = _reset_peak()
    weights = [t for m in _held_modules(variant) for t in [*m.parameters(), *m.buffers()]]
    weight_ptrs = {t.untyped_storage().data_ptr() for t in weights}
    saved = {}  # storage address -> bytes; no references kept, so backward frees activations as usual

    def pack(tensor):  # every tensor autograd keeps for backward (the activations), weights excluded
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weight_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    activation_bytes = 0
    for i in range(2):  # step 0 of ours skips the reference pass (fresh LoRA); step 1 is a normal step
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            variant.step(i)
        activation_bytes = max(activation_bytes, sum(saved.values()))
    peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    optimizer = _tensor_bytes([v for state in variant.optimizer.state.values() for v in state.values()
                               if torch.is_tensor(v)] + [p for p in variant.params])
    mb = 1024 * 1024
    weights_mb = _tensor_bytes(weights) / mb
    data_mb = 0.0
    if not isinstance(variant, Official):
        data_mb = _tensor_bytes([variant.data.winner_latents, variant.data.loser_latents,
                                 variant.data.embeddings.encoder_hidden_states]) / mb
    total = peak - baseline
    split = {"weights_mb": weights_mb, "optimizer_mb": optimizer / mb, "activations_mb": activation_bytes / mb,
             "data_mb": data_mb}
    return {"peak_mb": total, "steps_only": reset, "before_steps_mb": before_steps - baseline, **split,
            "other_mb": total - sum(split.values())}


def memory_in_subprocess(name, cfg, tiny) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory", name] + (["--tiny"] if tiny else [])
    # Same allocator setting for every variant: large blocks go straight back to the OS when freed, so the
    # peak measures what the step holds, not how much freed memory glibc's growing mmap threshold keeps.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


# -- time ----------------------------------------------------------------------------------------

OP_GROUPS = (("attention", ("scaled_dot_product", "attention", "softmax", "bmm", "baddbmm")),
             ("convolution", ("conv",)), ("linear / LoRA matmuls", ("mm", "addmm", "linear", "matmul")),
             ("normalization", ("norm",)), ("optimizer", ("adam", "foreach", "_fused")))


def profile_step(variant, i) -> dict:
    """Share of self CPU time per op group in one step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.step(i)
    shares, total = {}, 0.0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        seconds = event.self_cpu_time_total / 1e6
        total += seconds
        name = event.key[len("aten::"):].lower()
        group = next((g for g, words in OP_GROUPS if any(w in name for w in words)), "other (elementwise, copies)")
        shares[group] = shares.get(group, 0.0) + seconds
    return {g: v / total for g, v in sorted(shares.items(), key=lambda kv: -kv[1])} if total else {}


def step_times(cfg, names=TIMED, profile=True):
    """Median seconds per step of every timed variant, interleaved in a rotating order in this process; the share
    of the official step spent encoding; where our step's time goes (with ``profile``); the per-round times."""
    variants = {name: make_variant(name, cfg) for name in names}
    for variant in variants.values():  # warm-up (ours: the first step skips the reference pass)
        variant.step(0)
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(cfg["repeats"]):
        for name in names[r % len(names):] + names[:r % len(names)]:  # a rotating order: no variant always first
            start = time.perf_counter()
            variants[name].step(r + 1)
            times[name].append(time.perf_counter() - start)
    official = variants["official"]
    encode_share = statistics.median(official.encode_seconds[1:]) / statistics.median(times["official"])
    shares = profile_step(variants["ours"], cfg["repeats"] + 1) if profile else {}
    return {name: statistics.median(v) for name, v in times.items()}, encode_share, shares, times


def keep_sampled_latents(cfg, data: BenchData) -> None:
    """Write the latents our pair builder keeps beside each image while it samples (here from the images, untimed,
    as the rendering of the images themselves is untimed for both loops)."""
    from comfyui_safetydpo.pairs import load_image_tensor, save_sampled_latent

    bundle = BenchBundle(build_models(cfg), data, kept_latents=True)
    for pair in data.pairs.pairs:
        for relative in (pair.preferred_image, pair.rejected_image):
            latent = bundle.encode_images(load_image_tensor(data.root / relative)[None])[0]
            save_sampled_latent(data.root, relative, latent, bundle.latent_space)


def whole_run_times(cfg, kept_latents: bool = False):
    """Seconds from start to the end of each step: official loop vs our library loop (encode on first use; with
    ``kept_latents``, read the latents our pair builder kept instead, so no image is encoded).

    The two runs are interleaved step by step (our ``train_lora`` calls back after each step; the official
    loop's step runs there, on its own clock, and our clock is paused meanwhile), so a change of machine
    load hits both alike.
    """
    import torch

    from comfyui_safetydpo.encoding_cache import LazyEncodedPreferenceData
    from comfyui_safetydpo.training import TrainableDenoiser, TrainingConfig, train_lora

    gc.collect()  # the models of earlier rows (at real widths, gigabytes) are gone before these are built
    steps = cfg["epochs"] * cfg["dataset"] // cfg["pairs"]
    data = bench_data(cfg)
    if kept_latents:
        keep_sampled_latents(cfg, data)
    official_models, our_models = build_models(cfg), build_models(cfg)
    start = time.perf_counter()
    official = Official(cfg, official_models, data)
    official_clock = [time.perf_counter() - start]
    marks = {"official": [], "ours": []}
    paused = [0.0]

    def after_our_step(step, total, metrics):
        now = time.perf_counter()
        marks["ours"].append(now - our_start - paused[0])
        begin = time.perf_counter()
        official.step(step - 1)  # noqa: F821 - bound before the run, deleted after it
        official_clock[0] += time.perf_counter() - begin
        marks["official"].append(official_clock[0])
        paused[0] += time.perf_counter() - now

    unet, _, _, scheduler = our_models
    our_start = time.perf_counter()
    lazy = LazyEncodedPreferenceData(BenchBundle(our_models, data, kept_latents), data.pairs)
    denoiser = TrainableDenoiser(module=unet, predict=lambda x, t, e: unet(x, t, e.encoder_hidden_states).sample,
                                 alphas_cumprod=scheduler.alphas_cumprod)
    config = TrainingConfig(batch_size=cfg["pairs"], max_steps=steps, learning_rate=1e-5, checkpoint_every=0)
    train_lora(denoiser, lazy, config, progress=after_our_step)
    if kept_latents and lazy.encoder.encoded_images:
        raise RuntimeError(f"the kept-latents run encoded {lazy.encoder.encoded_images} images")
    del official, official_models, our_models
    torch.manual_seed(0)
    return marks, steps


def flop_counts(pairs: int = 2) -> dict:
    """FLOPs of one step's parts at real SD1.5 shapes (512 px, CLIP-L, SD VAE), counted on the meta device.

    No weights exist and nothing is computed: torch's FlopCounterMode counts matmuls and convolutions
    (not softmax or elementwise work). This is the step-time ratio a GPU, where time follows FLOPs
    more closely than on this CPU, would show.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from comfyui_safetydpo.training import TrainingConfig, inject_lora

    def count(function):
        with FlopCounterMode(display=False) as counter:
            function()
        return counter.get_total_flops()

    with torch.device("meta"):
        unet, text, vae = _real_models()
        latents = torch.randn(2 * pairs, 4, 64, 64)
        t = torch.zeros(2 * pairs, dtype=torch.long)
        hidden = torch.randn(2 * pairs, 77, 768)
        images = torch.randn(2 * pairs, 3, 512, 512)
        tokens = torch.zeros(pairs, 77, dtype=torch.long)
    unet.requires_grad_(False)
    inject_lora(unet, TrainingConfig())
    with torch.no_grad():
        encode = count(lambda: vae.encode(images).latent_dist.mean) + count(lambda: text(tokens))
        reference = count(lambda: unet(latents, t, hidden).sample)
    trained = count(lambda: unet(latents, t, hidden).sample.float().pow(2).mean().backward())
    return {"encode": encode, "reference": reference, "trained": trained}


def paired_ratio(numerator, denominator):
    """Geometric mean of paired ratios with its 95 % Student-t interval (the sampling bench's statistic)."""
    from ratio_statistics import ratio_interval

    return ratio_interval(numerator, denominator)


def verdict(ratio, goal):
    return "meets goal" if ratio <= goal else "misses goal"


def run(tiny: bool = False):
    """Rows for bench/run_all.py."""
    import torch

    torch.set_num_threads(1)
    cfg = settings(tiny)
    try:
        times, encode_share, profile, _ = step_times(cfg)
        if tiny:  # smoke settings: in this process (the peak is reset before the steps; no fresh interpreter)
            memory = {name: peak_memory(name, cfg) for name in MEMORY[:2]}
        else:
            memory = {name: memory_in_subprocess(name, cfg, tiny) for name in MEMORY}
        runs, steps = whole_run_times(cfg)
        kept_runs, _ = whole_run_times(cfg, kept_latents=True)
        flops = flop_counts(cfg["pairs"])
        real = None if tiny else step_times(real_settings(), names=("official", "ours"), profile=False)
        real_kept = None if tiny else whole_run_times(real_settings(), kept_latents=True)
    finally:
        for data in _DATA.values():
            data.close()
        _DATA.clear()
    rows = []
    base = ("official recipe (frozen UNet copy; image files, VAE and text encoder every step), "
            f"{cfg['pairs']} pairs/step")
    for name in ("ours", "ours+gc-top"):
        ratio = times[name] / times["official"]
        rows.append(dict(measure=f"DPO step time, {name}", value=round(times[name], 4), unit="s", ratio=round(ratio, 3),
                         baseline=base + f" = {times['official']:.3f} s", goal=f"<= {GOALS['time']}",
                         verdict=verdict(ratio, GOALS["time"])))
    if real is not None:
        real_times, real_share, _, rounds = real
        ratio, low, high = paired_ratio(rounds["ours"], rounds["official"])
        rows.append(dict(measure="DPO step time at SD1.5's real widths (860M UNet, SD VAE, CLIP-L text; random "
                                 f"weights; 256 px, 1 pair/step), ours: geometric mean of {len(rounds['ours'])} "
                                 f"interleaved paired steps, 95 % CI {low:.3f}-{high:.3f}; the official step spends "
                                 f"{100 * real_share:.1f} % loading + encoding",
                         value=round(real_times["ours"], 3), unit="s", ratio=round(ratio, 3),
                         baseline=f"official recipe at the same widths = {real_times['official']:.3f} s",
                         goal=f"<= {GOALS['time']}", verdict=verdict(ratio, GOALS["time"])))
    rows.append(dict(measure="official step: share spent loading + encoding images and prompt "
                             "(ours does this once per pair)",
                     value=round(100 * encode_share, 1), unit="%", ratio=None, baseline="official step",
                     goal="info: bounds ours/official from below at about 1 - share", verdict="info"))
    rows.append(dict(measure="our DPO step, where the time goes (torch.profiler self time)",
                     value="; ".join(f"{g} {100 * v:.0f} %" for g, v in profile.items()), unit="", ratio=None,
                     baseline="one step of ours", goal="info", verdict="info"))
    for name in ("ours", "ours+gc-top"):
        ratio = times[name] / times["sft"]
        rows.append(dict(measure=f"DPO step vs plain LoRA SFT step on the same images, {name}",
                         value=round(times[name], 4), unit="s", ratio=round(ratio, 3),
                         baseline=f"SFT step, {2 * cfg['pairs']} samples = {times['sft']:.4f} s",
                         goal=f"<= {GOALS['sft']}", verdict=verdict(ratio, GOALS["sft"])))
    ours_flops = flops["reference"] + flops["trained"]
    rows.append(dict(measure="FLOPs of one step at real SD1.5 shapes (512 px, counted on the meta device): "
                             "ours / official",
                     value=round(ours_flops / 1e12, 2), unit="TFLOP",
                     ratio=round(ours_flops / (ours_flops + flops["encode"]), 3),
                     baseline=f"official = {(ours_flops + flops['encode']) / 1e12:.2f} TFLOP (VAE + text "
                              f"{flops['encode'] / 1e12:.2f})",
                     goal="info (what time-follows-FLOPs hardware would show)", verdict="info"))
    rows.append(dict(measure="FLOPs of one step at real SD1.5 shapes: ours / plain LoRA SFT",
                     value=round(ours_flops / 1e12, 2), unit="TFLOP", ratio=round(ours_flops / flops["trained"], 3),
                     baseline=f"SFT = {flops['trained'] / 1e12:.2f} TFLOP (forward + backward)",
                     goal="info (reference pass / (forward + backward) sets the floor)", verdict="info"))
    official_mem = memory["official"]
    what = ("training steps only (VmHWM reset after building)" if official_mem["steps_only"]
            else "whole process (ru_maxrss)")
    for name in memory:
        m = memory[name]
        ratio = m["peak_mb"] / official_mem["peak_mb"]
        split = (f"weights {m['weights_mb']:.0f}, optimizer+grads {m['optimizer_mb']:.1f}, activations saved for "
                 f"backward {m['activations_mb']:.0f}, encoded data {m['data_mb']:.1f}, other/temporaries "
                 f"{m['other_mb']:.0f} MB")
        rows.append(dict(measure=f"DPO peak memory over the {what}, {name}: {split}", value=round(m["peak_mb"], 1),
                         unit="MB", ratio=round(ratio, 3), baseline=f"official = {official_mem['peak_mb']:.0f} MB",
                         goal="baseline" if name == "official" else f"<= {GOALS['memory']}",
                         verdict="baseline" if name == "official" else verdict(ratio, GOALS["memory"])))
    per_epoch = cfg["dataset"] // cfg["pairs"]
    for how, marks in ((f"{cfg['dataset']} pairs encoded on first use", runs),
                       (f"{cfg['dataset']} pairs from our pair builder, its kept sampler latents read (no VAE)",
                        kept_runs)):
        for label, k, goal in (("1 step", 1, 1.0), (f"1 epoch ({per_epoch} steps)", per_epoch, GOALS["run"]),
                               (f"{cfg['epochs']} epochs ({steps} steps)", steps, GOALS["run"])):
            ours, official = marks["ours"][k - 1], marks["official"][k - 1]
            ratio = ours / official
            rows.append(dict(measure=f"whole run from start, {label}, {how}, ours",
                             value=round(ours, 3), unit="s", ratio=round(ratio, 3),
                             baseline=f"official loop = {official:.3f} s",
                             goal=f"< {goal}" if goal == 1.0 else f"<= {goal}",
                             verdict=(("meets goal" if ratio < 1 else "misses goal") if goal == 1.0
                                      else verdict(ratio, goal))))
    if real_kept is not None:
        real_runs, real_steps = real_kept
        real_cfg = real_settings()
        per_epoch = real_cfg["dataset"] // real_cfg["pairs"]
        for label, k, goal in (("1 step", 1, 1.0), (f"1 epoch ({per_epoch} steps)", per_epoch, GOALS["run"]),
                               (f"{real_cfg['epochs']} epochs ({real_steps} steps)", real_steps, GOALS["run"])):
            ours, official = real_runs["ours"][k - 1], real_runs["official"][k - 1]
            ratio = ours / official
            rows.append(dict(measure=f"whole run from start at SD1.5's real widths (as the step row above), {label}, "
                                     f"{real_cfg['dataset']} pairs from our pair builder, its kept sampler latents "
                                     "read (no VAE), ours",
                             value=round(ours, 3), unit="s", ratio=round(ratio, 3),
                             baseline=f"official loop = {official:.3f} s",
                             goal=f"< {goal}" if goal == 1.0 else f"<= {goal}",
                             verdict=(("meets goal" if ratio < 1 else "misses goal") if goal == 1.0
                                      else verdict(ratio, goal))))
    if tiny:  # seconds-long smoke settings: overheads dominate, the verdicts mean nothing
        for row in rows:
            row["verdict"] = "tiny setting: " + row["verdict"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="seconds-long settings (what the tests run)")
    parser.add_argument("--memory", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory:
        try:
            print(json.dumps(peak_memory(args.memory, settings(args.tiny))))
        finally:
            for data in _DATA.values():
                data.close()
        return 0
    for row in run(args.tiny):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
