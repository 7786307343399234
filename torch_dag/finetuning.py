"""Distillation finetuning: train a compressed DagModule (pruned, factorized, flexible) towards the model
it was made from.

    report = td.finetune(student, teacher, loader, epochs=1, lr=1e-3, checkpoint="run.ckpt")

The loss of a batch is the KL divergence between the teacher's and the student's output distributions
at a temperature (logit distillation), plus, where the batch has labels, the task loss, weighted
`alpha` : `1 - alpha`; plus, optionally, feature matching on vertices both DAGs have (a pruned model
keeps its vertex names): the mean squared error of the student's value to the teacher's, over the
teacher's variance. A flexible student trains all its levels together, each batch at the largest, the
smallest and one random middle level (the sandwich rule), every level distilled from the teacher.

Scaling out: run the same program under `torchrun --nproc_per_node N`. `finetune` then joins the
process group (gloo on CPU, nccl on GPU), wraps the student in DistributedDataParallel and gives rank r
every N-th batch starting at r, so each rank iterates the same data (seeded identically) but trains on
its own share; gradients are averaged, and every rank ends with the same weights.

Checkpoints are a folder: `student.dag` (written by `td.save`) and `state.safetensors` (optimizer state
and the position in the data; JSON metadata, no pickle). With `resume=True` (the default) a run
pointed at an existing checkpoint continues from it: the same batches, the same learning-rate
schedule, as if it had not stopped. (Each epoch starts by seeding torch's global generator, which a
shuffling DataLoader draws its order from; a loader given a generator of its own keeps that order
instead, the same on every rank but not replayed on resume.)
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .core.dag import DagModule, Ref, Vertex
from .core.errors import DagError
from .flex.model import FlexDagModule

STATE_FILE = "state.safetensors"
STUDENT_FILE = "student.dag"


@dataclass
class FinetuneReport:
    """What a run did: optimizer steps (this run and in total, with those of a resumed checkpoint), the
    mean training loss of each epoch (over all ranks), wall time, and the processes it ran on."""

    steps: int
    total_steps: int
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1
    resumed_at: int = 0  # optimizer steps the checkpoint had already done


def finetune(student: DagModule, teacher: torch.nn.Module, data: Iterable[Any], *, epochs: int = 1,
             lr: float = 1e-3, optimizer: str = "adamw", weight_decay: float = 0.0, momentum: float = 0.9,
             schedule: str = "cosine", temperature: float = 1.0, alpha: float = 0.5,
             label_loss: Callable[[torch.Tensor, Any], torch.Tensor] = F.cross_entropy,
             features: Sequence[str] = (), feature_weight: float = 1.0,
             freeze_bn: bool = False,
             checkpoint: str | Path | None = None, checkpoint_every: int = 0, resume: bool = True,
             device: str | torch.device | None = None, seed: int = 0, progress: bool = True
             ) -> FinetuneReport:
    """Train `student` in place towards `teacher` (frozen, in eval mode) on `data`. The teacher never
    changes: modules the student shares with it (as a factorized model shares the layers it left alone)
    are first replaced in the student by copies.

    `data` is re-iterable (a DataLoader, a list) when `epochs > 1`; a batch is an input tensor, an
    `(inputs, target)` pair (inputs a tensor or a tuple of tensors, target labels for `label_loss` or
    None), or a dict of keyword inputs whose "labels" entry, if any, is the target. Outputs that are
    dicts or tuples are distilled through their "logits" entry or their first element.

    `optimizer` is "adamw" or "sgd" (with `momentum`); `schedule` "cosine" (to zero over the run, when
    `data` has a length) or "constant". `features` names vertices of both DAGs whose values are
    matched (weight `feature_weight`). `freeze_bn` keeps the batch norms' statistics as they are (they run
    in eval mode; their affine weights still train): for finetuning sets too small or too narrow to
    re-estimate them. `checkpoint` is a folder written every `checkpoint_every` steps
    (0: at the end of each epoch) and at the end. The student is left in eval mode."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of distillation against labels) must be in [0, 1], got {alpha}")
    if epochs > 1 and iter(data) is data:
        raise ValueError("data is a one-pass iterator; pass a re-iterable (a DataLoader, a list) for epochs > 1")
    is_flex = isinstance(student, FlexDagModule)
    if features and is_flex:
        raise ValueError("feature matching needs one width; a flexible student is distilled on its outputs only")
    world, rank, owns_group = _join_process_group(device)
    device = torch.device(device) if device is not None else _default_device(student, world)
    _separate(student, teacher)
    student.to(device).train()
    if freeze_bn:
        for module in student.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    teacher.to(device).eval()
    tapped_student, tapped_teacher = _tap(student, teacher, features)
    model = tapped_student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            tapped_student, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=is_flex)  # a level leaves the other levels' norm parameters unused
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    steps_per_epoch = len(data) // world if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    total = steps_per_epoch * epochs if steps_per_epoch else None
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")

    done, start_epoch, skip = 0, 0, 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and resume and (ckpt / STATE_FILE).exists():
        done, start_epoch, skip = _load_checkpoint(ckpt, student, opt)
    report = FinetuneReport(steps=0, total_steps=done, world_size=world, resumed_at=done)
    start = time.perf_counter()
    bar = tqdm(total=total, initial=done, desc="finetune", unit="step", disable=not progress or rank != 0)
    try:
        for epoch in range(start_epoch, epochs):
            torch.manual_seed(seed + epoch)  # the same data order on every rank, and on resume
            rng = random.Random(seed * 7919 + epoch)  # the same sandwich levels on every rank
            losses, in_epoch = [], 0
            for index, batch in enumerate(_shard(iter(data), rank, world)):
                if epoch == start_epoch and index < skip:  # done before the checkpoint
                    if is_flex:
                        _sandwich_levels(student, rng)  # the level draws stay in step
                    continue
                if schedule == "cosine" and total:
                    for group in opt.param_groups:
                        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(done / total, 1.0)))
                inputs, kwargs, target = _unpack(_to(batch, device))
                with torch.no_grad():
                    expected = tapped_teacher(*inputs, **kwargs)
                opt.zero_grad(set_to_none=True)
                loss = 0.0
                for level in _sandwich_levels(student, rng) if is_flex else [None]:
                    if level is not None:
                        student.set_level_use(level)
                    out = model(*inputs, **kwargs)
                    term = _loss(out, expected, target, features, temperature, alpha, label_loss, feature_weight)
                    term.backward()
                    loss += term.item()
                opt.step()
                done, in_epoch = done + 1, index + 1
                report.steps += 1
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
                if ckpt is not None and checkpoint_every and done % checkpoint_every == 0:
                    _save_checkpoint(ckpt, student, opt, done, epoch, in_epoch, rank, world)
            report.epoch_losses.append(_mean_over_ranks(losses, device, world))
            skip = 0
            if ckpt is not None and not checkpoint_every:
                _save_checkpoint(ckpt, student, opt, done, epoch + 1, 0, rank, world)
        _average_buffers(student, world)
        if ckpt is not None and checkpoint_every and done % checkpoint_every:
            _save_checkpoint(ckpt, student, opt, done, epochs, 0, rank, world)
    finally:
        bar.close()
        if is_flex:
            student.set_level_use(student.max_level())
        student.eval()
        if owns_group:
            dist.destroy_process_group()
    report.total_steps, report.seconds = done, time.perf_counter() - start
    return report


