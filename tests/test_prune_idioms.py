"""Pruning through idioms written outside timm: reductions over tuples of axes (hand-written global
pooling), einsum read from its subscripts, grouped channel shuffles written as view / transpose /
reshape. Each prunes to a FLOPs target with `td.prune` and loses nothing when the channels it removes
contribute nothing (the oracle: the same model with those channels silenced, run eagerly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torch_dag as td
from torch_dag.core.compare import bitwise_equal, compare_outputs
from torch_dag.pruning import PruneConfig, channel_groups, surgery
from torch_dag.pruning.prune import weight_members

POOLS = {  # global pooling as people write it by hand, each with a keepdim squeeze-excite gate
    "mean_tuple": lambda x: x.mean((2, 3)),
    "sum_keyword_keepdim": lambda x: x.sum(dim=[2, 3], keepdim=True).flatten(1) / (x.shape[2] * x.shape[3]),
    "amax_negative": lambda x: x.amax((-1, -2)),
    "torch_mean": lambda x: torch.mean(x, (2, 3)),
    "torch_mean_keyword": lambda x: torch.mean(x, dim=(2, 3)),
    "flatten_mean": lambda x: x.flatten(2).mean(-1),
    "var_keyword": lambda x: x.var(dim=(2, 3), keepdim=True)[:, :, 0, 0],
}


class ResidualCNN(nn.Module):
    """A plain residual CNN with a squeeze-excite gate and a head behind hand-written global pooling."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(16, 24, 3, padding=1),
                nn.BatchNorm2d(24),
                nn.ReLU(),
                nn.Conv2d(24, 16, 3, padding=1),
            )
            for _ in range(2)
        )
        self.gate = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        x = x * torch.sigmoid(self.gate(x.mean(dim=(2, 3), keepdim=True)))
        return self.fc(self.pool(x))


class EinsumNet(nn.Module):
    """einsum where people write it: a 1x1 conv against a weight, a per-channel scale, attention over
    heads (`bhqd,bhkd->bhqk`, `bhqk,bhkd->bhqd`) and a linear head against a weight."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(dim, 16) * 0.25)  # contracted with the stem's channels
        self.embed = nn.Conv2d(dim, dim, 4, stride=4)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)  # kept in the output: sliced with the channels
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.head = nn.Parameter(torch.randn(5, dim) * 0.2)  # a Linear-like use

    def forward(self, x):
        y = torch.relu(torch.einsum("bchw,oc->bohw", torch.relu(self.stem(x)), self.mix))
        t = torch.einsum("bcn,c->bnc", self.embed(y).flatten(2), self.scale)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        weights = (torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.35).softmax(-1)
        out = torch.einsum("bhqk,bhkd->bhqd", weights, v).transpose(1, 2).reshape(b, n, c)
        t = t + self.proj(out)
        return torch.einsum("...c,kc->...k", t, self.head).mean(1)


def channel_shuffle(x, groups):
    """torchvision's channel_shuffle, as written there."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleNetLike(nn.Module):
    """A grouped 1x1 conv, a channel shuffle as torchvision writes it, a depthwise conv, a plain 1x1 conv
    and a second shuffle written with flatten."""

    def __init__(self, groups=4):
        super().__init__()
        self.groups = groups
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.grouped = nn.Conv2d(32, 32, 1, groups=groups)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = channel_shuffle(torch.relu(self.grouped(x)), self.groups)
        y = torch.relu(self.pw(self.dw(y)))
        b, c, h, w = y.shape
        y = y.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).flatten(1, 2)
        return self.fc(y.mean((2, 3)))


@torch.no_grad()
def _silence(dag: td.DagModule, inputs: tuple, share: float, attention: str = "heads") -> td.DagModule:
    """Zero `share` of the channels of every prunable group in every tensor that holds weights for them
    (producers, norms, readers, tied parameters): they contribute nothing and score zero, so a prune to
    a target that removing them reaches removes only them. Returns the DAG with all of them removed."""
    groups = channel_groups(dag, inputs, attention=attention)
    rng = np.random.default_rng(0)
    prunable = [g for g in groups.groups() if g.prunable]
    assert prunable, groups.summary()
    roots = [r for g in prunable for r in rng.choice(g.channels, int(len(g.channels) * share), replace=False)]
    for tensor, axis, member_roots in weight_members(dag, groups):
        positions = torch.from_numpy(np.flatnonzero(np.isin(member_roots, roots)))
        tensor.index_fill_(axis, positions, 0.0)
    assert roots, groups.summary()
    return surgery.apply(dag, groups, lambda ids: ~np.isin(groups.root(ids), roots))


