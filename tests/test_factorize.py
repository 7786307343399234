"""Low-rank factorization: the ops, exactness where it must be exact, data-aware optimality, the
break-even rule, rank allocation, and the pass on the zoo and timm models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_dag as td
from tests.zoo import ZOO, make
from torch_dag.core.compare import bitwise_equal, compare_outputs
from torch_dag.core.lowrank import LowRankConv2d, LowRankLinear
from torch_dag.passes import factorize, low_rank

timm = pytest.importorskip("timm")


def _dag(model: nn.Module, *inputs: torch.Tensor) -> td.DagModule:
    return td.build_from_unstructured_module(model.eval(), inputs)


def _mlp(d_in: int = 32, hidden: int = 64, d_out: int = 24) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d_out)
    )


def _convnet(padding: str | int = "same") -> nn.Module:
    """fvcore does not count convs with string padding (aten::_convolution_mode): 2 for comparisons."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 48, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(48, 64, 1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=padding, dilation=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def _assert_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 rounding: the factors come from float32 eigenvectors (~1e-6 relative)."""
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def _correlated_batches(n: int, *shape: int, seed: int = 1) -> list[torch.Tensor]:
    """Inputs with a strongly non-isotropic covariance (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    features = shape[0]
    mix = torch.randn(features, features, generator=g) * torch.logspace(0, -2, features)
    batches = []
    for _ in range(n):
        x = torch.randn(4, *shape, generator=g)
        batches.append(torch.einsum("bc...,dc->bd...", x, mix))
    return batches


# --- the ops --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Linear(20, 12), torch.randn(5, 20)),
        (nn.Linear(20, 12, bias=False), torch.randn(2, 3, 20)),
        (nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1), torch.randn(2, 6, 9, 9)),
        (nn.Conv2d(6, 10, (3, 5), padding="same", dilation=(2, 1), bias=False), torch.randn(2, 6, 9, 9)),
    ],
)
@pytest.mark.parametrize("with_data", [False, True])
def test_full_rank_equals_original(layer, x, with_data):
    torch.manual_seed(0)
    full = min(layer.weight.shape[0], layer.weight[0].numel())
    new, error = low_rank(layer, full, inputs=x if with_data else None)
    assert isinstance(new, LowRankLinear if isinstance(layer, nn.Linear) else LowRankConv2d)
    assert error < 1e-5
    _assert_equal(new(x), layer(x))
    _assert_equal(new.merged_weight(), layer.weight)


@pytest.mark.parametrize("with_data", [False, True])
def test_truly_low_rank_weight_is_recovered_at_its_rank(with_data):
    torch.manual_seed(0)
    linear, conv = nn.Linear(48, 64), nn.Conv2d(8, 40, 3, padding=1)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 3) @ torch.randn(3, 48))
        conv.weight.copy_((torch.randn(40, 5) @ torch.randn(5, 72)).reshape(40, 8, 3, 3))
    for layer, x, rank in ((linear, torch.randn(16, 48), 3), (conv, torch.randn(2, 8, 6, 6), 5)):
        new, error = low_rank(layer, rank, inputs=x if with_data else None)
        assert new.rank == rank and error < 1e-5
        _assert_equal(new(x), layer(x))
        _, error_below = low_rank(layer, rank - 1, inputs=x if with_data else None)
        assert error_below > 1e-3  # one rank less loses a real direction


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    for rank in (1, 7, 20):
        new, error = low_rank(layer, rank)
        u, s, vh = torch.linalg.svd(layer.weight.double())
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(new.merged_weight().double(), best, rtol=1e-4, atol=1e-5)
        assert error == pytest.approx((s[rank:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-6)


@pytest.mark.parametrize(
    "layer, shape",
    [(nn.Linear(48, 32), (48,)), (nn.Linear(24, 64), (24,)), (nn.Conv2d(8, 24, 3, padding=1), (8, 7, 7))],
)
def test_data_aware_error_never_above_svd_error_on_calibration_data(layer, shape):
    torch.manual_seed(0)
    x = torch.cat(_correlated_batches(6, *shape))
    reference = layer(x).detach()
    for rank in (1, 3, 8, 15):
        aware, reported = low_rank(layer, rank, inputs=x)
        svd, _ = low_rank(layer, rank)
        aware_error = ((aware(x) - reference).norm() / reference.norm()).item()
        svd_error = ((svd(x) - reference).norm() / reference.norm()).item()
        assert aware_error <= svd_error * (1 + 1e-6) + 1e-7, (rank, aware_error, svd_error)
        # the reported error is the output error on those inputs, relative to W x (the bias is kept)
        bias = layer.bias[:, None, None] if isinstance(layer, nn.Conv2d) else layer.bias
        signal = (reference - bias).norm()
        assert reported == pytest.approx(((aware(x) - reference).norm() / signal).item(), rel=1e-3)


def test_low_rank_ops_save_load_count_flops_and_refactorize(tmp_path):
    fvcore = pytest.importorskip("fvcore.nn")
    x = torch.randn(2, 3, 16, 16)
    dag = _dag(_convnet(padding=2), x)
    small = factorize(dag, rank_ratio=0.25)
    ops = {v.op for v in small}
    assert {"LowRankConv2d", "LowRankLinear"} & ops
    path = td.save(small, tmp_path / "small.dag")
    loaded = td.load(path)
    assert bitwise_equal(small(x), loaded(x))
    assert (
        td.count_flops(small, x).total_flops
        == fvcore.FlopCountAnalysis(small, (x,))
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
        .total()
    )
    # factorizing again goes to a lower rank, starting from the low-rank weights
    smaller = factorize(loaded, rank_ratio=0.1)
    for name in (v.name for v in small if v.op.startswith("LowRank")):
        if smaller[name].op.startswith("LowRank"):
            assert smaller[name].module.rank < small[name].module.rank
    assert td.count_flops(smaller, x).total_flops < td.count_flops(small, x).total_flops


# --- the pass -------------------------------------------------------------------------------------


def test_break_even_rule_and_reasons():
    x = torch.randn(4, 32)
    dag = _dag(_mlp(), x)
    small, report = factorize(dag, rank_ratio=0.9, protect_outputs=False, return_report=True)
    assert all(v.op == "Linear" for v in small if v.op.endswith("Linear"))  # 0.9 of the rank never pays
    assert len(report.skipped) == 3 and all("break-even" in layer.reason for layer in report.skipped)
    small, report = factorize(dag, rank_ratio=0.25, protect_outputs=False, return_report=True)
    for layer in report.factorized:
        out, d = layer.shape
        assert layer.rank * (out + d) < out * d and layer.flops_after < layer.flops


def test_flops_target_is_met_with_less_error_than_uniform():
    x = torch.randn(2, 3, 16, 16)
    dag = _dag(_convnet(), x)
    batches = [(b,) for b in _correlated_batches(3, 3, 16, 16)]
    results = {}
    for allocation in ("error", "uniform"):
        for calibration in (None, batches):
            small, report = factorize(
                dag,
                flops_ratio=0.6,
                example_inputs=(x,),
                calibration=calibration,
                allocation=allocation,
                return_report=True,
            )
            ratio = td.count_flops(small, x).total_flops / td.count_flops(dag, x).total_flops
            assert 0.58 <= ratio <= 0.6 + 1e-9, (allocation, ratio)
            assert report.flops_after / report.flops_before == pytest.approx(ratio)
            total = sum(layer.error**2 for layer in report.factorized)
            results[allocation, calibration is not None] = total
    assert results["error", False] <= results["uniform", False]
    assert results["error", True] <= results["uniform", True]


def test_params_target():
    x = torch.randn(4, 32)
    dag = _dag(_mlp(64, 128, 64), x.new_zeros(4, 64))
    small = factorize(dag, params_ratio=0.5)
    assert sum(p.numel() for p in small.parameters()) <= 0.5 * sum(p.numel() for p in dag.parameters())


def test_protected_grouped_and_errors():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = nn.Conv2d(16, 32, 3, groups=4)
            self.conv = nn.Conv2d(32, 32, 3)
            self.head = nn.Linear(32, 32)

        def forward(self, x):
            return self.head(self.conv(self.grouped(x)).mean((2, 3)))

    x = torch.randn(2, 16, 10, 10)
    dag = _dag(Model(), x)
    small, report = factorize(dag, rank_ratio=0.2, protected=["head"], return_report=True)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert "groups=4" in reasons["grouped"] and "protected" in reasons["head"] and reasons["conv"] == ""
    assert (
        small["grouped"].op == "Conv2d"
        and small["head"].op == "Linear"
        and small["conv"].op == "LowRankConv2d"
    )
    with pytest.raises(td.DagError, match="exactly one"):
        factorize(dag)
    with pytest.raises(td.DagError, match="saves only"):
        factorize(dag, flops_ratio=0.01, example_inputs=(x,))
    with pytest.raises(td.DagError, match="groups=4"):
        low_rank(dag["grouped"].module, 2)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo(name, tmp_path):
    """Every zoo model: factorized where it pays (with its inputs as calibration), valid, and at full
    rank the low-rank layers compute what the originals did."""
    model, inputs = make(name)
    dag = td.build_from_unstructured_module(model, inputs)
    small, report = factorize(dag, rank_ratio=0.3, calibration=[inputs], return_report=True)
    td.verify(small)
    with torch.no_grad():
        out = small(*inputs)
    loaded = td.load(td.save(small, tmp_path / "small.dag"))
    with torch.no_grad():
        assert bitwise_equal(out, loaded(*inputs))
    for layer in report.layers:  # every factorizable layer is either factorized or says why not
        assert (layer.rank is not None) != bool(layer.reason), layer
    for vertex in dag:
        if (
            vertex.op in ("Linear", "Conv2d")
            and vertex.module.weight.dim() >= 2
            and (vertex.op == "Linear" or vertex.module.groups == 1)
        ):
            full = min(vertex.module.weight.shape[0], vertex.module.weight[0].numel())
            _assert_equal(low_rank(vertex.module, full)[0].merged_weight(), vertex.module.weight)


def test_input_dag_untouched_and_shared_module_stays_shared(tmp_path):
    model, inputs = make("shared_module")
    dag = td.build_from_unstructured_module(model, inputs)
    before = {k: v.clone() for k, v in dag.state_dict().items()}
    # the shared layer also produces the output: protected by default
    small = factorize(dag, rank_ratio=0.25, calibration=[inputs], protect_outputs=False)
    assert all(torch.equal(before[k], v) for k, v in dag.state_dict().items())
    calls = {}
    for vertex in small:
        if vertex.op == "LowRankLinear":
            calls.setdefault(id(vertex.module), []).append(vertex.name)
    assert any(len(names) == 2 for names in calls.values())  # the layer called twice: one module
    loaded = td.load(td.save(small, tmp_path / "shared.dag"))
    assert bitwise_equal(small(*inputs), loaded(*inputs))


def test_after_pruning_and_through_nested_dags():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    dag = td.build_from_unstructured_module(model, (x,))
    pruned = td.prune(dag, 0.6, (x,))
    small = factorize(
        pruned, flops_ratio=0.8, example_inputs=(x,), calibration=[(torch.randn(4, 3, 32, 32),)]
    )
    assert any(v.op == "LowRankConv2d" for v in small)
    assert small(x).shape == (2, 10)
    nested = td.passes.nest_by_module(dag, depth=1)
    assert any(td.core.ops.is_dag_module(v.module) for v in nested)
    flat = factorize(nested, rank_ratio=0.2)
    assert any(v.op == "LowRankConv2d" for v in flat)


@pytest.mark.parametrize(
    "name, size",
    [("vit_tiny_patch16_224", 64), ("resnet18", 64), ("convnext_atto", 64), ("mobilenetv3_small_100", 64)],
)
def test_timm_data_aware(name, size, tmp_path):
    torch.manual_seed(0)
    kwargs = {"img_size": size} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    dag = td.build_from_unstructured_module(model, (x,))
    batches = [(torch.randn(4, 3, size, size),) for _ in range(2)]
    small, report = factorize(
        dag, flops_ratio=0.75, calibration=batches, example_inputs=(x,), return_report=True
    )
    assert report.factorized and report.flops_after <= 0.75 * report.flops_before
    assert report.flops_after / report.flops_before >= 0.73
    assert all(layer.error is not None and 0 <= layer.error < 1 for layer in report.factorized)
    if name.startswith("vit"):  # attention and MLP linears
        kinds = {layer.name.split("_")[-1] for layer in report.factorized}
        assert kinds & {"qkv", "proj", "fc1", "fc2"}
    td.verify(small)
    out = small(x)
    assert out.shape == dag(x).shape and torch.isfinite(out).all()
    loaded = td.load(td.save(small, tmp_path / f"{name}.dag"))
    assert bitwise_equal(out, loaded(x))


def test_compare_with_fully_ranked_model_is_equal():
    """Full rank through the pass: a LowRank layer of the same rank refactorized at ratio 1 is kept."""
    x = torch.randn(4, 32)
    dag = _dag(_mlp(), x)
    small = factorize(dag, rank_ratio=0.3)
    again, report = factorize(small, rank_ratio=1.0, return_report=True)
    assert not report.factorized
    assert compare_outputs(small(x), again(x))[0]


@pytest.mark.slow
def test_cli_factorize(tmp_path, capsys):
    import numpy as np

    from torch_dag.cli import main

    source = tmp_path / "r.dag"
    main(["convert", "timm:resnet18", "--input-size", "3x32x32", "-o", str(source), "-q"])
    out = tmp_path / "r_lr.dag"
    main(["factorize", str(source), "--flops-ratio", "0.7", "-o", str(out), "-q", "--protect", "fc"])
    text = capsys.readouterr().out
    assert "factorize (svd, error allocation)" in text and "protected (fc)" in text
    small, dag = td.load(out), td.load(source)
    x = torch.randn(1, 3, 32, 32)
    assert td.count_flops(small, x).total_flops <= 0.7 * td.count_flops(dag, x).total_flops
    images = tmp_path / "images.npy"
    np.save(images, np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32))
    main(
        [
            "factorize",
            str(source),
            "--rank-ratio",
            "0.2",
            "--calibration",
            str(images),
            "--batch-size",
            "4",
            "-o",
            str(out),
            "-q",
        ]
    )
    assert "factorize (data-aware, uniform allocation)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["factorize", str(source), "-o", str(out)])  # no target


def test_calibration_leaves_every_module_in_its_mode():
    """Calibration runs in eval mode, then each module is back in its own mode (here: mixed)."""
    x = torch.randn(4, 32)
    dag = _dag(_mlp(), x).train()
    dag[next(v.name for v in dag if v.op == "GELU")].module.eval()
    modes = {name: m.training for name, m in dag.named_modules()}
    factorize(dag, rank_ratio=0.25, calibration=[(x,)])
    assert {name: m.training for name, m in dag.named_modules()} == modes
