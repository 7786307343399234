"""Channel pruning: groups, a FLOPs target, surgery that keeps the model valid, and zero-loss pruning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dag as td
from tests.zoo import make
from torch_dag.core.compare import bitwise_equal, compare_outputs
from torch_dag.pruning import PruneConfig, channel_groups, channel_scores, prune, surgery
from torch_dag.pruning.flop_model import FlopModel

timm = pytest.importorskip("timm")

# channel-separable models (no LayerNorm over channels), where zeroed channels carry exact zeros
ZERO_LOSS_ZOO = [
    "residual",
    "squeeze_excite",
    "depthwise_grouped",
    "depthwise_multiplier",
    "split_index",
    "channel_ops",
    "heads_attention",
]
LOCAL_MODELS = {
    "depthwise_multiplier": (lambda: DepthwiseMultiplier(), (2, 3, 8, 8)),
    "split_index": (lambda: SplitIndex(), (2, 3, 8, 8)),
    "channel_ops": (lambda: ChannelOps(), (2, 3, 8, 8)),
    "heads_attention": (lambda: HeadsAttention(), (2, 3, 16, 16)),
}
ZERO_LOSS_TIMM = [
    ("resnet18", 64),
    ("mobilenetv3_small_100", 96),
    ("efficientnet_b0", 96),
    ("regnety_002", 96),
    ("resnext26ts", 64),
    ("efficientnet_b0_gn", 96),
    ("ghostnet_050", 64),
    ("mixnet_s", 64),
    ("skresnet18", 64),
]


class SplitIndex(nn.Module):
    """Channels through chunk / unbind / indexing on other axes, and a split along the channels into
    given sizes (rewritten to the kept counts)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 12, 1)
        self.c = nn.Conv2d(16, 6, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.d = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        top, bottom = y.chunk(2, dim=2)
        y = torch.cat([bottom, top], dim=2)[:, :, 1:, None, ...][..., 0, :]  # indexing other axes
        rows = torch.stack(y.unbind(2), dim=2)
        left, right = self.b(rows).split([4, 8], dim=1)  # along the channels
        z = self.d(torch.cat([self.dw(left), right], 1))
        return z.mean((2, 3)) + self.c(y).mean((2, 3))


class ChannelOps(nn.Module):
    """GLU halves, a GhostNet-style concat sliced back, a channel shuffle, a reshape sized by a count
    read from the shape, and a pixel shuffle."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.cheap = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(12, 16, 1, groups=2)
        self.c = nn.Conv2d(16, 16, 1)
        self.d = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        y = F.glu(self.a(x), dim=1)
        y = torch.cat([y, self.cheap(y)], 1)[:, :12]
        y = F.channel_shuffle(self.b(y), 2)
        batch, channels, h, w = y.shape
        y = self.c(y.reshape(batch, channels, h * w).reshape(batch, channels, h, w))
        return self.d(F.pixel_shuffle(y, 2)).mean((2, 3))


class HeadsAttention(nn.Module):
    """Multi-head self-attention written two ways (fused, and matmul + softmax with separate q and kv
    projections) on a residual stream whose width is read from the shape: heads go whole."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q, self.kv, self.proj2 = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        batch, n, c = x.shape
        qkv = self.qkv(x).reshape(batch, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, n, c))
        q = self.q(x).reshape(batch, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).reshape(batch, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attention = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        x = x + self.proj2((attention @ v).transpose(1, 2).reshape(batch, n, -1))
        return self.head(x.mean(1))


class DepthwiseMultiplier(nn.Module):
    """A depthwise conv with two outputs per input channel, then a GroupNorm."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.dw(torch.relu(self.pw(x))))))


def _timm(name, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, size, size)
    return td.build_from_unstructured_module(model, (x,)), (x,)


@torch.no_grad()
def _zero_channels(dag, groups, roots: set[int]) -> None:
    """Make the channels of `roots` carry exact zeros: zero their weights and biases in every member."""
    for name, role in groups.roles.items():
        module = dag[name].module
        for ids, side in ((role.out_ids, "out"), (role.in_ids, "in")):
            if ids is None:
                continue
            mask = torch.from_numpy(np.isin(groups.root(ids), list(roots)))
            if role.axis is not None:
                continue
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and side == "in":
                module.weight[mask], module.bias[mask] = 0, 0
            elif side == "out":
                module.weight[mask] = 0
                if module.bias is not None:
                    module.bias[mask] = 0


@pytest.mark.parametrize("case", ZERO_LOSS_ZOO + [n for n, _ in ZERO_LOSS_TIMM])
def test_pruning_zeroed_channels_keeps_outputs(case):
    if case in LOCAL_MODELS:
        torch.manual_seed(0)
        factory, shape = LOCAL_MODELS[case]
        inputs = (torch.randn(*shape),)
        dag = td.build_from_unstructured_module(factory().eval(), inputs)
    elif case in ZERO_LOSS_ZOO:
        model, inputs = make(case)
        dag = td.build_from_unstructured_module(model, inputs)
    else:
        dag, inputs = _timm(case, dict(ZERO_LOSS_TIMM)[case])
    groups = channel_groups(dag, inputs)
    prunable = [g for g in groups.groups() if g.prunable]
    assert prunable, groups.summary()
    rng = np.random.default_rng(0)
    roots = {
        int(r) for g in prunable for r in rng.choice(g.channels, size=len(g.channels) // 3, replace=False)
    }
    _zero_channels(dag, groups, roots)
    with torch.no_grad():
        reference = dag(*inputs)
        pruned = surgery.apply(dag, groups, lambda ids: ~np.isin(groups.root(ids), list(roots)))
        td.verify(pruned)
        equal, _, reason = compare_outputs(reference, pruned(*inputs), rtol=1e-4)
    assert equal, reason
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dag.parameters())


HEADS_TIMM = {  # (model, constructor arguments, input size, heads per block)
    "vit": ("vit_tiny_patch16_224", {"depth": 2, "img_size": 64}, 64, 3),
    "swin": ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}, 224, None),  # relative position table
    "relpos_mlp": ("test_vit_relpos", {}, 160, None),  # relative position bias made by an MLP per head
}


@pytest.mark.parametrize("attention", ["heads", "head_dim"])
@pytest.mark.parametrize("case", sorted(HEADS_TIMM))
def test_pruning_zeroed_heads_keeps_outputs(case, attention):
    """Whole heads, or the same positions of every head (the scale of attention kept as it was)."""
    name, kwargs, size, heads_per_block = HEADS_TIMM[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    inputs = (torch.randn(2, 3, size, size),)
    dag = td.build_from_unstructured_module(model, inputs)
    groups = channel_groups(dag, inputs, attention=attention)
    heads = [g for g in groups.groups() if g.prunable and any(p.endswith("qkv") for p in g.producers)]
    blocks = [v for v in dag if v.name.endswith("qkv")]
    assert len(heads) == len(blocks) > 0, groups.summary()
    if attention == "heads":  # a head's channels lie side by side: widths round in heads
        assert all(g.unit == dag[g.producers[0]].module.out_features // (3 * len(g.channels)) for g in heads)
        assert not heads_per_block or all(len(g.channels) == heads_per_block for g in heads)
    roots = {g.channels[1] for g in heads}  # one head of every block
    _zero_channels(dag, groups, roots)
    with torch.no_grad():
        reference = dag(*inputs)
        pruned = surgery.apply(dag, groups, lambda ids: ~np.isin(groups.root(ids), list(roots)))
        equal, _, reason = compare_outputs(reference, pruned(*inputs), rtol=1e-4)
    assert equal, reason
    for block in blocks:
        head_size = dag[block.name].module.out_features // (
            3 * len(next(g for g in heads if block.name in g.producers).channels)
        )
        assert pruned[block.name].module.out_features == dag[block.name].module.out_features - 3 * head_size


@pytest.mark.slow
def test_taylor_scores_are_zero_exactly_for_dead_channels():
    dag, inputs = _timm("resnet18", 64)
    with torch.no_grad():  # timm zero-initializes each block's last BN scale: no gradient would pass
        for module in dag.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    groups = channel_groups(dag, inputs)
    prunable = [g for g in groups.groups() if g.prunable]
    rng = np.random.default_rng(0)
    dead = {
        int(r) for g in prunable for r in rng.choice(g.channels, size=len(g.channels) // 4, replace=False)
    }
    _zero_channels(dag, groups, dead)
    batches = [(torch.randn(4, 3, 64, 64),) for _ in range(2)]
    grads_before = [p.grad for p in dag.parameters()]
    scores = channel_scores(dag, groups, "taylor", calibration=batches)
    assert all(scores.get(r, 0.0) == 0.0 for r in dead)
    alive = [scores.get(r, 0.0) for g in prunable for r in g.channels if r not in dead]
    assert np.mean(np.array(alive) > 0) > 0.9
    assert [p.grad for p in dag.parameters()] == grads_before  # the DAG's .grad are left alone
    pruned = prune(dag, 0.5, inputs, config=PruneConfig(criterion="taylor"), calibration=batches)
    assert (
        abs(td.count_flops(pruned, *inputs).total_flops / td.count_flops(dag, *inputs).total_flops - 0.5)
        <= 0.02
    )
    with pytest.raises(td.DagError, match="calibration"):
        prune(dag, 0.5, inputs, config=PruneConfig(criterion="taylor"))


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_magnitude_scores_sum_over_every_member_of_a_channel(criterion):
    """A channel's magnitude is that of its producer's row and bias, its norm's affine entries and its
    consumer's input column together: the whole group's view of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    dag = td.build_from_unstructured_module(model.eval(), (x,))
    groups = channel_groups(dag, (x,))
    group = next(g for g in groups.groups() if g.prunable)
    norm = (lambda t: t.abs().sum(-1)) if criterion == "l1" else (lambda t: t.square().sum(-1))
    conv, bn, reader = model[0], model[1], model[3]
    expected = (
        norm(conv.weight.reshape(6, -1))
        + norm(conv.bias[:, None])
        + norm(bn.weight[:, None])
        + norm(bn.bias[:, None])
        + norm(reader.weight.transpose(0, 1).reshape(6, -1))
    ).double()
    scores = channel_scores(dag, groups, criterion)
    got = torch.tensor([scores[r] for r in group.channels], dtype=torch.float64)
    torch.testing.assert_close(got, expected.detach())
    with torch.no_grad():  # a channel its reader ignores still counts by its producer's weights, and less
        reader.weight[:, 2] = 0
    again = channel_scores(td.build_from_unstructured_module(model.eval(), (x,)), groups, criterion)
    assert 0 < again[group.channels[2]] < scores[group.channels[2]]


@pytest.mark.parametrize(
    ("name", "size"), [("resnet18", 64), ("mobilenetv3_small_100", 96), ("regnety_002", 96)]
)
@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "random"])
def test_prune_reaches_the_flops_target(name, size, criterion, tmp_path):
    dag, inputs = _timm(name, size)
    before = td.count_flops(dag, *inputs).total_flops
    pruned = prune(dag, 0.5, inputs, config=PruneConfig(criterion=criterion))
    ratio = td.count_flops(pruned, *inputs).total_flops / before
    assert abs(ratio - 0.5) <= 0.02, ratio
    with torch.no_grad():
        out = pruned(*inputs)
        assert out.shape == dag(*inputs).shape
    loaded = td.load(td.save(pruned, tmp_path / "pruned.dag"))
    with torch.no_grad():
        assert bitwise_equal(out, loaded(*inputs))


