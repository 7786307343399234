"""Low-rank layers of the vocabulary: a Linear or Conv2d of rank r as two factors, nothing between.

`LowRankLinear`:  y = up @ (down @ x) + bias, with down (r, in) and up (out, r).
`LowRankConv2d`:  a k x k conv from `in` to r channels (stride, padding and dilation of the original
conv) followed by a 1 x 1 conv from r to `out` channels with the bias.

Each is one atomic vertex (the factorization pass makes them; save/load, FLOP counting and a second,
lower-rank factorization see them as such). `merged_weight()` gives the rank-r weight they compute.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def merged_weight(self) -> torch.Tensor:
        """The (out, in) weight of the equivalent Linear."""
        return self.up @ self.down

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.rank} -> {self.out_features}, bias={self.bias is not None}"


class LowRankConv2d(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        rank: int,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.down = nn.Parameter(torch.empty(rank, in_channels, *self.kernel_size))
        self.up = nn.Parameter(torch.empty(out_channels, rank, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
        return F.conv2d(hidden, self.up, self.bias)

    def merged_weight(self) -> torch.Tensor:
        """The (out, in, kh, kw) weight of the equivalent Conv2d."""
        return torch.einsum("or,rikl->oikl", self.up[:, :, 0, 0], self.down)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels} -> {self.rank} -> {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}"
        )


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else cast(tuple[int, int], tuple(value))
