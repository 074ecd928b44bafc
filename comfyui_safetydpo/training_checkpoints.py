"""Resumable training checkpoints: LoRA, optimizer, scheduler and every random state, written atomically."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from . import files
from .errors import TrainingError
from .lora_injection import lora_parameters


def save_checkpoint(folder: Path, module, optimizer, scheduler, state: Dict, generator: torch.Generator,
                    keep: int = 2) -> Path:
    """Write a checkpoint atomically: a temp folder renamed into place, then the ``latest`` pointer."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step_*"):  # temp folders of a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    step = state["step"]
    final = folder / f"step_{step:07d}"
    failed = {"error": TrainingError, "what": f"checkpoint of step {step}",
              "advice": "free disk space (or choose another output folder) and resume: "
                        "the previous checkpoint is intact"}
    with files.atomic_folder(final, **failed) as temp:
        _write_checkpoint_files(temp, module, optimizer, scheduler, state, generator)
    files.write_text(folder / "latest", final.name, **failed)
    existing = sorted(p for p in folder.glob("step_*") if p.is_dir())
    for old in existing[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint_files(temp: Path, module, optimizer, scheduler, state: Dict, generator) -> None:
    from safetensors.torch import save_file

    lora = {n: p.detach().cpu().contiguous() for n, p in lora_parameters(module).items()}
    save_file(lora, str(temp / "lora.safetensors"))
    optimizer_tensors, optimizer_index = {}, {}
    for index, (param_name, param) in enumerate(lora_parameters(module).items()):
        param_state = optimizer.state.get(param, {})
        for key, value in param_state.items():
            if torch.is_tensor(value):
                optimizer_tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                optimizer_index[f"{index}.{key}"] = value
    if optimizer_tensors:
        save_file(optimizer_tensors, str(temp / "optimizer.safetensors"))
    save_file({"torch_rng": torch.get_rng_state(), "generator": generator.get_state()},
              str(temp / "rng.safetensors"))
    numpy_state = np.random.get_state()
    payload = {
        **state,
        "optimizer_scalars": optimizer_index,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "python_rng": repr(random.getstate()),
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    (temp / "state.json").write_text(json.dumps(payload))


def latest_checkpoint(folder: Path) -> Optional[Path]:
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    candidate = folder / pointer.read_text().strip()
    if (candidate / "state.json").is_file() and (candidate / "lora.safetensors").is_file():
        return candidate
    # The pointer names a folder that is gone or incomplete: fall back to the newest complete one.
    complete = sorted(p for p in folder.glob("step_*")
                      if (p / "state.json").is_file() and (p / "lora.safetensors").is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path, module, optimizer, scheduler, generator: torch.Generator) -> Dict:
    import ast

    from .lora_files import read_safetensors

    lora, _ = read_safetensors(path / "lora.safetensors")
    params = lora_parameters(module)
    if set(lora) != set(params) or any(lora[n].shape != params[n].shape for n in lora):
        raise TrainingError(f"{path}: the checkpoint's LoRA does not match this run's settings "
                            "(rank, targets or model changed); start a new output folder or use the same settings")
    with torch.no_grad():
        for name, tensor in lora.items():
            params[name].copy_(tensor)
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step recorded")
    except (OSError, ValueError) as error:
        raise TrainingError(f"{path / 'state.json'}: damaged checkpoint state ({error}); delete the folder "
                            f"{path.name} to resume from the one before, or start a new output folder") from None
    if (path / "optimizer.safetensors").is_file():
        optimizer_tensors, _ = read_safetensors(path / "optimizer.safetensors")
    else:
        optimizer_tensors = {}
    for index, (param_name, param) in enumerate(params.items()):
        entry = {}
        for key, value in optimizer_tensors.items():
            i, field = key.split(".", 1)
            if int(i) == index:
                entry[field] = value.clone()
        for key, value in state.get("optimizer_scalars", {}).items():
            i, field = key.split(".", 1)
            if int(i) == index:
                entry[field] = value
        if entry:
            optimizer.state[param] = entry
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
        for group, rate in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = rate  # the scheduler's state alone leaves the optimizer at the first step's rate
    rng, _ = read_safetensors(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_rng"])
    generator.set_state(rng["generator"])
    random.setstate(ast.literal_eval(state["python_rng"]))
    numpy_state = state["numpy_rng"]
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    return state
