"""Finetuning checkpoints: a folder holding `student.dag` (written by `td.save`) and `state.safetensors`
(optimizer state and the position in the data; JSON metadata, no pickle)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..core.dag import DagModule
from ..core.errors import DagError
from .distributed import average_buffers

STATE_FILE = "state.safetensors"
STUDENT_FILE = "student.dag"


def save_checkpoint(
    folder: Path,
    student: DagModule,
    opt: torch.optim.Optimizer,
    step: int,
    epoch: int,
    in_epoch: int,
    rank: int,
    world: int,
) -> None:
    """Rank 0 writes the folder next to the old one and swaps it in, so a crash leaves a whole checkpoint."""
    from ..serde import save

    average_buffers(student, world)
    if rank == 0:
        fresh = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        save(student, fresh / STUDENT_FILE)
        tensors, meta = _flatten_optimizer(opt.state_dict())
        meta.update(step=step, epoch=epoch, in_epoch=in_epoch, world_size=world)
        save_file(tensors, fresh / STATE_FILE, metadata={"torch_dag_finetune": json.dumps(meta)})
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


def load_checkpoint(folder: Path, student: DagModule, opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    """Load the student's weights and the optimizer state; (steps done, epoch, steps into that epoch)."""
    from ..serde import load

    saved = load(folder / STUDENT_FILE)
    try:
        student.load_state_dict(saved.state_dict())
    except RuntimeError as e:
        raise DagError(f"checkpoint {folder} holds a different model than the student: {e}") from None
    from safetensors import safe_open

    with safe_open(str(folder / STATE_FILE), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("torch_dag_finetune", "{}"))
    if not meta:
        raise DagError(f"{folder / STATE_FILE} is not a torch-dag finetune state")
    opt.load_state_dict(_unflatten_optimizer(load_file(folder / STATE_FILE), meta))
    return int(meta["step"]), int(meta["epoch"]), int(meta["in_epoch"])


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as safetensors tensors plus JSON (param groups and non-tensor values)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
