"""The Diffusion-DPO loss matches a hand computation."""

from __future__ import annotations

import math

import torch

from comfyui_safetydpo.dpo_loss import diffusion_dpo_loss, per_sample_mse


def test_loss_and_metrics_match_hand_computation():
    mw, ml = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    rw, rl = torch.tensor([0.15, 0.20]), torch.tensor([0.15, 0.20])
    beta = 10.0
    loss, metrics = diffusion_dpo_loss(mw, ml, rw, rl, beta)
    d = [(0.10 - 0.20) - 0.0, (0.30 - 0.10) - 0.0]
    expected = sum(-math.log(1 / (1 + math.exp(0.5 * beta * x))) for x in d) / 2
    assert abs(float(loss) - expected) < 1e-6
    assert metrics["implicit_accuracy"] == 0.5
    assert abs(metrics["reward_margin"] - sum(-0.5 * beta * x for x in d) / 2) < 1e-6
    assert abs(metrics["model_mse_winner"] - 0.2) < 1e-7 and abs(metrics["reference_mse_loser"] - 0.175) < 1e-7


def test_equal_to_reference_gives_log_two():
    x = torch.rand(4)
    loss, metrics = diffusion_dpo_loss(x, x, x, x, 5000.0)
    assert abs(float(loss) - math.log(2)) < 1e-6 and metrics["implicit_accuracy"] == 0.0


def test_per_sample_mse_is_over_channels_height_width():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.ones(2, 3, 4, 4)
    b[1] *= 2
    assert torch.allclose(per_sample_mse(a, b), torch.tensor([1.0, 4.0]))
