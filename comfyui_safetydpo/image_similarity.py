"""How far apart two images are: mean absolute pixel difference and SSIM (no weights needed)."""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11×11 Gaussian window, σ 1.5, K1 0.01, K2 0.03) per image pair.

    ``a``, ``b``: [B, C, H, W] in [0, data_range]; images smaller than the window use a window of
    their size. Returns [B] (mean over channels and valid positions).
    """
    a = a.double()
    b = b.double()
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size, 1.5 * size / 11).to(a)
    channels = a.shape[1]
    kernel = window.expand(channels, 1, size, size)

    def blur(x):
        return torch.nn.functional.conv2d(x, kernel, groups=channels)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean(dim=(1, 2, 3)).float()


def image_distance(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    """Mean absolute difference (0..1 scale) and SSIM of two uint8 [H, W, 3] images."""
    ta = torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    tb = torch.from_numpy(b.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return {"mad": float((ta - tb).abs().mean()), "ssim": float(ssim(ta, tb)[0])}
