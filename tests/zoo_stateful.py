"""Small modules whose forward does more than compute its outputs: buffers and parameters updated in
forward, grad-mode regions, inputs mutated in place; and harmless look-alikes that must still convert.

Every entry is `name -> (expected outcome, factory, example inputs factory)`; the outcome is "equal" (the
DAG matches eager: outputs, gradients, buffers after several calls, train and eval) or "refused" (a
`ConversionError`). The eager model is the oracle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("buf", torch.zeros(4))
        self.register_buffer("count", torch.zeros(()))


# --- state updated in forward: refused ------------------------------------------------------------


class CountInPlace(_Base):
    def forward(self, x):
        self.count += 1
        return self.lin(x) * self.count


class CountAssigned(_Base):
    def forward(self, x):
        self.count = self.count + 1
        return self.lin(x) + self.count


class EmaMulAdd(_Base):
    def forward(self, x):
        self.buf.mul_(0.9).add_(x.mean(0).detach(), alpha=0.1)
        return self.lin(x - self.buf)


class EmaUnderNoGrad(_Base):
    def forward(self, x):
        with torch.no_grad():
            self.buf.mul_(0.9).add_(0.1 * x.mean(0))
        return self.lin(x) + self.buf


class RunningCopy(_Base):
    def forward(self, x):
        self.buf.copy_(x.mean(0))
        return self.lin(x)


class BufferSetItem(_Base):
    def forward(self, x):
        self.buf[0] = x.sum()
        return self.lin(x) + self.buf


class BufferViewInPlace(_Base):
    def forward(self, x):
        self.buf[:2].add_(1.0)
        return self.lin(x) + self.buf


class ParameterUnderNoGrad(_Base):
    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.mul_(0.99)
        return self.lin(x)


class ParameterDataInPlace(_Base):
    def forward(self, x):
        self.lin.weight.data.clamp_(-0.1, 0.1)
        return self.lin(x)


class TrainOnlyCount(_Base):
    def forward(self, x):
        if self.training:
            self.count += 1
        return self.lin(x)


class TrainOnlyEma(_Base):
    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.buf.lerp_(x.mean(0), 0.1)
        return self.lin(x) - self.buf


class FillBuffer(_Base):
    def forward(self, x):
        self.buf.fill_(2.0)
        return self.lin(x) * self.buf


class ZeroBufferEveryCall(_Base):
    def forward(self, x):
        y = self.lin(x) + self.buf
        self.buf.zero_()
        return y


class LastInputStored(_Base):
    def forward(self, x):
        y = self.lin(x) + self.buf
        self.buf = x.mean(0)
        return y


class PlainTensorAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.state = torch.zeros(4)

    def forward(self, x):
        self.state.add_(1.0)
        return self.lin(x) + self.state


class ActNormInit(nn.Module):
    """Data-dependent initialisation on the first call (Glow's ActNorm)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x):
        if not self.initialized:
            with torch.no_grad():
                self.scale.copy_(1 / (x.std(0) + 1e-6))
                self.initialized.fill_(True)
        return x * self.scale


class IndexCopyBuffer(_Base):
    def forward(self, x):
        self.buf.index_copy_(0, torch.tensor([1]), x[:1, 1])
        return self.lin(x) + self.buf


class OutArgumentIntoBuffer(_Base):
    def forward(self, x):
        torch.add(x.mean(0), 1.0, out=self.buf)
        return self.lin(x) + self.buf


# --- inputs mutated in place: refused -------------------------------------------------------------


class InputIAdd(nn.Module):
    def forward(self, x, y):
        x += y
        return x * 2


class InputMaskedFill(nn.Module):
    def forward(self, x):
        x.masked_fill_(x < 0, 0.0)
        return x + 1


class InputSetItem(nn.Module):
    def forward(self, x):
        x[:, 0] = 0.0
        return x * 3


class InputViewInPlace(nn.Module):
    def forward(self, x):
        x.view(-1).mul_(2)
        return x + 1


class InplaceReluOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.act(x))


class InputAliasedByContiguous(nn.Module):
    def forward(self, x):
        y = x.contiguous()
        y.mul_(2)
        return y


# --- grad-mode regions: kept (detached where they end) ---------------------------------------------


class NoGradBranch(_Base):
    def forward(self, x):
        with torch.no_grad():
            t = self.lin(x)
        return t * self.lin(x)


class NoGradDecorated(_Base):
    @torch.no_grad()
    def target(self, x):
        return self.lin(x).softmax(-1)

    def forward(self, x):
        return self.lin(x) * self.target(x)


class SetGradEnabledFalse(_Base):
    def forward(self, x):
        with torch.set_grad_enabled(False):
            t = self.lin(x).tanh()
        return self.lin(x) + t


class EnableGradInsideNoGrad(_Base):
    def forward(self, x):
        with torch.no_grad():
            a = self.lin(x)
            with torch.enable_grad():
                b = self.lin(x)
            c = a + b
        return c + b


class InferenceModeBlock(_Base):
    def forward(self, x):
        with torch.inference_mode():
            t = self.lin(x).sigmoid()
        return self.lin(x) * t.clone()


class InPlaceUnderNoGradOnGradValue(_Base):
    def forward(self, x):
        y = self.lin(x)
        with torch.no_grad():
            y.mul_(2)
        return y.sum(-1)


class TrainOnlyNoGrad(_Base):
    def forward(self, x):
        if self.training:
            with torch.no_grad():
                return self.lin(x) * 2
        return self.lin(x) * 2


# --- harmless look-alikes: must convert and match -------------------------------------------------