# --- distributed ------------------------------------------------------------------------------------


def _join_process_group(device: str | torch.device | None) -> tuple[int, int, bool]:
    """(world size, rank, whether this call created the process group): under torchrun (WORLD_SIZE > 1)
    the group is joined here unless the caller already did."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, False
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size(), dist.get_rank(), True


def _default_device(student: torch.nn.Module, world: int) -> torch.device:
    if world > 1 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    parameter = next(student.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _shard(batches: Iterator[Any], rank: int, world: int) -> Iterator[Any]:
    """Rank r's share: batches r, r + world, r + 2 world, ...; a last incomplete round is dropped, so
    every rank takes the same number of steps (DDP needs each step on all ranks)."""
    if world == 1:
        yield from batches
        return
    round_: list[Any] = []
    for batch in batches:
        round_.append(batch)
        if len(round_) == world:
            yield round_[rank]
            round_ = []


def _average_buffers(module: torch.nn.Module, world: int) -> None:
    """Norm statistics averaged over the ranks (DDP keeps parameters equal, not buffers: each rank's
    last forward updated its own), so every rank holds the same model."""
    if world > 1:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(world)


def _mean_over_ranks(values: list[float], device: torch.device, world: int) -> float:
    total = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")


# --- batches and losses -------------------------------------------------------------------------------


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _unpack(batch: Any) -> tuple[tuple, dict, Any]:
    """(positional inputs, keyword inputs, target) of a batch (see `finetune`)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, dict):
        kwargs = dict(batch)
        return (), kwargs, kwargs.pop("labels", None)
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        inputs, target = batch
        return (tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)), {}, target
    raise TypeError(f"a batch must be a tensor, an (inputs, target) pair or a dict of inputs, got "
                    f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else ""))


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        if "logits" not in out:
            raise DagError(f"the output is a dict without 'logits' (keys {list(out)}); distillation needs one")
        return out["logits"]
    if isinstance(out, (list, tuple)):
        return _logits(out[0])
    return out


