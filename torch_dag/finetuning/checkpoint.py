"""Finetuning checkpoints: a folder holding `student.dag` (written by `td.save`) and `state.safetensors`
(optimizer state and the position in the data; JSON metadata, no pickle), marked as a checkpoint by
`torch_dag_checkpoint`. Only such folders are ever replaced: a checkpoint path holding anything else is
refused."""

from __future__ import annotations

import json
import shutil
import warnings
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
MARKER_FILE = "torch_dag_checkpoint"
MARKER_TEXT = "a torch-dag finetuning checkpoint (td.finetune); resumed from, replaced as training goes\n"


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
    """Rank 0 writes `<folder>.tmp` (the marker first, the state last, each complete before it is named)
    and swaps it in through `<folder>.old`, so a crash at any point leaves a complete checkpoint that
    `resume_from` finds."""
    from ..serde import save

    average_buffers(student, world)
    if rank == 0:
        check_checkpoint_paths(folder)
        fresh, old = sibling(folder, "tmp"), sibling(folder, "old")
        if not folder.exists() and is_complete(fresh):  # a swap interrupted between its renames
            fresh.rename(folder)
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        (fresh / MARKER_FILE).write_text(MARKER_TEXT)
        save(student, fresh / STUDENT_FILE)
        tensors, meta = _flatten_optimizer(opt.state_dict())
        meta.update(step=step, epoch=epoch, in_epoch=in_epoch, world_size=world)
        partial = fresh / (STATE_FILE + ".partial")
        save_file(tensors, partial, metadata={"torch_dag_finetune": json.dumps(meta)})
        partial.rename(fresh / STATE_FILE)
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


def sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(f"{folder.name}.{suffix}")


def is_checkpoint(path: Path) -> bool:
    """A folder this module wrote (its marker, or an older checkpoint's state file), whole or partial."""
    return path.is_dir() and ((path / MARKER_FILE).is_file() or (path / STATE_FILE).is_file())


def is_complete(path: Path) -> bool:
    return is_checkpoint(path) and (path / STUDENT_FILE).is_file() and (path / STATE_FILE).is_file()


def check_checkpoint_paths(folder: Path) -> None:
    """Refuse a checkpoint path that holds something else than a torch-dag checkpoint (a user's file, a
    folder with other contents), or whose `.tmp` / `.old` siblings do: checkpoints replace those."""
    for path in (folder, sibling(folder, "tmp"), sibling(folder, "old")):
        if not path.exists() or is_checkpoint(path) or (path.is_dir() and not any(path.iterdir())):
            continue
        kind = "a file" if not path.is_dir() else "a folder that is not a torch-dag checkpoint"
        raise DagError(
            f"checkpoint {folder}: {path} is {kind}; a checkpoint would replace it. Give a new folder "
            "path (or an existing checkpoint), or move it away"
        )


def resume_from(folder: Path) -> Path | None:
    """The complete checkpoint to resume from: `folder`, else the `.tmp` (newer) or `.old` one a swap
    interrupted between its renames left, with a warning; None (warning that the run starts over
    when leftovers were incomplete) when there is none."""
    check_checkpoint_paths(folder)
    if is_complete(folder):
        return folder
    for path in (sibling(folder, "tmp"), sibling(folder, "old")):
        if is_complete(path):
            warnings.warn(
                f"checkpoint {folder} is missing: a save was interrupted; resuming from the complete "
                f"checkpoint {path}",
                stacklevel=3,
            )
            return path
    leftovers = [p for p in (folder, sibling(folder, "tmp"), sibling(folder, "old")) if is_checkpoint(p)]
    if leftovers:
        warnings.warn(
            f"checkpoint {folder}: no complete checkpoint ({', '.join(map(str, leftovers))} are partial "
            "saves); the run starts over from step 0",
            stacklevel=3,
        )
    return None


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