class ReadsBuffer(_Base):
    def forward(self, x):
        return self.lin(x) * (self.buf + 1) + self.count


class InPlaceOnFresh(_Base):
    def forward(self, x):
        y = self.lin(x)
        y.mul_(2).add_(1)
        y += x
        y[:, 0] = 0.0
        return F.relu(y, inplace=True)


class BatchNormTrain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x)).relu()


class ConvBnReluInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x))).mean((2, 3))


class CloneThenInPlace(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.masked_fill_(y < 0, 0.0)
        y += 1
        return y


class ConstantCache(nn.Module):
    """Caches a table made from sizes alone (as timm's ConViT does): recomputed by the DAG each call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("table", torch.zeros(1), persistent=False)

    def forward(self, x):
        n = x.shape[1]
        self.table = torch.arange(n, dtype=x.dtype)
        return self.lin(x) + self.table


class DetachedTarget(_Base):
    def forward(self, x):
        return self.lin(x) * self.lin(x).detach()


class AliasIntermediateInPlace(_Base):
    def forward(self, x):
        y = self.lin(x)
        z = y
        z += 1
        return y * 2


ZOO_STATEFUL: dict[str, tuple[str, Callable[[], nn.Module], Callable[[], tuple]]] = {
    "count_in_place": ("refused", CountInPlace, lambda: (torch.randn(3, 4),)),
    "count_assigned": ("refused", CountAssigned, lambda: (torch.randn(3, 4),)),
    "ema_mul_add": ("refused", EmaMulAdd, lambda: (torch.randn(3, 4),)),
    "ema_under_no_grad": ("refused", EmaUnderNoGrad, lambda: (torch.randn(3, 4),)),
    "running_copy": ("refused", RunningCopy, lambda: (torch.randn(3, 4),)),
    "buffer_setitem": ("refused", BufferSetItem, lambda: (torch.randn(3, 4),)),
    "buffer_view_in_place": ("refused", BufferViewInPlace, lambda: (torch.randn(3, 4),)),
    "parameter_under_no_grad": ("refused", ParameterUnderNoGrad, lambda: (torch.randn(3, 4),)),
    "parameter_data_in_place": ("refused", ParameterDataInPlace, lambda: (torch.randn(3, 4),)),
    "train_only_count": ("refused", TrainOnlyCount, lambda: (torch.randn(3, 4),)),
    "train_only_ema": ("refused", TrainOnlyEma, lambda: (torch.randn(3, 4),)),
    "fill_buffer": ("refused", FillBuffer, lambda: (torch.randn(3, 4),)),
    "zero_buffer_every_call": ("refused", ZeroBufferEveryCall, lambda: (torch.randn(3, 4),)),
    "last_input_stored": ("refused", LastInputStored, lambda: (torch.randn(3, 4),)),
    "plain_tensor_attribute": ("refused", PlainTensorAttribute, lambda: (torch.randn(3, 4),)),
    "actnorm_init": ("refused", ActNormInit, lambda: (torch.randn(3, 4),)),
    "index_copy_buffer": ("refused", IndexCopyBuffer, lambda: (torch.randn(3, 4),)),
    "out_argument_into_buffer": ("refused", OutArgumentIntoBuffer, lambda: (torch.randn(3, 4),)),
    "input_iadd": ("refused", InputIAdd, lambda: (torch.randn(3, 4), torch.randn(3, 4))),
    "input_masked_fill": ("refused", InputMaskedFill, lambda: (torch.randn(3, 4),)),
    "input_setitem": ("refused", InputSetItem, lambda: (torch.randn(3, 4),)),
    "input_view_in_place": ("refused", InputViewInPlace, lambda: (torch.randn(3, 4),)),
    "inplace_relu_on_input": ("refused", InplaceReluOnInput, lambda: (torch.randn(3, 4),)),
    "input_aliased_by_contiguous": ("refused", InputAliasedByContiguous, lambda: (torch.randn(3, 4),)),
    "in_place_under_no_grad": ("refused", InPlaceUnderNoGradOnGradValue, lambda: (torch.randn(3, 4),)),
    "no_grad_branch": ("equal", NoGradBranch, lambda: (torch.randn(3, 4),)),
    "no_grad_decorated": ("equal", NoGradDecorated, lambda: (torch.randn(3, 4),)),
    "set_grad_enabled_false": ("equal", SetGradEnabledFalse, lambda: (torch.randn(3, 4),)),
    "enable_grad_inside_no_grad": ("equal", EnableGradInsideNoGrad, lambda: (torch.randn(3, 4),)),
    "inference_mode_block": ("equal", InferenceModeBlock, lambda: (torch.randn(3, 4),)),
    "train_only_no_grad": ("refused", TrainOnlyNoGrad, lambda: (torch.randn(3, 4),)),
    "reads_buffer": ("equal", ReadsBuffer, lambda: (torch.randn(3, 4),)),
    "in_place_on_fresh": ("equal", InPlaceOnFresh, lambda: (torch.randn(3, 4),)),
    "batchnorm_train": ("equal", BatchNormTrain, lambda: (torch.randn(5, 4),)),
    "conv_bn_relu_inplace": ("equal", ConvBnReluInplace, lambda: (torch.randn(2, 3, 6, 6),)),
    "clone_then_in_place": ("equal", CloneThenInPlace, lambda: (torch.randn(3, 4),)),
    "constant_cache": ("equal", ConstantCache, lambda: (torch.randn(3, 4),)),
    "detached_target": ("equal", DetachedTarget, lambda: (torch.randn(3, 4),)),
    "alias_intermediate_in_place": ("equal", AliasIntermediateInPlace, lambda: (torch.randn(3, 4),)),
}
