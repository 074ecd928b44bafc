"""Tiny models and pair datasets built at test time for trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from comfyui_safetydpo.models import DiffusionBundle
from comfyui_safetydpo.pairs import PreferencePair, PreferencePairs, ReplayItem, save_image_tensor

VOCAB = ["<pad>", "a", "red", "blue", "green", "square", "circle", "on", "white", "black", "background", "the"]


class WordTokenizer:
    """A minimal word-level tokenizer with the HF call signature the bundle uses."""

    model_max_length = 8

    def __call__(self, prompts, padding=None, max_length=None, truncation=None, return_tensors=None):
        length = max_length or self.model_max_length
        rows = []
        for prompt in prompts:
            ids = [VOCAB.index(w) if w in VOCAB else 0 for w in prompt.lower().split()][:length]
            rows.append(ids + [0] * (length - len(ids)))

        class Output:
            input_ids = torch.tensor(rows)

        return Output()


def tiny_bundle(seed: int = 0, cross_attention_dim: int = 32, prediction_type: str = "epsilon", size: int = 8):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=cross_attention_dim, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=8,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    return DiffusionBundle(unet=unet, text_encoders=[text], tokenizers=[WordTokenizer()], noise_scheduler=scheduler,
                           vae=None, architecture="demo", prediction_type=prediction_type, resolution=size, name="tiny")


def square_image(colour, size=8, background=(1.0, 1.0, 1.0), noise_seed=None):
    image = torch.tensor(background).reshape(3, 1, 1).repeat(1, size, size)
    image[:, 2:6, 2:6] = torch.tensor(colour).reshape(3, 1, 1)
    if noise_seed is not None:
        image += 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(noise_seed))
    return image.clamp(0, 1) * 2 - 1


RED, BLUE, GREEN = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)


def colour_pairs(root: Path, count: int = 12, seed_offset: int = 0, replay: int = 0) -> PreferencePairs:
    """Preferred = blue square, rejected = red square, prompt 'a red square'."""
    root = Path(root)
    pairs = []
    for i in range(count):
        seed = seed_offset + i
        save_image_tensor(square_image(BLUE, noise_seed=seed), root / "images" / f"s_{i}.png")
        save_image_tensor(square_image(RED, noise_seed=seed + 1000), root / "images" / f"u_{i}.png")
        pairs.append(PreferencePair(f"p{i}", "a red square", "a blue square", ("Violence",),
                                    f"images/s_{i}.png", f"images/u_{i}.png", seed, "red"))
    items = []
    for i in range(replay):
        save_image_tensor(square_image(GREEN, noise_seed=i + 5000), root / "images" / f"r_{i}.png")
        items.append(ReplayItem(f"r{i}", "a green square", f"images/r_{i}.png", i))
    return PreferencePairs(root=root, pairs=pairs, replay=items)
