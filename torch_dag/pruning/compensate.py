"""Compensation after pruning: make up, from calibration batches, for the input channels each layer
lost (their mean contribution folded into the bias, or the kept weights re-solved by least squares)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..analysis.activations import conv_geometry, row_gram
from ..core.dag import DagModule, evaluating
from ..core.errors import DagError
from ..core.options import check_option
from ..passes.prepare import as_inputs
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
    are the least-squares best fit of the unpruned outputs (ridge-regularized; a conv's k x k patches
    are its inputs; one float64 matrix of (inputs + 1)^2 per layer while recording). Convs with groups,
    and layers with over `MAX_LSTSQ` inputs, get `mean`."""
    check_option("how", how, ("lstsq", "mean"), what="compensation")
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
            readers[name] = _Reader(cast(_Layer, module), torch.from_numpy(dropped), solve)
    if not readers:
        return
    hooks = [r.module.register_forward_hook(r.record) for r in readers.values()]
    try:
        with evaluating(dag), torch.no_grad():
            for batch in tqdm(calibration, desc="prune: compensation", unit="batch", disable=not progress):
                dag(*as_inputs(batch))
    finally:
        for handle in hooks:
            handle.remove()
    if any(r.batches == 0 for r in readers.values()):
        raise DagError("compensation needs at least one calibration batch (the calibration given is empty)")
    for name, reader in readers.items():
        role = groups.roles[name]
        out = torch.from_numpy(keep(role.out_ids)) if role.out_ids is not None else slice(None)
        reader.apply(pruned[name].module, out)  # a new module: surgery sliced its inputs


_Layer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d  # what a Conv, Grouped or Linear row of SLICES holds
MAX_LSTSQ = 4096  # inputs (channels x kernel positions) up to which a layer's weights are re-solved
RIDGE = 1e-2  # lstsq's pull towards the layer's own weights, relative to its inputs' mean energy


class _Reader:
    """A layer that lost input channels, and what it saw of them on the calibration batches."""

    def __init__(self, module: _Layer, dropped: torch.Tensor, solve: bool):
        self.module, self.dropped = module, dropped
        self.geometry = conv_geometry(module)
        self.width = module.weight[0].numel() + 1  # the inputs of one output, and a constant
        self.solve = solve and self.width <= MAX_LSTSQ
        self.mean: torch.Tensor | float = 0.0  # summed over batches
        self.gram: torch.Tensor | float = 0.0
        self.batches = 0

    def record(self, hooked: nn.Module, args: tuple, output: torch.Tensor) -> None:
        module, x = cast(_Layer, hooked), args[0]  # the hook is on `self.module`
        self.batches += 1
        if self.solve:
            self.gram = self.gram + row_gram(x, self.geometry)
            return
        mask = self.dropped.to(x.device, x.dtype)
        if isinstance(module, nn.Linear):
            part = F.linear(x * mask, module.weight).reshape(-1, module.out_features)
        else:
            part = module._conv_forward(x * mask.view((-1,) + (1,) * (x.dim() - 2)), module.weight, None)
            part = part.transpose(0, 1).reshape(part.shape[1], -1).T
        self.mean = self.mean + part.double().mean(0)

    def apply(self, sliced: nn.Module, out: torch.Tensor | slice) -> None:
        """Set `sliced` (the sliced copy of the layer) to the compensated weights of its kept outputs."""
        new = cast(_Layer, sliced)  # a copy of `self.module`
        weight = new.weight
        if self.solve:
            full = self.module.weight.detach().double().reshape(len(self.module.weight), -1)
            bias = (
                self.module.bias.detach().double()
                if self.module.bias is not None
                else full.new_zeros(len(full))
            )
            full = torch.cat([full, bias[:, None]], 1)[out]
            positions = self.module.weight[0, 0].numel()
            kept = torch.cat([(~self.dropped).repeat_interleave(positions), torch.tensor([True])])
            gram = cast(torch.Tensor, self.gram) / self.batches  # a sum: compensate saw every reader run
            inner = gram[kept][:, kept]
            # ridge towards the layer's own weights (not towards zero), the constant left free: a strong
            # ridge gives back `mean`
            ridge = RIDGE * inner.diagonal()[:-1].mean() * torch.ones(len(inner), dtype=inner.dtype)
            ridge[-1] = 0
            solved = torch.linalg.solve(
                inner + ridge.diag(), (full @ gram[:, kept] + full[:, kept] * ridge).T
            ).T
            new.weight = nn.Parameter(
                solved[:, :-1].reshape(weight.shape).to(weight), requires_grad=weight.requires_grad
            )
            bias = solved[:, -1]
        else:
            shift = (cast(torch.Tensor, self.mean) / self.batches)[out]  # a sum, as `gram` above
            bias = shift if new.bias is None else new.bias.detach().double() + shift
        new.bias = nn.Parameter(bias.to(weight), requires_grad=weight.requires_grad)
