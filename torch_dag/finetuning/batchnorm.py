"""Batchnorm recalibration: new running statistics for a model whose widths changed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch

from ..core.errors import DagError
from ..flex.model import FlexDagModule
from ..flex.modules import FlexModule
from ..passes.prepare import as_inputs


@torch.no_grad()
def recalibrate_batchnorm(
    model: torch.nn.Module, calibration: Iterable, *, levels: Sequence[int] | None = None
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
    batches = [as_inputs(b) for b in calibration]
    if not batches:
        raise DagError("recalibrate_batchnorm needs at least one calibration batch")
    if not isinstance(model, FlexDagModule):
        if levels is not None:
            raise DagError(f"levels= is for flexible models; this is a {type(model).__name__}")
        return _recalibrate(model, list(model.modules()), batches)

    def in_use() -> list[torch.nn.Module]:
        return [cast(FlexModule, v.module).current()[0] for v in model.flex_vertices()]

    current = model.current_level()
    if current is None:
        if levels is not None:
            raise DagError(
                "the flexible model runs widths set by set_widths; set_level_use(i) before "
                "recalibrating levels"
            )
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
    norms = [
        m
        for m in candidates
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
    ]
    if not norms:
        return 0
    modes = {m: m.training for m in [*model.modules(), *norms]}
    saved = [(m.momentum, m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
    model.eval()
    for m in norms:  # fresh tensors: a level's statistics may be views of another's (all set: tracked stats)
        m.running_mean = torch.zeros_like(cast(torch.Tensor, m.running_mean))
        m.running_var = torch.ones_like(cast(torch.Tensor, m.running_var))
        m.num_batches_tracked = torch.zeros_like(cast(torch.Tensor, m.num_batches_tracked))
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
        for module, mode in modes.items():
            module.training = mode
    return len(norms)
