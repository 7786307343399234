"""Compensation after pruning: make up, from calibration batches, for the input channels each layer
lost (their mean contribution folded into the bias, or the kept weights re-solved by least squares).

Compensation never judges itself on the data it was fitted to: the batches are split as
`prepare.split_calibration` does; each layer is fitted on the fitting rows and, of its plain sliced
weights, the mean correction and the re-solved weights, keeps the one with the least error on the
held-out rows (the sliced weights without held-out rows). A layer with fewer fitting rows than
`MIN_ROWS_PER_INPUT` x its inputs is not re-solved (the mean correction at most), with one warning
that says how many batches would be enough."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.activations import conv_geometry, input_rows
from ..core.dag import DagModule, evaluating
from ..core.errors import DagError
from ..core.options import check_option
from ..core.progress import show_progress
from ..passes.factorize_solve import MIN_ROWS_PER_INPUT, Moment, shrinkage
from ..passes.prepare import HOLD_OUT_EVERY, CalibrationSplit, Part, as_inputs, split_calibration
from . import surgery
from .channels import ChannelGroups


def compensate(
    dag: DagModule,
    pruned: DagModule,
    groups: ChannelGroups,
    keep: Callable[[np.ndarray], np.ndarray],
    calibration: Iterable,
    how: Literal["lstsq", "mean"] = "lstsq",
    progress: bool = False,
) -> None:
    """Make up, in place on `pruned`, for the input channels each layer lost, from what they carried on
    the calibration batches (run through the unpruned `dag`).

    `mean`: fold the removed channels' mean contribution into the layer's bias. A removed channel
    rarely carries zero on average (after a ReLU it never does), so dropping it shifts every output of
    the layers that read it; restoring the mean keeps the statistics the following norms and
    activations were trained on. Exact for a constant channel (one whose weights upstream were zero).
    `lstsq`: also re-solve the layer's kept weights so that its outputs, from the kept inputs alone,
    are the least-squares best fit of the unpruned outputs (ridge towards the weights, stronger with
    fewer rows, see `shrinkage`; a conv's k x k patches are its inputs; two float64 matrices of
    (inputs + 1)^2 per layer while recording). Convs with groups, and layers with over `MAX_LSTSQ`
    inputs, get `mean`. Every layer keeps what has the least held-out error (module docstring)."""
    check_option("how", how, ("lstsq", "mean"), what="compensation")
    readers = _readers(dag, groups, keep, how)
    if not readers:
        return
    batches = tuple(as_inputs(b) for b in calibration)
    if not batches:
        raise DagError("compensation needs at least one calibration batch (the calibration given is empty)")
    split = split_calibration(batches)
    part: list[Part] = ["fit"]
    hooks = [r.module.register_forward_hook(r.recorder(part)) for r in readers.values()]
    try:
        with evaluating(dag), torch.no_grad():
            for part[0], batch in show_progress(
                split.parts(), desc="prune: compensation", unit="batch", disable=not progress
            ):
                dag(*batch)
    finally:
        for handle in hooks:
            handle.remove()
    for name, reader in readers.items():
        role = groups.roles[name]
        out = torch.from_numpy(keep(role.out_ids)) if role.out_ids is not None else slice(None)
        reader.apply(pruned[name].module, out)  # a new module: surgery sliced its inputs
    _warn_short(readers, split)


def _readers(
    dag: DagModule, groups: ChannelGroups, keep: Callable[[np.ndarray], np.ndarray], how: str
) -> dict[str, _Reader]:
    """The layers that lose input channels, each with what it will record."""
    readers = {}
    for name, role in groups.roles.items():
        module = dag[name].module
        if (
            role.axis is not None
            or role.in_ids is None
            or surgery.kind(module) not in ("Conv", "Grouped", "Linear")
        ):
            continue  # a depthwise conv's removed inputs only feed removed outputs
        dropped = ~keep(role.in_ids)
        if dropped.any():
            solve = how == "lstsq" and (
                isinstance(module, nn.Linear)
                or (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros")
            )
            readers[name] = _Reader(name, cast(_Layer, module), torch.from_numpy(dropped), solve)
    return readers


_Layer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d  # what a Conv, Grouped or Linear row of SLICES holds
MAX_LSTSQ = 4096  # inputs (channels x kernel positions) up to which a layer's weights are re-solved
RIDGE = 1e-2  # lstsq's least pull towards the layer's own weights, relative to its inputs' mean energy


class _Reader:
    """A layer that lost input channels, and what it saw on the calibration batches: the moments of its
    input rows (`lstsq`) or the sums of the removed channels' contributions (`mean`), for the fitting
    and the held-out rows apart."""

    def __init__(self, name: str, module: _Layer, dropped: torch.Tensor, solve: bool):
        self.name, self.module, self.dropped = name, module, dropped
        self.geometry = conv_geometry(module)
        self.width = module.weight[0].numel() + 1  # the inputs of one output, and a constant
        self.solve = solve and self.width <= MAX_LSTSQ
        self.moment = Moment(self.width) if self.solve else None
        self.sums = [torch.zeros(len(module.weight), dtype=torch.float64) for _ in range(2)]
        self.counts = [0, 0]  # fitting rows, held-out rows

    @property
    def short(self) -> bool:
        """Too few fitting rows to re-solve the weights: the mean correction at most."""
        return self.moment is not None and self.moment.fit_rows < MIN_ROWS_PER_INPUT * self.width

    def recorder(self, part: list[Part]) -> Callable:
        def record(hooked: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.record(args[0], part[0])

        return record

    def record(self, x: torch.Tensor, part: Part) -> None:
        if self.moment is not None:
            rows = input_rows(x, self.geometry).double()
            self.moment.add(torch.cat([rows, rows.new_ones(len(rows), 1)], 1), part)
            return
        module, mask = self.module, self.dropped.to(x.device, x.dtype)
        if isinstance(module, nn.Linear):
            rows = F.linear(x * mask, module.weight).reshape(-1, module.out_features)
        else:
            rows = module._conv_forward(x * mask.view((-1,) + (1,) * (x.dim() - 2)), module.weight, None)
            rows = rows.transpose(0, 1).reshape(rows.shape[1], -1).T
        rows = rows.double()
        cut = len(rows) - max(1, len(rows) // HOLD_OUT_EVERY) if part == "split" and len(rows) > 1 else None
        for index, chunk in ((0, rows[:cut]), (1, rows[cut:])) if cut else ((int(part == "held"), rows),):
            self.sums[index] += chunk.sum(0)
            self.counts[index] += len(chunk)

    def apply(self, sliced: nn.Module, out: torch.Tensor | slice) -> None:
        """Set `sliced` (the sliced copy of the layer) to the compensated weights of its kept outputs."""
        new = cast(_Layer, sliced)  # a copy of `self.module`
        weight = new.weight
        if self.moment is not None:
            solved = self._best_solution(out)
            new.weight = nn.Parameter(
                solved[:, :-1].reshape(weight.shape).to(weight), requires_grad=weight.requires_grad
            )
            bias = solved[:, -1]
        else:
            bias = (
                new.bias.detach().double() if new.bias is not None else weight.new_zeros(len(weight)).double()
            )
            fit, held = (self.sums[i][out] / max(self.counts[i], 1) for i in range(2))
            if self.counts[1] and float((fit * fit - 2 * fit * held).sum()) <= 0:
                bias = bias + fit  # the mean shift lowers the held-out error
        new.bias = nn.Parameter(bias.to(weight), requires_grad=weight.requires_grad)

    def _best_solution(self, out: torch.Tensor | slice) -> torch.Tensor:
        """Of the sliced weights, the mean correction and (enough fitting rows) the re-solved weights,
        as (kept outputs, kept inputs + 1) matrices, the one with the least held-out error."""
        moment = cast(Moment, self.moment)
        full = self.module.weight.detach().double().reshape(len(self.module.weight), -1)
        bias = self.module.bias
        bias = bias.detach().double() if bias is not None else full.new_zeros(len(full))
        full = torch.cat([full, bias[:, None]], 1)[out]
        positions = self.module.weight[0, 0].numel()
        kept = torch.cat([(~self.dropped).repeat_interleave(positions), torch.tensor([True])])
        fit = moment.fit()
        sliced = full * kept
        shifted = sliced.clone()
        shifted[:, -1] += full[:, ~kept] @ fit[~kept, -1]  # fit[:, -1]: the mean of each input
        candidates = [sliced, shifted]
        if not self.short:
            candidates.append(self._solved(full, fit, kept, moment.fit_rows))
        if moment.counts[-1] == 0:
            return sliced[:, kept]  # nothing held out to judge by: the data-free choice
        held = moment.held()
        errors = [float((((c - full) @ held) * (c - full)).sum()) for c in candidates]
        return candidates[int(np.argmin(errors))][:, kept]

    def _solved(self, full: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, rows: int) -> torch.Tensor:
        """The kept weights that best fit `full`'s outputs on the fitting rows, with a ridge towards
        the layer's own weights (not towards zero; the constant left free: a strong ridge gives back
        the mean correction) of `RIDGE` plus the shrinkage of `rows` rows, relative to the energy."""
        inner = gram[kept][:, kept]
        energy = float(inner.diagonal()[:-1].mean()) or 1.0  # (inputs that are all zero: any scale)
        alpha = shrinkage(rows, self.width)
        ridge = (RIDGE + alpha / (1 - alpha)) * energy * torch.ones(len(inner), dtype=inner.dtype)
        ridge[-1] = 0
        solved = torch.linalg.solve(inner + ridge.diag(), (full @ gram[:, kept] + full[:, kept] * ridge).T).T
        result = torch.zeros_like(full)
        result[:, kept] = solved
        return result


def _warn_short(readers: dict[str, _Reader], split: CalibrationSplit) -> None:
    """One warning naming the layers not re-solved for want of fitting rows, and what would do."""
    short = [r for r in readers.values() if r.short]
    if not short:
        return
    needed = MIN_ROWS_PER_INPUT
    needs = sorted(
        ((split.batches_for(needed * r.width, cast(Moment, r.moment).rows), r) for r in short),
        key=lambda pair: -pair[0],
    )
    named = ", ".join(
        f"{r.name} ({cast(Moment, r.moment).fit_rows} fitting rows of {needed * r.width})"
        for _, r in needs[:5]
    )
    warnings.warn(
        f"prune: {len(short)} of {len(readers)} compensated layers have fewer fitting calibration rows "
        f"than {needed} x their inputs and are not re-solved by least squares (the data-free choice: "
        f"the sliced weights or their mean correction): {named}{', ...' if len(short) > 5 else ''}; "
        f"{needs[0][0]} calibration batches like these would be enough for all (every "
        f"{HOLD_OUT_EVERY}th is held out)",
        stacklevel=3,
    )