def test_prune_rounds_widths_and_keeps_input_untouched():
    dag, inputs = _timm("resnet18", 64)
    state = {k: v.clone() for k, v in dag.state_dict().items()}
    pruned, report = prune(dag, 0.6, inputs, config=PruneConfig(round_to=8), return_report=True)
    assert all(torch.equal(state[k], v) for k, v in dag.state_dict().items())
    widths = [v.module.out_channels for v in pruned if v.op == "Conv2d"]
    assert all(w % 8 == 0 for w in widths), widths
    ratio = td.count_flops(pruned, *inputs).total_flops / td.count_flops(dag, *inputs).total_flops
    assert report.round_to == 8 and report.reached == pytest.approx(ratio) and abs(ratio - 0.6) <= 0.02
    assert (report.groups, report.prunable) == (13, 12) and 0 < report.narrowed <= 12


def small_convs(seed: int) -> tuple[td.DagModule, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 12, 3), nn.ReLU(), nn.Conv2d(12, 4, 1)
    )
    x = torch.randn(1, 3, 12, 12)
    return td.build_from_unstructured_module(model.eval(), (x,)), x


def test_rounding_gives_way_when_the_target_is_out_of_its_reach():
    dag, x = small_convs(0)
    with pytest.warns(UserWarning, match="instead of 8"):
        pruned, report = prune(dag, 0.3, (x,), return_report=True)  # 8 of 12 channels keep about half
    assert report.round_to < 8 and abs(report.reached - 0.3) <= 0.02
    assert all(v.module.out_channels % report.round_to == 0 for v in pruned if v.op == "Conv2d")


