"""Merge algorithms as small pure tensor functions (as ``peft.utils.merge_utils`` writes TIES, DARE and magnitude
pruning): each takes the experts' factors, ΔW tensors or statistics for one layer and returns tensors.

``merging.merge_per_module`` runs one of them over every layer; ``merging`` and ``least_squares_merge`` hold the
methods' checks and recipes. TIES, DARE and magnitude pruning are peft's own functions.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Sequence, Tuple

import torch

from .expert import LoraModule


def concat_factors(downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], template: LoraModule) -> LoraModule:
    """Rank concatenation: flattened factors (up_k @ down_k = w_k ΔW_k) as one module with alpha = rank
    (scale 1: ComfyUI reproduces up @ down)."""
    down = torch.cat(downs, dim=0)
    up = torch.cat(ups, dim=1)
    rank = down.shape[0]
    if template.down.dim() == 4:
        down = down.reshape(rank, *template.down.shape[1:])
        up = up.reshape(up.shape[0], rank, 1, 1)
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(rank))


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Task arithmetic: Σ_k w_k ΔW_k."""
    return sum(w * d for d, w in zip(deltas, weights))


def row_winners(activations: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Row Co-Merge: the winner of output unit j is argmax_k w_k·a_k[j] (first expert wins ties)."""
    return torch.stack([w * a for a, w in zip(activations, weights)]).argmax(dim=0)


def keep_rows(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the output rows (dim 0) outside the boolean ``keep`` set to zero."""
    return tensor * keep.to(tensor.dtype).reshape(-1, *([1] * (tensor.dim() - 1)))


def element_co_merge(deltas: Iterable[torch.Tensor], weights: Sequence[float],
                     input_sq_means: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Element Co-Merge: per weight, the w_k ΔW_k[j, i] with the largest |w_k ΔW_k[j, i]|·sqrt(E x_i²).

    Returns (merged ΔW, winner index per element). A running maximum over experts (first expert wins ties,
    as argmax would): with ``deltas`` a generator, one ΔW is in memory at a time besides the result; the
    tensors are never changed in place.
    """
    best = merged = winner = shape = None
    for index, (delta, weight, input_sq) in enumerate(zip(deltas, weights, input_sq_means)):
        shape = delta.shape
        delta = delta.reshape(shape[0], -1) * weight
        input_scale = input_sq.clamp_min(0).sqrt()
        if delta.shape[1] != input_scale.shape[0]:  # conv: E x² per input channel, repeated per tap
            input_scale = input_scale.repeat_interleave(delta.shape[1] // input_scale.shape[0])
        score = delta.abs().mul_(input_scale.unsqueeze(0))
        if best is None:
            best, merged = score, delta
            winner = torch.zeros(delta.shape, dtype=torch.uint8 if len(weights) < 256 else torch.long)
            continue
        better = score > best
        torch.maximum(best, score, out=best)
        torch.where(better, delta, merged, out=merged)
        winner.masked_fill_(better, index)
    return merged.reshape(shape), winner


def win_counts(winner: torch.Tensor, competitors: int) -> torch.Tensor:
    """How many rows/elements each of ``competitors`` experts won."""
    return torch.bincount(winner.reshape(-1).long(), minlength=competitors).float()


def truncated_svd(delta: torch.Tensor, rank: int) -> Tuple[LoraModule, Tuple[float, float]]:
    """Best rank-``rank`` approximation of ΔW as a LoRA module, and (‖residual‖_F, ‖ΔW‖_F)."""
    shape = delta.shape
    matrix = delta.reshape(shape[0], -1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root.unsqueeze(1) * vh[:r]
    # The residual of a truncated SVD is the energy of the dropped singular values.
    residual = float(s[r:].pow(2).sum().sqrt())
    norm = float(s.pow(2).sum().sqrt())
    if len(shape) == 4:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, 1, 1)
    return LoraModule(down=down.contiguous(), up=up.contiguous(), alpha=float(r)), (residual, norm)


def truncated_svd_of_factors(up: torch.Tensor, down: torch.Tensor, rank: int, template: LoraModule
                              ) -> Tuple[LoraModule, Tuple[float, float]]:
    """Exact truncated SVD of up @ down ([out, R] @ [R, in]) through QR of the factors: O(R²(out+in)).

    With up = Qu Ru and downᵀ = Qd Rd, up @ down = Qu (Ru Rdᵀ) Qdᵀ, so the SVD of the small R×R core
    gives the singular values and vectors of the full product.
    """
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.t())
    u, s, vh = torch.linalg.svd(ru @ rd.t())
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    new_up = (qu @ u[:, :r]) * root
    new_down = root.unsqueeze(1) * (vh[:r] @ qd.t())
    residual = float(s[r:].pow(2).sum().sqrt())
    norm = float(s.pow(2).sum().sqrt())
    if template.down.dim() == 4:
        new_down = new_down.reshape(r, *template.down.shape[1:])
        new_up = new_up.reshape(new_up.shape[0], r, 1, 1)
    return LoraModule(down=new_down.contiguous(), up=new_up.contiguous(), alpha=float(r)), (residual, norm)


def relative_errors(errors: Dict[str, Tuple[float, float]]) -> Tuple[Dict[str, float], float]:
    """Per-module relative Frobenius errors and the overall one (‖all residuals‖ / ‖all ΔW‖)."""
    per_module = {m: (e / n if n > 0 else 0.0) for m, (e, n) in errors.items()}
    total = math.sqrt(sum(n * n for _, n in errors.values()))
    overall = math.sqrt(sum(e * e for e, _ in errors.values())) / total if total > 0 else 0.0
    return per_module, overall


def least_squares_down(projection: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The merged factor for one expert: (A_k G_k) M⁻¹ (or (ΔW_k G_k) M⁻¹ for a full diff)."""
    return projection @ inverse
