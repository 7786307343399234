"""Latency: timing (`measure_latency`, `compare_latency`), the per-vertex latency table, and pruning to a
measured latency ratio. Tests assert what holds whatever the machine's load: the table's arithmetic,
its file round trip, the bookkeeping of measurements; timing figures live in benchmarks/latency.py."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

import torch_dag as td
from torch_dag.latency import GroupInfo, LatencyTable, VertexCost, build
from torch_dag.latency.rounding import WITHIN, candidates
from torch_dag.passes.prepare import prepare
from torch_dag.pruning import PruneConfig, channel_groups

from .zoo import conv_bn


class Plain(nn.Module):
    """Three conv blocks of width 32 and a classifier: a few prunable groups."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 32), conv_bn(32, 32), conv_bn(32, 32, stride=2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


class Sleeper(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        time.sleep(self.seconds)
        return x


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    return td.build_from_unstructured_module(Plain().eval(), (x,)), x


@pytest.fixture(scope="module")
def table(plain):
    dag, x = plain
    return td.latency_table(dag, (x,), batch_size=2, probes=4, repeats=1, round_to=4)


def test_measure_latency_states_what_it_timed_and_repeats_examples_to_the_batch():
    sleeper = Sleeper(0.001)
    latency = td.measure_latency(sleeper, torch.randn(3, 4), batch_size=7, runs=5, warmup=1)
    assert set(sleeper.seen) == {(7, 4)}
    assert latency.runs == 5 and len(latency.times_ms) == 5
    assert latency.p25_ms <= latency.median_ms <= latency.p75_ms
    assert latency.median_ms >= 1.0  # it slept a millisecond each call
    assert latency.batch_size == 7 and latency.threads == torch.get_num_threads()
    assert "5 runs" in str(latency) and "batch 7" in str(latency)


@pytest.mark.parametrize("warmup", [0, 2])
def test_warm_up_calls_are_the_ones_asked_for(warmup):
    sleeper = Sleeper(0.0)
    td.measure_latency(sleeper, torch.randn(1, 2), runs=3, warmup=warmup)
    assert len(sleeper.seen) == 3 + warmup  # a model already warm is timed from its first call


def test_measure_latency_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    before = [p.clone() for p in model.parameters()]
    latency = td.measure_latency(model, torch.randn(2, 4), dtype="bfloat16", runs=5, threads=1)
    assert latency.dtype == "bfloat16"
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.get_num_threads() >= 1


def test_a_comparison_ratio_is_the_median_of_per_round_ratios():
    comparison = td.compare_latency(
        {"fast": Sleeper(0.002), "slow": Sleeper(0.006)}, torch.randn(1, 2), runs=7, warmup=1
    )
    pairs = zip(comparison.latencies["slow"].times_ms, comparison.latencies["fast"].times_ms)
    assert comparison.ratio("slow", "fast") == pytest.approx(float(np.median([a / b for a, b in pairs])))
    assert comparison.ratio("slow", "fast") > 1.5  # slept three times as long
    assert "x" in comparison.table("fast").splitlines()[1]


def test_a_dag_is_timed_on_its_own_example_inputs(plain):
    dag, _ = plain
    assert td.measure_latency(dag, runs=5).median_ms > 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="page faults of glibc's malloc")