def _prune_zero_loss(
    model: nn.Module, inputs: tuple, tmp_path, attention: str = "heads"
) -> tuple[td.DagModule, td.DagModule]:
    """Convert, silence channels, prune to half the FLOPs (measured); the pruned DAG, and the DAG with
    every silenced channel removed, match the silenced one; widths dropped; the pruned DAG saves and
    loads to the same outputs. Returns both."""
    dag = td.build_from_unstructured_module(model.eval(), inputs)
    emptied = _silence(dag, inputs, 2 / 3, attention)
    config = PruneConfig(round_to=1, attention=attention)  # type: ignore[arg-type]
    pruned, report = td.prune(dag, 0.5, inputs, config=config, return_report=True)
    ratio = td.count_flops(pruned, *inputs).total_flops / td.count_flops(dag, *inputs).total_flops
    assert abs(ratio - 0.5) <= 0.02 and ratio == pytest.approx(report.reached), (ratio, report)
    with torch.no_grad():
        reference = dag(*inputs)
        for smaller in (pruned, emptied):
            equal, _, reason = compare_outputs(reference, smaller(*inputs), rtol=1e-4)
            assert equal, reason
        loaded = td.load(td.save(pruned, tmp_path / "pruned.dag"))
        assert bitwise_equal(pruned(*inputs), loaded(*inputs))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dag.parameters())
    return pruned, emptied


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_hand_written_global_pooling_prunes_without_loss(pool, tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 12, 12),)
    pruned, emptied = _prune_zero_loss(ResidualCNN(POOLS[pool]), inputs, tmp_path)
    assert (
        emptied["fc"].module.in_features < 16 and pruned["fc"].module.in_features < 16
    )  # the residual stream through the pooling narrowed


@pytest.mark.parametrize("attention", ["heads", "head_dim"])
def test_einsum_prunes_without_loss(attention, tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 16, 16),)
    dag = td.build_from_unstructured_module(EinsumNet().eval(), inputs)
    groups = channel_groups(dag, inputs, attention=attention)
    fixed = [g for g in groups.groups() if not g.prunable]
    assert all(g.reasons == ["a DAG output keeps its shape"] for g in fixed), groups.summary()
    _, emptied = _prune_zero_loss(EinsumNet(), inputs, tmp_path, attention)
    widths = {v.name: v.module.weight.shape for v in emptied if v.op == "Parameter"}
    assert widths["mix"][1] < 16 and widths["head"][1] < 32 and widths["scale"][0] < 32, widths
    assert emptied["qkv"].module.out_features < 96


def test_channel_shuffle_keeps_the_same_positions_of_every_group(tmp_path):
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 8, 8),)
    dag = td.build_from_unstructured_module(ShuffleNetLike().eval(), inputs)
    groups = channel_groups(dag, inputs)
    for name in ("grouped", "pw"):  # 32 channels in 4 groups: 8 positions, each kept or removed in all
        group = next(g for g in groups.groups() if name in g.producers)
        assert group.prunable and len(group.channels) == 8, groups.summary()
    _, emptied = _prune_zero_loss(ShuffleNetLike(), inputs, tmp_path)
    for name in ("grouped", "pw"):
        width = emptied[name].module.out_channels
        assert width < 32 and width % 4 == 0, width
    assert emptied["grouped"].module.groups == 4


@pytest.mark.slow
def test_torchvision_shufflenet_prunes_to_half_the_flops(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 64, 64),)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None)
    _, emptied = _prune_zero_loss(model, inputs, tmp_path)
    # the stream that the shuffles interleave narrowed (the same positions of both halves)
    assert emptied["stage4_0_branch1_2"].module.out_channels < 96


class ReadsChannels(nn.Module):
    """Channels reduced away, and contracted against a tensor that is neither tracked nor a weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        match = torch.einsum("bchw,bchw->bhw", self.b(x), x.repeat(1, 3, 1, 1)[:, :8])
        return self.a(x).sum(dim=(1, 2)), match


def test_reducing_or_contracting_the_channels_blindly_fixes_them_with_a_reason():
    inputs = (torch.randn(2, 3, 8, 8),)
    dag = td.build_from_unstructured_module(ReadsChannels().eval(), inputs)
    groups = {g.producers[0]: g for g in channel_groups(dag, inputs).groups()}
    assert groups["a"].reasons == ["sum_1: sum reduces the channel axis"], groups["a"].reasons
    (reason,) = groups["b"].reasons
    assert reason.startswith("einsum: einsum 'bchw,bchw->bhw' spans the channels of 'c'"), reason


def test_a_layer_norm_without_weights_follows_its_channels(tmp_path):
    """`nn.LayerNorm(..., elementwise_affine=False)` (speech models' positional conv) holds no tensor,
    yet its normalized_shape is a channel count: it narrows with the group."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.LayerNorm(32, elementwise_affine=False), nn.ReLU(), nn.Linear(32, 4)
    )
    x = torch.randn(3, 8)
    dag = td.build_from_unstructured_module(model.eval(), x)
    pruned = td.prune(dag, 0.5, x)
    (norm,) = [v.module for v in pruned if v.op == "LayerNorm"]
    (first,) = [v.module for v in pruned if v.op == "Linear" and v.module.in_features == 8]
    assert norm.normalized_shape == (first.out_features,) and first.out_features < 32
    loaded = td.load(td.save(pruned, tmp_path / "p.dag"))
    assert torch.equal(loaded(x), pruned(x))
