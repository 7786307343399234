"""`factorize(..., latency=...)`: layers whose low-rank pair does not pay in measured time are left whole,
with the measured times in their reports. Real timings are only checked for consistency with the
decisions (never for a particular decision, except where the gap is huge); the allocation logic is
checked exactly on a deterministic clock (a cost model standing in for `compare_latency`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import torch_dag as td
from torch_dag.core.editor import Editor
from torch_dag.core.errors import DagError
from torch_dag.core.lowrank import LowRankConv2d, LowRankLinear
from torch_dag.passes import factorize, low_rank
from torch_dag.passes import factorize_ranks as ranks_module
from torch_dag.passes.factorize_ranks import LatencyCheck
from torch_dag.passes.factorize_report import FactorizationReport, LayerReport
from torch_dag.passes.factorize_solve import Layer

OVERHEAD_MS = 0.05  # the deterministic clock's cost of a pair's second kernel
MS_PER_WEIGHT = 1e-5  # and of a multiply-add per example


def _dag(model: nn.Module, x: torch.Tensor) -> td.DagModule:
    return td.build_from_unstructured_module(model.eval(), (x,))


def _mlp() -> nn.Module:
    """Two wide layers whose pairs pay at low ranks, two narrow ones whose pairs never pay on the clock."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def _clock_ms(module: nn.Module) -> float:
    weights = sum(p.numel() for name, p in module.named_parameters() if name != "bias")
    pair = isinstance(module, (LowRankLinear, LowRankConv2d))
    return weights * MS_PER_WEIGHT + (OVERHEAD_MS if pair else 0.0)


@pytest.fixture
def clock(monkeypatch):
    """`compare_latency` replaced by the cost model above; the calls it got are listed."""
    calls: list[tuple[tuple, dict, tuple[int, int]]] = []  # inputs, options, (whole layer, pair's rank)

    def compare(models, example_inputs, **options):
        calls.append((example_inputs, options, (id(models["whole"]), models["pair"].rank)))
        return SimpleNamespace(
            latencies={name: SimpleNamespace(median_ms=_clock_ms(m)) for name, m in models.items()}
        )

    monkeypatch.setattr(ranks_module, "compare_latency", compare)
    return calls