def _loss(out: Any, expected: Any, target: Any, features: Sequence[str], temperature: float, alpha: float,
          label_loss: Callable, feature_weight: float) -> torch.Tensor:
    if features:  # tapped DAGs return (output, {name: value})
        (out, got), (expected, wanted) = out, expected
    student, teacher = _logits(out), _logits(expected)
    if student.shape != teacher.shape:
        raise DagError(f"the student's output {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} "
                       "differ in shape; distillation compares them element by element")
    s = student.reshape(-1, student.shape[-1]).float() / temperature
    t = teacher.reshape(-1, teacher.shape[-1]).float() / temperature
    loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
    loss = loss * temperature**2
    if target is not None:
        loss = alpha * loss + (1 - alpha) * label_loss(student, target)
    for name in features:
        a, b = got[name], wanted[name]
        if a.shape != b.shape:
            raise DagError(f"feature '{name}': the student's value has shape {tuple(a.shape)}, the teacher's "
                           f"{tuple(b.shape)}; match vertices whose width pruning kept")
        loss = loss + feature_weight * F.mse_loss(a.float(), b.float()) / b.float().var().clamp_min(1e-8)
    return loss


def _separate(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Give `student` its own copies of the modules and tensors it shares with `teacher` (a factorized
    model keeps the layers it left alone as the very modules of its input): training moves the student
    only. What two parts of the student share stays shared."""
    if student is teacher:
        raise ValueError("the student is the teacher itself; distill a compressed copy of it")
    theirs = {id(x) for x in (*teacher.modules(), *teacher.parameters(), *teacher.buffers())}

    def shared(module: torch.nn.Module) -> bool:
        return any(id(x) in theirs for x in (*module.modules(), *module.parameters(), *module.buffers()))

    memo: dict[int, Any] = {}
    if isinstance(student, DagModule):  # its vertices hold the modules too: swap whole vertices
        copies = [Vertex(v.name, copy.deepcopy(v.module, memo), v.args, dict(v.kwargs), dict(v.meta))
                  for v in student if shared(v.module)]
        if copies:
            student.replace_vertices(copies)
        return

    def unshare(module: torch.nn.Module) -> None:  # the teacher's own modules are copied, never entered
        for store in (module._modules, module._parameters, module._buffers):
            for name, value in store.items():
                if value is not None and id(value) in theirs:
                    store[name] = copy.deepcopy(value, memo)
                elif isinstance(value, torch.nn.Module):
                    unshare(value)

    unshare(student)


def _tap(student: DagModule, teacher: torch.nn.Module, features: Sequence[str]
         ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The student and teacher as they are, or, with `features`, views of them (sharing every module)
    that also return the named vertices' values."""
    if not features:
        return student, teacher
    if not isinstance(teacher, DagModule):
        raise TypeError("feature matching needs the teacher as a DagModule (its vertices are matched by name)")
    for dag, who in ((student, "student"), (teacher, "teacher")):
        missing = [n for n in features if n not in dag]
        if missing:
            raise DagError(f"feature vertices {missing} are not in the {who}")

    def tapped(dag: DagModule) -> DagModule:
        return DagModule(dag.input_names, dag.vertices, (dag.output, {n: Ref(n) for n in features}),
                         dag.input_meta)

    return tapped(student), tapped(teacher)


def _sandwich_levels(flex: FlexDagModule, rng: random.Random) -> list[int]:
    top = flex.max_level()
    levels = [top, 0] + ([rng.randint(1, top - 1)] if top > 1 else [])
    return list(dict.fromkeys(levels))


# --- batchnorm statistics -----------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, calibration: Iterable, *, levels: Sequence[int] | None = None
                          ) -> int:
    """Re-estimate the running statistics of `model`'s batchnorms from `calibration` (batches of inputs:
    a tensor or a tuple of the model's inputs each, as `td.prune` takes them), in place; returns how
    many batchnorm layers got new statistics.

    Each statistic becomes the exact average over the batches (momentum None while it runs); every other
    layer runs in eval mode, nothing else changes and no gradient is taken. A model whose widths changed
    (pruned without compensation, a flexible level, `set_widths`) otherwise normalizes with statistics
    measured on the original widths' activations; new ones often recover much of the accuracy lost before
    any finetuning, though not always (they also undo the scale the old ones kept): check on held-out data.

    A flexible model recalibrates each level's own statistics with that level running (`levels`: which;
    default all; the level in use is restored), or, at widths set by `set_widths`, those widths'.
    Batchnorms outside the flexible layers are shared by every level and left as they are there."""
    batches = [(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in calibration]
    if not batches:
        raise DagError("recalibrate_batchnorm needs at least one calibration batch")
    if not isinstance(model, FlexDagModule):
        if levels is not None:
            raise DagError(f"levels= is for flexible models; this is a {type(model).__name__}")
        return _recalibrate(model, list(model.modules()), batches)

    def in_use() -> list[torch.nn.Module]:
        return [v.module.current()[0] for v in model.flex_vertices()]

    current = model.current_level()
    if current is None:
        if levels is not None:
            raise DagError("the flexible model runs widths set by set_widths; set_level_use(i) before "
                           "recalibrating levels")
        return _recalibrate(model, in_use(), batches)
    count = 0
    try:
        for level in range(model.max_level() + 1) if levels is None else levels:
            model.set_level_use(level)
            count += _recalibrate(model, in_use(), batches)
    finally:
        model.set_level_use(current)
    return count


def _recalibrate(model: torch.nn.Module, candidates: list[torch.nn.Module], batches: list[tuple]) -> int:
    """Recompute the running statistics of the batchnorms among `candidates` (modules `model` runs)."""
    norms = [m for m in candidates if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.running_mean is not None]
    if not norms:
        return 0
    modes = {m: m.training for m in [*model.modules(), *norms]}
    saved = [(m.momentum, m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
    model.eval()
    for m in norms:  # fresh tensors: a level's statistics may be views of another's
        m.running_mean = torch.zeros_like(m.running_mean)
        m.running_var = torch.ones_like(m.running_var)
        m.num_batches_tracked = torch.zeros_like(m.num_batches_tracked)
        m.momentum = None
        m.train()
    try:
        for batch in batches:
            model(*batch)
    except BaseException:  # a failing batch leaves the old statistics, not half-estimated ones
        for m, (_, mean, var, tracked) in zip(norms, saved):
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, tracked
        raise
    finally:
        for m, (momentum, *_) in zip(norms, saved):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return len(norms)


# --- checkpoints --------------------------------------------------------------------------------------


def _save_checkpoint(folder: Path, student: DagModule, opt: torch.optim.Optimizer, step: int, epoch: int,
                     in_epoch: int, rank: int, world: int) -> None:
    """Rank 0 writes the folder next to the old one and swaps it in, so a crash leaves a whole checkpoint."""
    from .serde import save

    _average_buffers(student, world)
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


def _load_checkpoint(folder: Path, student: DagModule, opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    """Load the student's weights and the optimizer state; (steps done, epoch, steps into that epoch)."""
    from .serde import load

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


__all__ = ["FinetuneReport", "finetune"]
