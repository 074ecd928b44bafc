"""Training on more than one process: one expert data-parallel, or several experts side by side.

``accelerate launch [--num_processes N] trainer/train.py ...`` (or ``torchrun``) starts N copies of the
trainer; accelerate sets up the process group (NCCL on GPUs, gloo on CPUs) and gives each process its
device. Two ways to use them:

- Data parallel (one expert): every process holds the whole (frozen) model and its own copy of the
  LoRA. Each optimizer step draws one global batch of ``batch_size × N`` pairs, with the noise and
  timesteps of the whole batch, from the same seeded generators on every process; each process
  trains on its contiguous part of it; the LoRA gradients are averaged across processes once per
  optimizer step (after all ``gradient_accumulation`` micro-batches), then every process takes the
  same optimizer step. The result is the run of one process with ``batch_size × N`` pairs, up to
  float rounding. Only the main process writes checkpoints, metrics and the expert; every process
  resumes from the same checkpoint.
- Experts in parallel (``--per-category``): process ``r`` trains categories ``r, r + N, …`` on its
  own device with no communication; each expert is the one a single process would train.

Why the gradients are averaged here and not by wrapping the UNet in ``DistributedDataParallel``: a
DPO step calls the network up to three times before one backward (reference pass with LoRA off,
trained pass, replay pass), which DDP does not allow without ``static_graph``/unused-parameter
search, and only the LoRA tensors (a few MB) need synchronising: one all-reduce of one flat
buffer per step, through ``accelerate.utils.reduce``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Dict, List, Optional, Tuple

import torch

from .errors import DatasetError, TrainingError

# Experts in parallel end at different times; the last barrier waits for the slowest one.
EXPERTS_IN_PARALLEL_TIMEOUT = datetime.timedelta(days=7)


def launched_processes() -> int:
    """How many processes the launcher started (1 for a plain ``python trainer/train.py``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def accelerate_mixed_precision() -> Optional[str]:
    """The mixed precision chosen with ``accelerate launch --mixed_precision`` / ``accelerate config``."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if value in ("", "no"):
        return None
    if value not in ("fp16", "bf16"):
        raise TrainingError(f"accelerate's mixed_precision {value!r} is not supported by this trainer: use no, fp16 "
                            "or bf16")
    return value


@dataclasses.dataclass
class ProcessGroup:
    """This process's place among the launched processes, and the collectives the training loop needs."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data parallel ---------------------------------------------------------------------------

    def check_sizes(self, pairs: int, replay: int, batch_size: int, replay_batch_size: int,
                    uses_replay: bool) -> None:
        """Every process needs at least one pair (and replay item) of each global batch."""
        if min(batch_size * self.world, pairs) < self.world:
            raise DatasetError(f"{pairs} pair(s) for {self.world} processes: each process needs at least one pair "
                               "per step; use fewer processes or more pairs")
        if uses_replay and min(replay_batch_size * self.world, replay) < self.world:
            raise DatasetError(f"{replay} replay item(s) for {self.world} processes: each process needs at least "
                               "one per step; use fewer processes or more replay items")

    def shard(self, total: int) -> Tuple[slice, float]:
        """This process's contiguous part of a global batch of ``total``, and its loss weight.

        The weight (part size × processes / total) makes the average of the processes' weighted mean
        losses the mean over the global batch, also when ``total`` does not divide evenly.
        """
        base, extra = divmod(total, self.world)
        size = base + (1 if self.rank < extra else 0)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + size), size * self.world / total

    def start_together(self, params: List[torch.Tensor], step: int) -> None:
        """Check every process starts at the same step (the same checkpoint), then give all of them the
        main process's LoRA weights (as DDP does when it wraps a model)."""
        from accelerate.utils import broadcast

        steps = torch.tensor([step, -step], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
        if int(steps[0]) != -int(steps[1]):
            raise TrainingError(f"the processes resume from different steps ({-int(steps[1])} to {int(steps[0])}): "
                                "they do not see the same checkpoints. On several machines, put --output on "
                                "storage every machine shares (only the main process writes it)")
        if not params:
            return
        flat = broadcast(torch.cat([p.detach().reshape(-1) for p in params]).contiguous(), from_process=0)
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def sync_gradients(self, params: List[torch.Tensor], finite: bool) -> bool:
        """Average the LoRA gradients over the processes (one all-reduce); True when all were finite."""
        from accelerate.utils import reduce

        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float() for p in params]
        device = params[0].device if params else self.device
        flag = torch.tensor([1.0 if finite else 0.0], device=device)
        flat = reduce(torch.cat(parts + [flag]), reduction="sum")
        offset = 0
        for p, part in zip(params, parts):
            p.grad = (flat[offset:offset + part.numel()] / self.world).view_as(p).to(p.dtype)
            offset += part.numel()
        return bool(flat[-1].item() == self.world)

    def mean_metrics(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """The step's metrics averaged over the processes (every process holds the same keys)."""
        from accelerate.utils import reduce

        if not metrics:
            return metrics
        keys = sorted(metrics)
        values = reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                                     device=self.device), reduction="sum")
        return {k: float(v) / self.world for k, v in zip(keys, values.tolist())}

    def wait(self) -> None:
        """A barrier: every process reaches this point before any goes on."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_process_first(self):
        """The main process runs the block first (e.g. writes a cache), then the others (which read it)."""
        if not self.is_main:
            self.wait()
        yield
        if self.is_main:
            self.wait()


def start(experts_in_parallel: bool = False) -> Optional[ProcessGroup]:
    """Join the launcher's process group; None when only one process was launched.

    ``experts_in_parallel``: the processes only meet again at the end, after each trained its own
    experts (hours apart), so the group has a long timeout and uses gloo (CPU) for that one barrier
    even on GPUs, where nothing else is exchanged.
    """
    if launched_processes() <= 1:
        return None
    from accelerate import PartialState

    kwargs = {"timeout": EXPERTS_IN_PARALLEL_TIMEOUT, "backend": "gloo"} if experts_in_parallel else {}
    state = PartialState(cpu=not torch.cuda.is_available(), **kwargs)
    if state.num_processes <= 1:
        return None
    device = torch.device(state.device)
    if device.type == "cpu":
        device = torch.device("cpu")
    return ProcessGroup(rank=state.process_index, world=state.num_processes,
                        local_rank=state.local_process_index, device=device)


def my_categories(categories: List[str], group: Optional[ProcessGroup]) -> List[str]:
    """The categories this process trains when experts are trained in parallel (round robin)."""
    if group is None:
        return list(categories)
    return list(categories)[group.rank::group.world]


def train_expert_data_parallel(bundle, pairs, config, output_dir, group: ProcessGroup, resume: bool = False,
                               progress=None):
    """``train_expert`` with the batch split over the processes of ``group``.

    The main process encodes the pairs into the cache first; the others then read the cache
    instead of running the VAE and text encoders on the same images.
    """
    from pathlib import Path

    from .encoding_cache import encode_preference_pairs
    from .training import train_expert

    with group.main_process_first():
        encode_preference_pairs(bundle, pairs, Path(output_dir) / "cache")
    return train_expert(bundle, pairs, config, output_dir=output_dir, resume=resume,
                        progress=progress if group.is_main else None, parallel=group)
