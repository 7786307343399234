"""`WSConv2d`: a convolution whose weight is standardized per output filter before use.

NFNets (timm's `ScaledStdConv2d`) and BiT (`StdConv2d`) write weight standardization functionally:
`F.batch_norm` over the weight reshaped to (1, out, -1), scaled by a gain, then `F.conv2d`. The
converter raises that pattern to this one op (`raise_weight_standardization`), so that pruning sees a
conv with input and output channels instead of a chain of functions on a parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WSConv2d(nn.Conv2d):
    """`F.conv2d(x, standardize(weight) * gain * scale, bias, ...)`: each output filter of the weight
    has zero mean and unit variance over its inputs (biased variance, `eps` added), computed exactly
    as `F.batch_norm` on the weight does it. `gain` is a parameter of shape (out, 1, 1, 1), or None."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        gain: bool = True,
        scale: float = 1.0,
        eps: float = 1e-5,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1)) if gain else None
        self.scale, self.eps = scale, eps

    def standardized_weight(self) -> torch.Tensor:
        affine = None if self.gain is None else (self.gain * self.scale).reshape(-1)
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, affine, None, True, 0.0, self.eps
        )
        return weight.reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gain={self.gain is not None}, scale={self.scale:.6g}, eps={self.eps}"
