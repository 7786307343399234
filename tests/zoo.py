"""Small hand-written models, each exercising a pattern converters and passes get wrong.

Every entry is `name -> (factory, example inputs factory)`; the eager model is the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.a = conv_bn(16, 16)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.b(self.a(x))
        x = F.relu(x + y)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = conv_bn(3, 8), conv_bn(3, 12)
        self.mix = nn.Conv2d(20, 20, 1)
        self.out = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        a, b = self.mix(x).chunk(2, dim=1)
        c, d = torch.split(x, [8, 12], dim=1)
        return self.out(a * b.sigmoid()) + c[:, :4] - d.mean(1, keepdim=True)


class DepthwiseGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = conv_bn(3, 16, 1)
        self.dw = conv_bn(16, 16, 3, groups=16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.proj = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.proj(F.hardswish(self.grouped(self.dw(self.pw(x)))))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.conv = conv_bn(3, c)
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        x = self.conv(x)
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(s))))
        return x * s


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1, groups=3)
        self.shuffle = nn.ChannelShuffle(3)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.size()
        y = x.view(b, 3, c // 3, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return y + self.shuffle(x)


class Attention(nn.Module):
    """A ViT block written three ways: manual softmax attention, SDPA and nn.MultiheadAttention."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim))
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        B, N, C = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos
        qkv = self.qkv(self.norm(x)).reshape(B, N + 1, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        manual = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N + 1, C)
        fused = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N + 1, C)
        mha, _ = self.mha(x, x, x, need_weights=False)
        return x + self.gamma * self.proj(manual + fused) + mha


class SharedModule(nn.Module):
    """The same layer used twice; weights must stay shared."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 8)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.layer(self.act(self.layer(x)))


class MultiInputOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(5, 4)
        self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def forward(self, x, y, mask=None):
        h = self.a(x) * self.scale + self.b(y)
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        return {"sum": h.sum(-1), "parts": (h, [h.max(dim=-1).values, h.amax(-1)])}


class ShapeArithmetic(nn.Module):
    """Sizes read from tensors, arithmetic on them, shape-dependent control flow, einsum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        B, C, H, W = x.shape
        if H % 4 != 0:  # a branch on a shape becomes a guard
            x = F.pad(x, (0, 4 - W % 4, 0, 4 - H % 4))
            H, W = x.shape[-2:]
        windows = x.reshape(B, C, H // 4, 4, W // 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(-1, 16, C)
        gram = torch.einsum("bnc,bmc->bnm", windows, windows) / math.sqrt(C)
        grid = torch.arange(H, dtype=x.dtype, device=x.device).view(1, 1, H, 1)
        zeros = torch.zeros(B, 1, H, W, device=x.device)
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return gram.mean(), (x + grid + zeros).sum((1, 2, 3)), up[:, :, ::2, 1::2]


class InPlace(nn.Module):
    """In-place updates, including a later read of the updated tensor and item assignment."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        y += 1
        y.mul_(2)
        z = y.clone()
        z[:, 0] = 0.0
        out = torch.relu_(y)
        return out + z + y  # y was modified in place: later reads see the new values


class Spellings(nn.Module):
    """One op, many spellings (operator, torch.*, tensor method, F.*)."""

    def forward(self, x, y):
        a = x + y
        b = torch.add(x, y)
        c = x.add(y)
        d = F.relu(a) + torch.relu(b) + c.relu() + F.gelu(a) + torch.sigmoid(b) + c.sigmoid()
        e = a.view(a.shape[0], -1) + b.reshape(b.size(0), -1) + torch.reshape(c, (c.shape[0], -1))
        return d.softmax(-1) + F.softmax(d, dim=-1), e.transpose(0, 1).permute(1, 0) * 0.5


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a BatchNorm subclass calling F.batch_norm in its own forward."""

    def forward(self, x):
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.training else 0.0
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, momentum, self.eps
        )
        return F.relu(x)


class FunctionalOwnWeights(nn.Module):
    """Layers written functionally on the module's own parameters (timm's Conv2dSame, LayerNorm2d)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)
        self.bias = nn.Parameter(torch.zeros(8))
        self.ln = nn.LayerNorm(8)
        self.bn = BatchNormAct(8)
        self.std_weight = nn.Parameter(torch.randn(8, 8, 1, 1))
        self.scaled_weight = nn.Parameter(torch.randn(6, 8, 3, 3))
        self.gain = nn.Parameter(torch.rand(6, 1, 1, 1) + 0.5)
        self.scaled_bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, 1, 0, 1, 1)
        x = self.bn(x)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (8,), self.ln.weight, self.ln.bias, 1e-6).permute(0, 3, 1, 2)
        w = F.batch_norm(
            self.std_weight.reshape(1, 8, -1), None, None, training=True, momentum=0.0, eps=1e-5
        ).reshape_as(self.std_weight)  # weight standardization (BiT's StdConv2d)
        x = F.relu(F.conv2d(x, w))
        w = F.batch_norm(
            self.scaled_weight.reshape(1, 6, -1),
            None,
            None,
            weight=(self.gain * 72**-0.5).view(-1),
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.scaled_weight)  # NFNet's
        return F.conv2d(x, w, self.scaled_bias, 1, 1)


class Dropouts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = self.drop(self.fc(x))
        return F.dropout(x, 0.2, self.training) + F.dropout1d(x.unsqueeze(0), 0.1, self.training).squeeze(0)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        out, (h, _c) = self.lstm(x)
        return self.head(out[:, -1]) + h[-1].sum(-1, keepdim=True)


ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]] = {
    "residual": (Residual, lambda: (torch.randn(2, 3, 16, 16),)),
    "concat_split": (ConcatSplit, lambda: (torch.randn(2, 3, 12, 12),)),
    "depthwise_grouped": (DepthwiseGrouped, lambda: (torch.randn(2, 3, 12, 12),)),
    "squeeze_excite": (SqueezeExcite, lambda: (torch.randn(2, 3, 12, 12),)),
    "channel_shuffle": (ChannelShuffle, lambda: (torch.randn(2, 3, 8, 8),)),
    "attention": (Attention, lambda: (torch.randn(2, 3, 32, 32),)),
    "shared_module": (SharedModule, lambda: (torch.randn(3, 8),)),
    "multi_input_outputs": (MultiInputOutputs, lambda: (torch.randn(3, 6), torch.randn(3, 5))),
    "shape_arithmetic": (ShapeArithmetic, lambda: (torch.randn(2, 3, 10, 10),)),
    "in_place": (InPlace, lambda: (torch.randn(4, 8),)),
    "spellings": (Spellings, lambda: (torch.randn(3, 4), torch.randn(3, 4))),
    "functional_own_weights": (FunctionalOwnWeights, lambda: (torch.randn(2, 3, 8, 8),)),
    "dropouts": (Dropouts, lambda: (torch.randn(4, 16),)),
    "recurrent": (Recurrent, lambda: (torch.randn(2, 5, 8),)),
}


def convert(name: str):
    """A zoo model, its inputs and its DagModule."""
    import torch_dag as td

    model, inputs = make(name)
    return model, inputs, td.build_from_unstructured_module(model, inputs)


def make(name: str) -> tuple[nn.Module, tuple]:
    """A fresh model of the zoo (seeded, eval mode, BN statistics made non-trivial) and its inputs."""
    torch.manual_seed(0)
    factory, inputs = ZOO[name]
    model = factory()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval(), inputs()