def test_a_removal_that_steps_over_the_target_is_skipped():
    """With two 12-channel layers, removing channels in order of importance steps over the target
    (0.325 then 0.27 for these weights, where 0.3 is asked): the channel of that step stays and less
    important ones after it go instead."""
    dag, x = small_convs(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = prune(dag, 0.3, (x,), config=PruneConfig(round_to=1), return_report=True)
    assert abs(report.reached - 0.3) <= 0.02


def test_a_target_out_of_reach_is_reported():
    """One two-channel layer can keep one channel or both: 0.3 of the FLOPs is out of reach, and the
    pruner says so instead of staying quiet."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 12, 12)
    dag = td.build_from_unstructured_module(
        nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Conv2d(2, 4, 1)), (x,)
    )
    with pytest.warns(UserWarning, match=r"ratio reached is 0\.\d+, outside 0\.300 \+- 0\.020"):
        _, report = prune(dag, 0.3, (x,), return_report=True)
    assert abs(report.reached - 0.3) > 0.02


def test_weight_standardized_convs_prune():
    """NFNets: convs whose weight is standardized (WSConv2d) prune like convs, their gains sliced along."""
    dag, inputs = _timm("test_nfnet", 64)
    assert any(v.op == "WSConv2d" for v in dag)
    pruned = prune(dag, 0.5, inputs)
    ratio = td.count_flops(pruned, *inputs).total_flops / td.count_flops(dag, *inputs).total_flops
    assert abs(ratio - 0.5) <= 0.02
    convs = [v.module for v in pruned if v.op == "WSConv2d"]
    assert all(c.gain is None or c.gain.shape[0] == c.out_channels for c in convs)
    assert any(
        c.out_channels < dag[v.name].module.out_channels
        for v, c in zip([v for v in pruned if v.op == "WSConv2d"], convs)
    )
    assert pruned(*inputs).shape == dag(*inputs).shape


def test_split_and_indexing_rules():
    x = torch.randn(2, 3, 8, 8)
    dag = td.build_from_unstructured_module(SplitIndex().eval(), (x,))
    groups = channel_groups(dag, (x,))
    state = {g.producers[0]: g for g in groups.groups()}
    assert state["a"].prunable and state["b"].prunable, groups.summary()
    pruned = prune(dag, 0.5, (x,), config=PruneConfig(round_to=1))
    (split,) = [v for v in pruned if v.op == "split"]
    kept = pruned["dw"].module.out_channels
    assert split.args[1] == [kept, pruned["b"].module.out_channels - kept] and 0 < kept <= 4
    assert pruned(x).shape == dag(x).shape


@pytest.mark.parametrize("seed", range(4))
def test_attention_heads_go_whole(seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 16, 16)
    dag = td.build_from_unstructured_module(HeadsAttention().eval(), (x,))
    groups = channel_groups(dag, (x,))
    heads = [g for g in groups.groups() if "qkv" in g.producers or "q" in g.producers]
    assert [(len(g.channels), g.unit, g.prunable) for g in heads] == [(4, 8, True), (4, 8, True)], (
        groups.summary()
    )
    pruned = prune(dag, 0.3, (x,), config=PruneConfig(round_to=1))
    reshapes = [v.args[1] for v in pruned if v.op == "reshape" and len(v.args[1]) == 5]
    assert any(shape[3] < 4 for shape in reshapes), reshapes  # heads removed, head size kept
    assert all(isinstance(shape[4], int) and shape[4] in (8, -1) for shape in reshapes), reshapes
    assert pruned(x).shape == (2, 5)

    pruned = prune(dag, 0.3, (x,), config=PruneConfig(round_to=1, attention="head_dim"))
    reshapes = [v.args[1] for v in pruned if v.op == "reshape" and len(v.args[1]) == 5]
    assert all(shape[3] == 4 for shape in reshapes) and any(shape[4] < 8 for shape in reshapes), reshapes
    (attention,) = [v for v in pruned if v.op == "scaled_dot_product_attention"]
    assert attention.kwargs["scale"] == 8**-0.5  # as before pruning
    assert pruned(x).shape == (2, 5)
    with pytest.raises(td.DagError, match="attention='rows'"):
        channel_groups(dag, (x,), attention="rows")


def test_params_and_kmapp_targets():
    dag, inputs = _timm("resnet18", 64)
    before = td.count_flops(dag, *inputs)
    by_params = prune(dag, params_ratio=0.5, example_inputs=inputs)
    assert abs(td.count_flops(by_params, *inputs).total_params / before.total_params - 0.5) <= 0.02
    by_kmapp = prune(dag, kmapp=before.kmapp * 0.6, example_inputs=inputs)
    assert abs(td.count_flops(by_kmapp, *inputs).kmapp / before.kmapp - 0.6) <= 0.02
    with pytest.raises(td.DagError, match="exactly one"):
        prune(dag, 0.5, inputs, params_ratio=0.5)
    with pytest.raises(td.DagError, match=r"\(0, 1\]"):
        prune(dag, kmapp=before.kmapp * 2, example_inputs=inputs)


def test_groups_of_resnet18():
    dag, inputs = _timm("resnet18", 64)
    groups = channel_groups(dag, inputs).groups()
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) == 12  # per stage: the residual stream and the two inner widths
    fixed = [g for g in groups if not g.prunable]
    assert [g.producers for g in fixed] == [["fc"]] and "output" in fixed[0].reasons[0]


def test_unknown_op_makes_its_channels_unprunable():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=1))

    model = Odd().eval()
    x = torch.randn(1, 3, 12, 12)
    groups = channel_groups(td.build_from_unstructured_module(model, (x,)), (x,)).groups()
    (a,) = [g for g in groups if g.producers == ["a"]]
    assert not a.prunable and "no channel rule for op cumsum" in a.reasons[0]


def test_cli_prune_prints_the_table(tmp_path, capsys):
    from torch_dag.cli import main

    out = tmp_path / "half.dag"
    main(["prune", "timm:resnet18", "--flops-ratio", "0.5", "--input-size", "3x64x64", "-q", "-o", str(out)])
    printed = capsys.readouterr().out
    assert "FLOPs (G)" in printed and "kmapp" in printed and "channel groups: 13, prunable 12" in printed
    pruned = td.load(out)
    x = pruned.example_inputs()
    assert td.count_flops(pruned, *x).total_params < 11e6


@pytest.mark.parametrize("how", ["lstsq", "none"])
def test_cli_prune_compensates_from_calibration_inputs(tmp_path, how):
    from torch_dag.cli import main

    model = _Mlp().eval()
    torch.manual_seed(0)
    data = torch.randn(64, 16)
    dag = td.build_from_unstructured_module(model, (data[:1],))
    td.save(dag, tmp_path / "mlp.dag")
    np.save(tmp_path / "calibration.npy", data.numpy())
    out = tmp_path / f"{how}.dag"
    main(
        [
            "prune",
            str(tmp_path / "mlp.dag"),
            "--flops-ratio",
            "0.5",
            "--round-to",
            "1",
            "--calibration",
            str(tmp_path / "calibration.npy"),
            "--compensate",
            how,
            "-q",
            "-o",
            str(out),
        ]
    )
    expected = prune(
        dag,
        0.5,
        (data[:1],),
        calibration=[(b,) for b in data.split(8)],
        config=PruneConfig(round_to=1, compensate=how),
    )
    assert bitwise_equal(td.load(out).state_dict(), expected.state_dict())


def test_prune_works_through_nested_dags():
    from torch_dag import passes

    dag, inputs = _timm("resnet18", 64)
    nested = passes.nest_by_module(dag, 1)
    assert any(v.op == "DagModule" for v in nested)
    pruned = prune(nested, 0.5, inputs)
    ratio = td.count_flops(pruned, *inputs).total_flops / td.count_flops(dag, *inputs).total_flops
    assert abs(ratio - 0.5) <= 0.02


def test_a_channel_count_sizes_only_its_own_channels():
    class ReadsC(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(3, 6, 3)
            self.d = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            batch, channels, h, w = y.shape
            z = self.b(x).reshape(batch, channels, h * w) + y.flatten(2)  # b's count tied to a's
            return z.mean(2) * 2, self.c(x) / channels  # the count as a number: a's channels stay

    model = ReadsC().eval()
    x = torch.randn(1, 3, 10, 10)
    dag = td.build_from_unstructured_module(model, (x,))
    groups = channel_groups(dag, (x,)).groups()
    (ab,) = [g for g in groups if "a" in g.producers]
    assert ab.producers == ["a", "b"]
    assert not ab.prunable and any("div reads the channel count" in r for r in ab.reasons), ab.reasons

    class ReshapesByC(ReadsC):
        def forward(self, x):
            y = self.a(x)
            batch, channels, h, w = y.shape
            return self.d(
                (self.b(x).reshape(batch, channels, h * w) + y.flatten(2)).reshape(batch, channels, h, w)
            )

    dag = td.build_from_unstructured_module(ReshapesByC().eval(), (x,))
    (ab,) = [g for g in channel_groups(dag, (x,)).groups() if "a" in g.producers]
    assert ab.prunable


class Reshapes(nn.Module):
    def __init__(self, merge_batch: bool):
        super().__init__()
        self.merge_batch = merge_batch
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        batch = y.shape[0]
        if self.merge_batch:  # the sizes of such a reshape hold the batch size
            return self.b(y.reshape(batch * 8, 36).reshape(batch, 8, 6, 6))
        return self.b(y.reshape(batch, 8, 36).reshape(batch, 8, 6, 6))  # the 8s follow the pruning


def test_reshape_sizes_follow_the_pruning_and_leave_the_batch_free():
    x = torch.randn(2, 3, 8, 8)
    dag = td.build_from_unstructured_module(Reshapes(merge_batch=True).eval(), (x,))
    (a,) = [g for g in channel_groups(dag, (x,)).groups() if g.producers == ["a"]]
    assert not a.prunable and "mixes the channel axis with others" in " ".join(a.reasons)

    dag = td.build_from_unstructured_module(Reshapes(merge_batch=False).eval(), (x,))
    pruned = prune(dag, 0.5, (x,), config=PruneConfig(round_to=1))
    kept = pruned["b"].module.in_channels
    assert kept < 8 and [v.args[1][1] for v in pruned if v.op == "reshape"] == [kept, kept]
    assert pruned(torch.randn(3, 3, 8, 8)).shape == (3, 4, 6, 6)


def test_a_parameter_expanded_to_a_read_shape_blocks_its_channels():
    """resnetv2_50d_frn: `tau.expand(x.shape)`: the sizes are not spelled out, so the channels stay."""

    class Expanded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
            self.tau = nn.Parameter(torch.randn(1, 8, 1, 1))

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.maximum(y, self.tau.expand(y.shape)))

    x = torch.randn(2, 3, 6, 6)
    groups = channel_groups(td.build_from_unstructured_module(Expanded().eval(), (x,)), (x,)).groups()
    (a,) = [g for g in groups if g.producers == ["a"]]
    assert not a.prunable, a.reasons


@torch.no_grad()
def _constant_channels(dag, groups, roots: set[int]) -> None:
    """Make the channels of `roots` constant (not zero): zero their producers' weights, keep the biases."""
    for name, role in groups.roles.items():
        module = dag[name].module
        if role.out_ids is not None and role.axis is None and isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight[torch.from_numpy(np.isin(groups.root(role.out_ids), list(roots)))] = 0


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("how", ["mean", "lstsq"])
@pytest.mark.parametrize("case", ["mlp", "vit"])
def test_compensation_makes_pruning_constant_channels_lossless(case, how):
    """A constant channel (after a bias and an activation, a dead channel is rarely zero) is removed
    without changing the outputs once its contribution is folded into the readers' biases: also
    through attention, where constant queries and keys give uniform weights over constant values."""
    torch.manual_seed(0)
    if case == "vit":
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8
        )
        inputs = (torch.randn(4, 3, 32, 32),)
    else:
        model, inputs = _Mlp(), (torch.randn(32, 16),)
    dag = td.build_from_unstructured_module(model.eval(), inputs)
    with torch.no_grad():
        for module in dag.modules():
            if isinstance(module, nn.Linear):
                module.bias.normal_()
    groups = channel_groups(dag, inputs)
    normed = {
        int(r)
        for name, role in groups.roles.items()
        if surgery.kind(dag[name].module) == "Norm"
        for r in groups.root(role.in_ids)
    }
    clean = [
        g for g in groups.groups() if g.prunable and not normed & set(g.channels)
    ]  # a LayerNorm mixes them
    assert clean, groups.summary()
    rng = np.random.default_rng(0)
    roots = {int(r) for g in clean for r in rng.choice(g.channels, size=len(g.channels) // 3, replace=False)}
    _constant_channels(dag, groups, roots)

    def keep(ids):
        return ~np.isin(groups.root(ids), list(roots))

    with torch.no_grad():
        reference = dag(*inputs)
        pruned = surgery.apply(dag, groups, keep)
        assert not compare_outputs(reference, pruned(*inputs), rtol=1e-4)[0]  # the constants mattered
        td.pruning.compensate(dag, pruned, groups, keep, [inputs], how)
        td.verify(pruned)
        equal, _, reason = compare_outputs(reference, pruned(*inputs), rtol=1e-4)
    assert equal, reason


def test_compensation_lowers_the_error_on_the_calibration_data():
    """Each layer's re-solved weights fit its unpruned outputs at least as well as its own weights with
    the mean contribution restored, which fit better than nothing restored (per layer, by
    construction; checked here on the whole model's outputs)."""
    torch.manual_seed(0)
    model = _Mlp().eval()
    batches = [torch.randn(64, 16) for _ in range(4)]
    dag = td.build_from_unstructured_module(model, (batches[0],))
    with torch.no_grad():
        reference = torch.cat([dag(b) for b in batches])
    errors = {}
    for how in ["none", "mean", "lstsq"]:
        pruned = prune(dag, 0.5, (batches[0],), calibration=batches, config=PruneConfig(compensate=how))
        with torch.no_grad():
            errors[how] = (torch.cat([pruned(b) for b in batches]) - reference).square().mean().item()
    assert errors["lstsq"] < errors["mean"] < errors["none"], errors


@pytest.mark.slow
def test_no_group_loses_more_than_max_removed():
    dag, inputs = _timm("resnet18", 64)
    pruned = prune(dag, 0.5, inputs, config=PruneConfig(max_removed=0.4, round_to=1))
    widths = [
        (v.module.out_channels, pruned[v.name].module.out_channels)
        for v in dag
        if isinstance(v.module, nn.Conv2d)
    ]
    assert all(after >= 0.6 * before for before, after in widths), widths
    assert any(after < before for before, after in widths)
    assert (
        abs(td.count_flops(pruned, *inputs).total_flops / td.count_flops(dag, *inputs).total_flops - 0.5)
        <= 0.02
    )


def test_calibration_given_as_a_generator_serves_taylor_and_compensation():
    torch.manual_seed(0)
    batches = [torch.randn(32, 16) for _ in range(3)]
    dag = td.build_from_unstructured_module(_Mlp().eval(), (batches[0],))
    config = PruneConfig(criterion="taylor", round_to=1)
    from_list = prune(dag, 0.5, (batches[0],), calibration=batches, config=config)
    from_generator = prune(dag, 0.5, (batches[0],), calibration=(b for b in batches), config=config)
    assert bitwise_equal(from_list.state_dict(), from_generator.state_dict())
    with pytest.raises(td.DagError, match="at least one calibration batch"):
        prune(dag, 0.5, (batches[0],), calibration=[])


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul"])
@pytest.mark.parametrize("attention", ["heads", "head_dim"])
def test_the_flop_model_predicts_attention_exactly(attention, fused):
    """The bisection's FLOP model counts attention's products (`q @ k.T`, the weights times v) as they
    shrink with heads or head dims, so a ViT's target is met without measuring every try."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(1, 3, 64, 64)
    dag = td.build_from_unstructured_module(model, (x,))
    assert any(v.op == ("scaled_dot_product_attention" if fused else "matmul") for v in dag)
    groups = channel_groups(dag, (x,), attention=attention)
    before = td.count_flops(dag, x)
    flop_model = FlopModel(groups, before.flops)
    removed = np.zeros(groups.size, dtype=bool)
    for group in groups.groups():
        if group.prunable:
            removed[group.channels[::3]] = True  # a third of every group's classes (heads, head dims, widths)
    pruned = surgery.apply(dag, groups, lambda ids: ~removed[groups.root(ids)])
    measured = td.count_flops(pruned, x).total_flops / before.total_flops
    assert measured < 0.9
    assert flop_model.ratio(removed) == pytest.approx(measured, abs=1e-9)
