"""A text-to-image diffusion model as the trainer, pair builder, evaluation and demo see it.

``DiffusionBundle`` wraps a diffusers ``UNet2DConditionModel`` with its text encoder(s), tokenizer(s),
optional VAE (``None`` means the model works in pixel space, as the demo world's does) and the noise
schedule it was trained with. Everything that needs to encode prompts, encode images, compute the
training target or sample images goes through it, so SD1.5, SD2.1 (v-prediction), SDXL and the demo
model share one code path.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass
class PromptEmbeddings:
    """Text conditioning for a batch: cross-attention states and, for SDXL, added conditioning."""

    encoder_hidden_states: torch.Tensor
    added_cond: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def to(self, device=None, dtype=None) -> "PromptEmbeddings":
        return PromptEmbeddings(
            self.encoder_hidden_states.to(device=device, dtype=dtype),
            {k: v.to(device=device, dtype=dtype) for k, v in self.added_cond.items()},
        )

    def index(self, rows) -> "PromptEmbeddings":
        return PromptEmbeddings(
            self.encoder_hidden_states[rows], {k: v[rows] for k, v in self.added_cond.items()}
        )

    @staticmethod
    def cat(items: Sequence["PromptEmbeddings"]) -> "PromptEmbeddings":
        keys = items[0].added_cond.keys()
        return PromptEmbeddings(
            torch.cat([i.encoder_hidden_states for i in items]),
            {k: torch.cat([i.added_cond[k] for i in items]) for k in keys},
        )


@dataclasses.dataclass
class DiffusionBundle:
    """UNet + text encoders + (optional) VAE + training noise schedule, with the model's conventions."""

    unet: torch.nn.Module
    text_encoders: List[torch.nn.Module]
    tokenizers: List[object]
    noise_scheduler: object
    vae: Optional[torch.nn.Module] = None
    architecture: str = "unknown"
    prediction_type: str = "epsilon"
    resolution: int = 512
    name: str = "model"

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    # -- text -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeddings:
        """Cross-attention states for ``prompts`` (SDXL: both encoders' penultimate layers + pooled)."""
        device = self.device
        states = []
        pooled = None
        for index, (tokenizer, encoder) in enumerate(zip(self.tokenizers, self.text_encoders)):
            tokens = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            if self.is_sdxl:
                output = encoder(tokens, output_hidden_states=True)
                states.append(output.hidden_states[-2])
                if index == 1:
                    pooled = output[0]
            else:
                states.append(encoder(tokens)[0])
        hidden = torch.cat(states, dim=-1)
        added: Dict[str, torch.Tensor] = {}
        if self.is_sdxl:
            size = float(self.resolution)
            time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device)
            added = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
        return PromptEmbeddings(hidden, added)

    # -- images ---------------------------------------------------------------------------
    def latent_space(self) -> str:
        """Names the VAE's latent space (its weights and scale) for kept sampler latents; "" in pixel space."""
        if self.vae is None:
            return ""
        from .encoding_cache import vae_fingerprint

        return vae_fingerprint(self.vae, self.vae.config.scaling_factor, "diffusers")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents for images in [-1, 1] ([B, 3, H, W]); the identity in pixel space."""
        if self.vae is None:
            return images.to(self.device)
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(images.to(self.device, vae_dtype)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        vae_dtype = next(self.vae.parameters()).dtype
        decoded = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample
        return decoded.float().clamp(-1, 1)

    # -- diffusion ------------------------------------------------------------------------
    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, embeddings: PromptEmbeddings
    ) -> torch.Tensor:
        """The UNet's prediction (ε or v, as the model was trained)."""
        kwargs = {}
        if embeddings.added_cond:
            kwargs["added_cond_kwargs"] = embeddings.added_cond
        return self.unet(
            noisy_latents, timesteps, encoder_hidden_states=embeddings.encoder_hidden_states, **kwargs
        ).sample

    def training_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet was trained to predict: the noise (ε) or the velocity (v)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int = 20,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        latent_size: Optional[int] = None,
        keep_latents: bool = False,
    ):
        """Images in [-1, 1] for ``prompts``, one seed each (same seed → same starting noise).

        ``keep_latents``: return ``pairs.RenderedImages`` with the latents the images were decoded from, so
        the pair builder keeps them and training skips the VAE.
        """
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(steps)
        device = self.device
        dtype = next(self.unet.parameters()).dtype
        if latent_size is None:
            factor = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
            latent_size = self.resolution // factor
        channels = self.unet.config.in_channels
        noise = [
            torch.randn(
                (channels, latent_size, latent_size), generator=torch.Generator().manual_seed(int(s))
            )
            for s in seeds
        ]
        latents = torch.stack(noise).to(device, dtype) * scheduler.init_noise_sigma
        conditional = self.encode_prompts(prompts).to(device, dtype)
        use_guidance = guidance_scale != 1.0
        if use_guidance:
            unconditional = self.encode_prompts([negative_prompt] * len(prompts)).to(device, dtype)
            both = PromptEmbeddings.cat([unconditional, conditional])
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            if use_guidance:
                doubled = torch.cat([model_input, model_input])
                prediction = self.predict(doubled, t.expand(len(doubled)).to(device), both)
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            else:
                prediction = self.predict(model_input, t.expand(len(latents)).to(device), conditional)
            latents = scheduler.step(prediction, t, latents).prev_sample
        images = self.decode_latents(latents.float())
        if keep_latents and self.vae is not None:
            from .pairs import RenderedImages

            return RenderedImages(images, latents.float().cpu(), self.latent_space())
        return images
