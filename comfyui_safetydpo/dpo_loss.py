"""The Diffusion-DPO loss (Wallace et al. 2023) as SafetyDPO uses it.

For each pair, winner (preferred, safe image) and loser (rejected, unsafe image) are noised with the
same noise at the same timestep, and the per-sample MSE to the training target (ε or v) is taken
over C, H, W for the trained model and for the frozen reference:

    d    = (mse_w − mse_l) − (ref_mse_w − ref_mse_l)
    loss = −log σ(−β/2 · d)

β convention: the ½ sits inside, as in the Diffusion-DPO paper's official code and SafetyDPO's
release, where β = 5000. (Papers that write −log σ(−β·d) use half our β for the same loss.)
Implicit accuracy is the fraction of pairs with d < 0: the model now prefers the winner more than
the reference did.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dimension but the batch (C, H, W)."""
    return (prediction.float() - target.float()).pow(2).reshape(prediction.shape[0], -1).mean(dim=1)


def diffusion_dpo_loss(
    model_mse_winner: torch.Tensor,
    model_mse_loser: torch.Tensor,
    reference_mse_winner: torch.Tensor,
    reference_mse_loser: torch.Tensor,
    beta: float,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Mean DPO loss over the batch and its metrics (implicit accuracy, reward margin, the four MSEs)."""
    model_difference = model_mse_winner - model_mse_loser
    reference_difference = reference_mse_winner - reference_mse_loser
    d = model_difference - reference_difference
    logits = -0.5 * beta * d
    loss = -F.logsigmoid(logits).mean()
    metrics = {
        "dpo_loss": float(loss.detach()),
        "implicit_accuracy": float((d < 0).float().mean()),
        # Reward of a sample ∝ −β/2 · (mse − ref_mse); the margin is reward(winner) − reward(loser).
        "reward_margin": float(logits.detach().mean()),
        "model_mse_winner": float(model_mse_winner.detach().mean()),
        "model_mse_loser": float(model_mse_loser.detach().mean()),
        "reference_mse_winner": float(reference_mse_winner.detach().mean()),
        "reference_mse_loser": float(reference_mse_loser.detach().mean()),
    }
    return loss, metrics