def test_page_faults_are_counted_and_a_steady_allocator_removes_them():
    """A fresh 64 MiB activation per call: glibc maps it anew each time (over its 32 MiB mmap ceiling)
    and the timing warns; after `steady_allocator()` the memory stays in the process. In a subprocess:
    the allocator setting is for the whole process, for good."""
    script = textwrap.dedent(
        """
        import warnings, torch, torch_dag as td
        big = lambda x: torch.ones(16 * 2**20) + x
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before = td.measure_latency(big, torch.zeros(1), runs=5)
        assert before.page_faults >= 16 * 2**20 * 4 // 4096 // 2, before
        assert any("steady_allocator" in str(w.message) for w in caught), caught
        assert "page faults per call" in str(before)
        assert td.steady_allocator()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            after = td.measure_latency(big, torch.zeros(1), runs=5)
        assert after.page_faults < 100, after
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_unknown_dtype_is_named():
    with pytest.raises(td.DagError, match="float8"):
        td.measure_latency(nn.Identity(), torch.randn(1), dtype="float8")


def hand_table() -> LatencyTable:
    """Two groups; a bilinear vertex between them, a curve vertex on the second, a fixed one."""
    groups = [GroupInfo("a", 8, 1, True), GroupInfo("b", 4, 2, True), GroupInfo("c", 3, 1, False)]
    vertices = [
        VertexCost("conv", "Conv2d", (1.0, 2.0, 3.0, 4.0), {"a": 8}, {"b": 4}),
        VertexCost(
            "relu", "ReLU", (0.0, 0.0, 0.0, 0.0), {"b": 4}, {"b": 4}, "writes", ((0.5, 1.0), (2.0, 6.0))
        ),
        VertexCost("head", "Linear", (5.0, 0.0, 0.0, 0.0), {"c": 3}, {}),
    ]
    return LatencyTable(
        "cpu: test", "cpu", "2", "float32", 1, 1, 8, "heads", groups, vertices, 2.0, 10.0, 0.0
    )


def test_a_table_predicts_by_its_formula():
    table = hand_table()
    # full: conv 1+2+3+4 = 10, relu 6, head 5 -> 2 x 21 + 10
    assert table.predict() == pytest.approx(52.0)
    # a at 4 of 8 channels (0.5), b at 0.75: conv 1 + 1 + 2.25 + 1.5 = 5.75, relu 2 + 4 x 0.5 = 4
    assert table.predict({"a": 4, "b": 0.75}) == pytest.approx(2 * (5.75 + 4.0 + 5.0) + 10.0)
    # below the curve's knots: its first segment extended (0.25 -> 0), clipped at zero further down
    assert table.per_vertex(np.array([1.0, 0.25, 1.0, 1.0]))["relu"] == pytest.approx(0.0)
    assert table.per_vertex(np.array([1.0, 0.125, 1.0, 1.0]))["relu"] == 0.0


def test_a_table_refuses_widths_it_cannot_take():
    table = hand_table()
    with pytest.raises(td.DagError, match="no channel group 'z'"):
        table.predict({"z": 1})
    with pytest.raises(td.DagError, match="fixed"):
        table.predict({"c": 2})
    with pytest.raises(td.DagError, match="outside"):
        table.predict({"a": 9})


def test_a_built_table_saves_loads_and_predicts_the_same(table, tmp_path):
    path = tmp_path / "model.latency.json"
    table.save(path)
    loaded = LatencyTable.load(path)
    assert loaded.predict() == pytest.approx(table.predict())
    half = {g.key: 0.5 for g in table.prunable}
    assert loaded.predict(half) == pytest.approx(table.predict(half))
    assert loaded.batch_size == 2 and loaded.device.startswith("cpu") and loaded.round_to == 4
    assert len(table.fit["probes_measured_us"]) == 4 and table.measured_us > 0


def test_a_table_reads_the_dag_it_was_built_on(plain, table):
    dag, x = plain
    prep = prepare(dag, (x,))
    groups = channel_groups(prep.dag, prep.example_inputs)
    assert table.cost_model(groups).ratio(np.zeros(groups.size, dtype=bool)) == pytest.approx(1.0)
    other = td.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), (x,))
    prep = prepare(other, (x,))
    with pytest.raises(td.DagError, match="another DAG"):
        table.cost_model(channel_groups(prep.dag, prep.example_inputs))


def test_not_a_table_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(td.DagError, match="not a torch-dag latency table"):
        LatencyTable.load(path)


@pytest.mark.slow
def test_prune_to_a_latency_ratio_reports_predicted_and_measured(plain, table):
    dag, x = plain
    pruned, report = td.prune(dag, None, (x,), latency_ratio=0.6, latency_table=table, return_report=True)
    assert report.measure == "latency" and report.predicted is not None and report.measured_ms is not None
    assert report.round_to in (4, 2, 1)  # the table's, or finer where it could not reach the target
    assert "measured" in str(report) and "predicted" in str(report)
    assert pruned(x).shape == (1, 10)
    td.verify(pruned)


def test_a_latency_target_needs_a_table_and_a_table_a_latency_target(plain, table):
    dag, x = plain
    with pytest.raises(td.DagError, match="needs a latency table"):
        td.prune(dag, None, (x,), latency_ratio=0.5)
    with pytest.raises(td.DagError, match="latency target"):
        td.prune(dag, 0.5, (x,), latency_table=table)
    with pytest.raises(td.DagError, match="attention"):
        td.prune(
            dag, None, (x,), latency_ratio=0.5, latency_table=table, config=PruneConfig(attention="head_dim")
        )


def test_rounding_defaults_to_eight_without_a_table(plain):
    dag, x = plain
    _, report = td.prune(dag, 0.5, (x,), return_report=True)
    assert report.round_to in (8, 4, 2, 1)  # 8, or finer where 8 could not reach the target (warned)
    _, report = td.prune(dag, 0.5, (x,), config=PruneConfig(round_to=4), return_report=True)
    assert report.round_to in (4, 2, 1)


def test_a_probe_whose_vertices_disagree_with_its_whole_time_is_timed_again():
    """Probe 0's vertices were timed in a fast moment (their sum half its whole time, where the other
    probes agree within 5 %): it is timed again and the agreeing timing kept; the others are not."""

    def timing(vertex_us: float, whole_us: float, ratio: float = 1.0):
        return (np.ones(2), {"a": vertex_us / 2, "b": vertex_us / 2}, ratio, whole_us)

    timings = [
        timing(50.0, 100.0),
        timing(52.0, 100.0, 0.5),
        timing(77.0, 100.0, 0.8),
        timing(29.0, 100.0, 0.3),
    ]
    again = {0: timing(98.0, 100.0)}
    asked = []

    def timed(index):
        asked.append(index)
        return again[index]

    assert build._retime_outliers(timings, timed) == [0] and asked == [0]
    assert timings[0] == again[0]
    consistent = [timing(100.0, 100.0), timing(50.0, 100.0, 0.5)]
    assert build._retime_outliers(consistent, timed) == [] and asked == [0]


@pytest.mark.slow
def test_the_rounding_chosen_is_the_narrowest_near_the_best_cost_per_flop(plain):
    dag, x = plain
    table = td.latency_table(dag, (x,), probes=2, repeats=1)
    cost = {int(r): c for r, c in table.fit["rounding"]["ms_per_gflop"].items()}
    assert set(cost) == {1, 2, 4, 8}  # a quarter of the 32-channel groups at most
    best = min(cost.values())
    assert cost[table.round_to] <= (1 + WITHIN) * best
    assert all(cost[r] > (1 + WITHIN) * best for r in cost if r < table.round_to)


def test_a_table_times_more_probes_where_a_pass_is_short():
    short, long = (
        build.Effort.for_pass(0.01, None, None),
        build.Effort.for_pass(build.LONG_PASS_S, None, None),
    )
    assert (short.probes, long.probes) == (20, 10)  # long passes dominate a build: fewer, quieter
    assert long.warmup == 0 < short.warmup
    given = build.Effort.for_pass(build.LONG_PASS_S, 3, 4)
    assert (given.probes, given.repeats) == (3, 4)  # what is given is kept


def test_roundings_tried_go_by_where_the_channels_are():
    """Many narrow groups (squeeze-excitation bottlenecks) hold few channels: the wide groups, where the
    channels and the time are, decide how coarse a rounding is worth timing."""
    assert candidates([8] * 30 + [256, 512, 1024]) == [1, 2, 4, 8, 16, 32]
    assert candidates([16, 16, 16]) == [1, 2, 4]
    assert candidates([3]) == candidates([]) == [1]
