"""`torch-dag bench`, `latency-table` and `prune --latency-ratio` on a small saved DAG: the figures printed
are those of the comparison and the table they come from, the table saved loads and predicts, and user
mistakes are one line and exit status 2."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch

import torch_dag as td
from tests import zoo
from torch_dag.cli import build_parser, main
from torch_dag.cli import latency as cli_latency
from torch_dag.latency import LatencyTable


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A small residual net as a .dag file, and the same net pruned to half its FLOPs."""
    root = tmp_path_factory.mktemp("cli_latency")
    model, inputs = zoo.make("residual")
    dag = td.build_from_unstructured_module(model, inputs)
    td.save(dag, root / "net.dag")
    td.save(td.prune(dag, 0.5, inputs), root / "half.dag")
    return {"root": root, "dag": root / "net.dag", "half": root / "half.dag"}


@pytest.fixture(scope="module")
def built(saved, tmp_path_factory) -> tuple[Path, str]:
    """`latency-table` run once with its default path (the rounding given: choosing it is slow): the path
    and what it printed."""
    path = saved["dag"].with_name("net.latency-cpu-float32-b2.json")
    out = _run(["latency-table", str(saved["dag"]), "--probes", "2", "--round-to", "8", "-q"])
    return path, out


def _run(argv: list[str]) -> str:
    """Run the command line in-process and return what it printed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(argv)
    return buffer.getvalue()


def _captured_comparisons(monkeypatch) -> list:
    """Every `compare_latency` result the command line computes, as it returned them."""
    results = []

    def recording(*args, **kwargs):
        result = cli_latency_compare(*args, **kwargs)
        results.append(result)
        return result

    cli_latency_compare = cli_latency.compare_latency
    monkeypatch.setattr(cli_latency, "compare_latency", recording)
    return results


def test_bench_one_model_prints_its_latency_line(saved, monkeypatch):
    results = _captured_comparisons(monkeypatch)
    out = _run(["bench", str(saved["dag"]), "--runs", "5", "--batch-size", "3"])
    (comparison,) = results
    latency = comparison.latencies[str(saved["dag"])]
    assert out == f"{saved['dag']}  {latency}\n"
    assert latency.runs == 5 and latency.batch_size == 3 and latency.dtype == "float32"
    assert "quartiles" in out and "5 runs, batch 3, float32, cpu" in out and " threads)" in out


def test_bench_two_models_prints_the_ratio_of_the_same_comparison(saved, monkeypatch):
    results = _captured_comparisons(monkeypatch)
    out = _run(["bench", str(saved["dag"]), str(saved["half"]), "--runs", "5", "--threads", "1"])
    (comparison,) = results
    first, second = str(saved["dag"]), str(saved["half"])
    lines = out.splitlines()
    assert lines[0] == f"{first:<{len(second)}s}  {comparison.latencies[first]}"
    assert lines[1] == f"{second}  {comparison.latencies[second]}"
    ratio = comparison.ratio(second, first)
    assert lines[2].startswith(f"{second} / {first}: {ratio:.3f} (median of the 5 per-round ratios")
    per_round = [
        b / a for a, b in zip(comparison.latencies[first].times_ms, comparison.latencies[second].times_ms)
    ]
    assert min(per_round) <= ratio <= max(per_round)
    assert "1 threads" in lines[0] and "batch 2" in lines[0]  # the DAG's own batch, stated


def test_latency_table_is_saved_beside_the_model_and_loads(saved, built):
    path, out = built
    assert path == cli_latency.table_path(str(saved["dag"]), "cpu", "float32", 2)
    table = LatencyTable.load(path)
    assert table.device_type == "cpu" and table.dtype == "float32" and table.batch_size == 2
    assert out.splitlines()[0] == f"{table}; saved to {path}"
    measured, predicted = table.fit["probes_measured_us"], table.fit["probes_predicted_us"]
    assert len(measured) == len(predicted) == 2
    pairs = ", ".join(f"{m / 1e3:.3f}/{p / 1e3:.3f}" for m, p in zip(measured, predicted))
    assert "fit on its 2 probes (in sample): median error " in out and pairs in out
    assert table.round_to == 8 and "widths rounded to multiples of 8: given" in out
    assert re.search(r"built in \d+\.\d s", out)
    full = table.predict()
    assert full > 0
    widths = {g.key: g.classes * g.unit for g in table.groups}
    assert table.predict(widths) == pytest.approx(full)  # every group at its full width is the model
    halves = {g.key: g.classes * g.unit // 2 for g in table.prunable}  # in channels, then as fractions
    narrower = table.predict(halves)
    assert narrower > 0
    assert table.predict({key: width / widths[key] for key, width in halves.items()}) == pytest.approx(
        narrower
    )


@pytest.mark.slow
def test_latency_table_chooses_the_rounding_and_prints_its_evidence(saved, tmp_path):
    path = tmp_path / "t.json"
    out = _run(["latency-table", str(saved["dag"]), "-o", str(path), "--probes", "2", "-q"])
    table = LatencyTable.load(path)
    assert out.splitlines()[0] == f"{table}; saved to {path}"
    evidence = table.fit["rounding"]
    if "reason" in evidence:  # nothing to time on this model
        assert f"widths rounded to multiples of {table.round_to}: {evidence['reason']}" in out
    else:
        assert f"widths rounded to multiples of {table.round_to}, chosen on timings: " in out
        assert all(key.replace("_", " ") in out for key in evidence)


def test_table_path_rule():
    assert cli_latency.table_path("a/net.dag", "cuda:1", "bfloat16", 64) == Path(
        "a/net.latency-cuda-bfloat16-b64.json"
    )
    assert cli_latency.table_path("timm:resnet50", "cpu", "float32", 1, (3, 160, 160)) == Path(
        "timm_resnet50.latency-cpu-float32-b1-3x160x160.json"
    )


BAD = [
    ("bench {dag} --dtype float8", "argument --dtype: invalid choice: 'float8'"),
    ("bench {dag} --device nosuch", "argument --device: expected a device like cpu, cuda or cuda:1"),
    ("bench {dag} --runs 0", "argument --runs: expected an integer >= 1, got '0'"),
    ("bench {dag} --threads 0", "argument --threads: expected an integer >= 1, got '0'"),
    ("bench {root}/missing.dag", "MODEL {root}/missing.dag: no such file"),
    ("bench {dag} {root}/missing.dag", "OTHER {root}/missing.dag: no such file"),
    ("bench {dag} {dag} --input-size 5x8x8", "--input-size 5x8x8 (5x8x8 per sample): the model cannot run"),
    ("latency-table {dag} --probes 1", "argument --probes: expected an integer >= 2, got '1'"),
    ("latency-table {dag} --dtype int8", "argument --dtype: invalid choice: 'int8'"),
    ("latency-table {root}/missing.dag", "MODEL {root}/missing.dag: no such file"),
    ("latency-table {dag} -o {root}", "-o/--output {root} is a folder"),
]


@pytest.mark.parametrize(("line", "expected"), BAD, ids=[line for line, _ in BAD])
def test_a_bad_command_line_is_one_line_and_status_2(line, expected, saved, capsys):
    files = {"root": saved["root"], "dag": saved["dag"]}
    before = sorted(p.name for p in saved["root"].iterdir())
    with pytest.raises(SystemExit) as info:
        main(line.format(**files).split())
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("torch-dag") and ": error: " in err, err
    assert expected.format(**files) in err
    assert sorted(p.name for p in saved["root"].iterdir()) == before, "nothing written"


def _foreign_table(built, tmp_path) -> Path:
    """The saved table with one channel group renamed: a table of another DAG."""
    table = LatencyTable.load(built[0])
    key = table.prunable[0].key
    table.groups = [replace(g, key="elsewhere") if g.key == key else g for g in table.groups]
    table.vertices = [
        replace(v, reads=_renamed(v.reads, key), writes=_renamed(v.writes, key)) for v in table.vertices
    ]
    path = tmp_path / "foreign.json"
    LatencyTable(**{f.name: getattr(table, f.name) for f in fields(table)}).save(path)
    return path


def _renamed(counts: dict[str, int], key: str) -> dict[str, int]:
    return {("elsewhere" if k == key else k): n for k, n in counts.items()}


PRUNE = "prune {dag} --latency-ratio 0.6 -o {root}/out.dag -q"
BAD_PRUNE = [
    (PRUNE + " --latency-table {root}/missing.json", "--latency-table {root}/missing.json: no such file"),
    (PRUNE + " --latency-table {dag}", "cannot read a latency table from {dag}"),
    (PRUNE + " --latency-table {table} --latency-batch 5", "built for batch 2, but this run asks for 5"),
    (PRUNE + " --latency-table {table} --dtype bfloat16", "built for dtype float32, but this run asks for"),
    (PRUNE + " --latency-table {foreign}", "this latency table was built on another DAG"),
    (PRUNE + " --dtype half", "argument --dtype: invalid choice: 'half'"),
    (PRUNE + " --latency-batch 0", "argument --latency-batch: expected an integer >= 1, got '0'"),
    ("prune {dag} --latency-ratio 1.5 -o {root}/out.dag", "--latency-ratio: expected a finite number > 0"),
    ("prune {dag} --latency-ratio 0.5 --flops-ratio 0.5 -o {root}/out.dag", "not allowed with argument"),
]


@pytest.mark.parametrize(("line", "expected"), BAD_PRUNE, ids=[line for line, _ in BAD_PRUNE])
def test_a_bad_latency_prune_is_one_line_and_status_2(line, expected, saved, built, tmp_path, capsys):
    files = {
        "root": tmp_path,
        "dag": saved["dag"],
        "table": built[0],
        "foreign": _foreign_table(built, tmp_path),
    }
    with pytest.raises(SystemExit) as info:
        main(line.format(**files).split())
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("torch-dag prune: error: "), err
    assert expected.format(**files) in err
    assert not (tmp_path / "out.dag").exists()


def test_prune_reads_the_default_table_when_it_is_there(saved, built, tmp_path, capsys):
    dag_path = tmp_path / "net.dag"
    shutil.copy(saved["dag"], dag_path)
    default = cli_latency.table_path(str(dag_path), "cpu", "float32", 2)
    shutil.copy(built[0], default)
    args = build_parser().parse_args(["prune", str(dag_path), "--latency-ratio", "0.5", "-o", "o.dag"])
    dag = td.load(dag_path)
    table, path = cli_latency.table_for_prune(args, dag, dag.example_inputs())
    assert path == default
    assert capsys.readouterr().out == ""  # nothing built
    assert asdict(table) == asdict(LatencyTable.load(built[0]))


@pytest.mark.slow
def test_prune_to_a_latency_ratio_builds_the_table_and_prints_predicted_and_measured(
    saved, tmp_path, monkeypatch
):
    dag_path = tmp_path / "net.dag"
    shutil.copy(saved["dag"], dag_path)
    reports = []
    prune = td.pruning.prune

    def recording(*args, **kwargs):
        pruned, report = prune(*args, **kwargs)
        reports.append(report)
        return pruned, report

    monkeypatch.setattr(td.pruning, "prune", recording)
    out = _run(["prune", str(dag_path), "--latency-ratio", "0.6", "-o", str(tmp_path / "out.dag"), "-q"])
    default = cli_latency.table_path(str(dag_path), "cpu", "float32", 2)
    assert out.startswith(f"no latency table at {default}: building one")
    table = LatencyTable.load(default)
    (report,) = reports
    assert report.measure == "latency" and report.predicted is not None and report.measured_ms is not None
    before, after = report.measured_ms
    assert f"latency (ms) {before:10.3f} {after:10.3f} {after / before:7.3f}" in out
    assert f"latency ratio {report.reached:.3f} measured" in out
    assert f"{report.predicted:.3f} predicted by the table (target 0.600)" in out
    assert f"batch {table.batch_size}" in out
    rounded = f"widths rounded to multiples of {report.round_to} where a group is that wide"
    assert rounded in out
    if report.round_to == table.round_to:
        assert "the rounding the latency table found fastest on its device" in out
    else:
        assert f"{table.round_to} could not reach the target" in out
    pruned = td.load(tmp_path / "out.dag")
    flops = td.count_flops(pruned, *pruned.example_inputs()).total_flops
    full = td.count_flops(td.load(dag_path), *pruned.example_inputs()).total_flops
    assert f"to {flops / full:.1%} of its FLOPs" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_this_machine_lacks_is_refused_before_any_work(saved, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", str(saved["dag"]), "--device", "cuda"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "argument --device: 'cuda': this machine has 0 CUDA devices; use cpu" in err
