"""Activation statistics of Linear / Conv2d layers: the rows a layer multiplies by its weight matrix
and their Gram matrices, which factorization, pruning's compensation and flexible models' shared
least-squares refits all accumulate over calibration batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.lowrank import LowRankConv2d

# (kernel, stride, padding, dilation) of a conv: how it cuts its input into patches
Geometry = tuple[tuple[int, ...], tuple[int, ...], str | tuple[int, ...], tuple[int, ...]]


def conv_geometry(module: nn.Module) -> Geometry | None:
    """How a conv (plain or low-rank) cuts its input into patches; None for a layer that reads rows."""
    if isinstance(module, (nn.Conv2d, LowRankConv2d)):
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return tuple(module.kernel_size), tuple(module.stride), padding, tuple(module.dilation)
    return None


def row_gram(x: torch.Tensor, geometry: Geometry | None, constant: bool = True) -> torch.Tensor:
    """The float64 Gram matrix of a layer's input rows (`input_rows`), per row, with a column of ones
    appended when `constant` (for a bias): what least-squares refits of the layer accumulate."""
    rows = input_rows(x, geometry).double()
    if constant:
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
    return rows.T @ rows / len(rows)


def input_rows(x: torch.Tensor, geometry: Geometry | None) -> torch.Tensor:
    """The rows a layer multiplies by its weight matrix: features of a linear, patches of a conv."""
    if geometry is None:
        return x.reshape(-1, x.shape[-1])
    kernel, stride, padding, dilation = geometry
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if isinstance(padding, str):
        if padding == "same":
            pads = []
            for k, dil in zip(reversed(kernel), reversed(dilation)):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        padding = (0, 0)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, d, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])