def _assert_consistent(report: FactorizationReport) -> None:
    """Every decision follows from the times recorded: a factorized layer's pair at its rank measured
    faster; a layer left whole for latency has a last timing that does not pay, quoted in its reason."""
    for layer in report.layers:
        if layer.rank is not None:
            last = layer.timings[-1]
            assert (last.stage, last.rank, last.pays) == ("chosen", layer.rank, True), layer
            assert last.pair_ms < last.whole_ms
        elif layer.timings and layer.timings[-1].pays:  # paid when probed, then given no rank
            assert layer.reason.startswith("kept whole"), layer.reason
        elif layer.timings:
            last = layer.timings[-1]
            assert not last.pays and last.pair_ms >= last.whole_ms, layer
            assert layer.reason.startswith("latency: ") and str(last) in layer.reason, layer.reason
            assert "does not pay" in layer.reason and "ms whole on cpu" in layer.reason
            if last.stage == "probe":  # at half the multiply-adds
                assert last.rank == max(1, (layer.max_rank + 1) // 2)
        else:
            assert layer.reason and not layer.reason.startswith("latency")


def _assert_data_free_on_kept(dag: td.DagModule, result: td.DagModule, report, x: torch.Tensor) -> None:
    """The result is the data-free factorization (`low_rank`, truncated SVD) at the kept layers' ranks,
    and the original module everywhere else; its outputs equal that oracle's."""
    editor = Editor(dag)
    for layer in report.layers:
        got = result[layer.name].module
        if layer.rank is None:
            assert type(got) is type(dag[layer.name].module)
            assert torch.equal(got.weight, dag[layer.name].module.weight)
            continue
        expected, _ = low_rank(dag[layer.name].module, layer.rank)
        torch.testing.assert_close(got.merged_weight(), expected.merged_weight())
        for name in layer.vertices:
            editor.set_module(name, expected)
    with torch.no_grad():
        torch.testing.assert_close(result(x), editor.build()(x))


def test_probe_leaves_out_narrow_layers_and_the_rest_meets_the_target(clock):
    x = torch.randn(8, 128)
    dag = _dag(_mlp(), x)
    result, report = factorize(dag, 0.5, example_inputs=x, latency=True, return_report=True)
    _assert_consistent(report)
    by_name = {layer.name: layer for layer in report.layers}
    narrow = [layer for layer in report.layers if layer.shape in ((16, 128), (16, 16))]
    assert len(narrow) == 2 and all("(at half its multiply-adds)" in layer.reason for layer in narrow)
    assert all(layer.timings[-1].stage == "probe" for layer in narrow)
    wide = [layer for layer in report.layers if layer.shape == (128, 128)]
    assert all(layer.rank is not None for layer in wide)  # 0.5 needs ranks the clock says pay
    assert report.flops_after <= 0.5 * report.flops_before
    assert "2 left whole: their pairs at half the multiply-adds" in report.note
    assert "target is missed" not in report.note
    assert by_name[report.layers[-1].name].reason.startswith("protected")
    assert all(
        options["device"] == torch.device("cpu") and options["dtype"] is None for _, options, _ in clock
    )
    assert all(inputs[0].shape[0] == 8 for inputs, _, _ in clock)  # the example inputs' batch
    _assert_data_free_on_kept(dag, result, report, x)


def test_allocated_rank_that_does_not_pay_is_left_whole_and_the_miss_is_reported(clock):
    x = torch.randn(8, 128)
    dag = _dag(_mlp(), x)
    result, report = factorize(dag, 0.9, example_inputs=x, latency=True, return_report=True)
    _assert_consistent(report)
    chosen = [t for layer in report.layers for t in layer.timings if t.stage == "chosen"]
    assert chosen and all(
        t.pays == (t.rank * 256 * MS_PER_WEIGHT + OVERHEAD_MS < 128 * 128 * MS_PER_WEIGHT) for t in chosen
    )
    dropped = [layer for layer in report.layers if layer.slower_at_chosen_rank]
    assert dropped  # 0.9 asks for ranks near break-even, which the overhead makes slower
    assert all(layer.reason.endswith("at its allocated rank") for layer in dropped)
    reached = report.flops_after / report.flops_before
    assert reached > 0.9
    assert (
        "target is missed" in report.note and f"flops_ratio=0.9 asked, {reached:.4f} reached" in report.note
    )
    _assert_data_free_on_kept(dag, result, report, x)


def test_with_calibration_every_candidate_is_timed_once(clock):
    x = torch.randn(8, 128)
    dag = _dag(_mlp(), x)
    batches = [torch.randn(16, 128) for _ in range(4)]
    result, report = factorize(dag, 0.5, calibration=batches, latency=True, return_report=True)
    _assert_consistent(report)
    timed = [key for _, _, key in clock]  # the data-aware and the SVD allocations share the timings
    assert len(timed) == len(set(timed))
    modules = {layer.name: id(dag[layer.name].module) for layer in report.layers}
    assert {(modules[layer.name], t.rank) for layer in report.layers for t in layer.timings} <= set(timed)
    assert report.factorized and "latency: 4 layers timed" in report.note
    with torch.no_grad():
        assert torch.isfinite(result(x)).all()


def test_a_latency_table_sets_device_dtype_batch_and_threads(clock):
    x = torch.randn(8, 128)
    dag = _dag(_mlp(), x)
    table = SimpleNamespace(device_type="cpu", dtype="bfloat16", batch_size=3, threads=1)
    _, report = factorize(dag, 0.5, example_inputs=x, latency=table, return_report=True)
    _assert_consistent(report)
    assert clock and all(inputs[0].shape[0] == 3 for inputs, _, _ in clock)
    assert all(o["dtype"] == torch.bfloat16 and o["threads"] == 1 for _, o, _ in clock)
    assert "batch 3" in report.note


def test_latency_errors_and_false_is_unchanged(clock):
    x = torch.randn(8, 128)
    dag = _dag(_mlp(), x)
    with pytest.raises(DagError, match="without device_type, batch_size"):
        factorize(dag, 0.5, example_inputs=x, latency=SimpleNamespace(dtype="float32"))
    with pytest.raises(DagError, match=r"2 more were left whole .* latency=False"):
        factorize(dag, 0.06, example_inputs=x, latency=True)  # all four could save enough, two cannot
    clock.clear()
    plain, report = factorize(dag, 0.5, example_inputs=x, return_report=True)
    assert not clock and not any(layer.timings for layer in report.layers) and "latency" not in report.note
    again = factorize(dag, 0.5, example_inputs=x, latency=False)
    for vertex in plain:
        for a, b in zip(vertex.module.parameters(), again[vertex.name].module.parameters()):
            assert torch.equal(a, b)


def test_one_real_timing_is_recorded_on_the_layer_input_shape():
    x = torch.randn(4, 64)
    dag = _dag(nn.Sequential(nn.Linear(64, 32)), x)
    layer = _layer(dag[next(iter(dag)).name].module)
    check = LatencyCheck(dag, (x,), torch.device("cpu"), None, 8)
    check.record([layer])
    assert check.shapes[id(layer.module)] == (torch.Size([8, 64]), torch.float32)  # at the batch asked
    timing = check.timing(layer, 2, "probe")
    assert timing.whole_ms > 0 and timing.pair_ms > 0 and timing.device.startswith("cpu")
    assert layer.report.timings == [timing] and check.timing(layer, 2, "chosen").rank == 2
    assert len(check.times) == 1  # measured once, recorded twice
    assert [t.stage for t in layer.report.timings] == ["probe", "chosen"]


@pytest.mark.slow
def test_real_timings_decide_consistently_on_a_conv_and_linear_model():
    x = torch.randn(8, 3, 16, 16)
    dag = _dag(_convnet(), x)
    result, report = factorize(dag, rank_ratio=0.25, example_inputs=x, latency=True, return_report=True)
    _assert_consistent(report)
    timed = [layer for layer in report.layers if layer.timings]
    assert len(timed) == 4  # every layer but the output head (protected)
    assert all(
        t.device.startswith("cpu") and t.whole_ms > 0 and t.pair_ms > 0
        for layer in timed
        for t in layer.timings
    )
    assert "latency: 4 layers timed" in report.note and "batch 8" in report.note
    _assert_data_free_on_kept(dag, result, report, x)


def _layer(module: nn.Linear) -> Layer:
    out, d = module.weight.shape
    max_rank = (out * d - 1) // (out + d)
    report = LayerReport(["w"], "Linear", (out, d), min(out, d), max_rank, 0)
    return Layer(module, report, module.weight.detach().double(), (), float(out + d), out + d)


@pytest.mark.slow
def test_a_tiny_rank_of_a_huge_linear_always_pays():
    """4096 x 4096 at batch 64: the rank-16 pair has 1/128 of the multiply-adds, on any device."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096))
    x = torch.randn(64, 4096)
    dag = _dag(model, x)
    check = LatencyCheck(dag, (x,), torch.device("cpu"), None, None)
    layer = _layer(dag[next(iter(dag)).name].module)
    check.shapes[id(layer.module)] = (x.shape, x.dtype)
    timing = check.timing(layer, 16, "chosen")
    assert timing.pays and timing.pair_ms < timing.whole_ms
    assert layer.report.timings == [timing]


def test_the_command_line_factorizes_only_what_pays(clock, tmp_path, capsys):
    """`torch-dag factorize --latency`: the same decisions as the API on the same clock; the narrow
    layers stay whole with their reason printed."""
    from torch_dag.cli import main

    x = torch.randn(4, 128)
    source, out = tmp_path / "mlp.dag", tmp_path / "mlp_lr.dag"
    td.save(_dag(_mlp(), x), source)
    main(["factorize", str(source), "--rank-ratio", "0.25", "--latency", "-o", str(out), "-q"])
    text = capsys.readouterr().out
    _, expected = factorize(td.load(source), rank_ratio=0.25, latency=True, return_report=True)
    small = td.load(out)
    kinds = {v.name: type(v.module).__name__ for v in small}
    assert [layer.rank is not None for layer in expected.layers] == [
        kinds[layer.name] == "LowRankLinear" for layer in expected.layers
    ]
    assert any(layer.rank is None and layer.timings for layer in expected.layers)
    assert "does not pay" in text
    with pytest.raises(SystemExit):  # a table without --latency is refused in one line
        main(
            ["factorize", str(source), "--rank-ratio", "0.25", "--latency-table", str(source), "-o", str(out)]
        )
    assert "--latency-table is read with --latency" in capsys.readouterr().err
