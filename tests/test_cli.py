"""The command line: convert a timm model or a user factory to a .dag file, then describe it with `info`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torch_dag as td
from torch_dag.cli import main

FACTORY_MODULE = textwrap.dedent(
    '''
    """A user's own models, importable as `mypkg`."""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean((2, 3)))


    def factory():
        torch.manual_seed(0)
        return Net()


    def not_a_model():
        return "a string"
    '''
)


@pytest.fixture
def mypkg(tmp_path, monkeypatch):
    """A module `mypkg` on sys.path for this test only."""
    (tmp_path / "mypkg.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("mypkg", None)


@pytest.fixture(scope="module")
def resnet_dag(tmp_path_factory) -> Path:
    pytest.importorskip("timm")
    path = tmp_path_factory.mktemp("cli") / "r.dag"
    main(["convert", "timm:resnet18", "--input-size", "3x64x64", "-o", str(path), "-q"])
    return path


def test_convert_timm_writes_a_loadable_file(resnet_dag):
    dag = td.load(resnet_dag)
    td.verify(dag)
    (x,) = dag.example_inputs()
    assert tuple(x.shape) == (1, 3, 64, 64)
    assert dag(x).shape == (1, 1000)


def test_convert_reports_what_it_did(tmp_path, capsys):
    pytest.importorskip("timm")
    path = tmp_path / "sub" / "r.dag"
    main(["convert", "timm:resnet18", "--input-size", "3x32x32", "--batch", "2", "-o", str(path), "-q"])
    out, err = capsys.readouterr()
    dag = td.load(path)
    assert out.startswith(f"timm:resnet18: {len(dag)} vertices, converted in ")
    assert f"saved to {path}" in out
    assert err == ""  # -q: no progress bar
    (x,) = dag.example_inputs()
    assert tuple(x.shape) == (2, 3, 32, 32)


def test_info_prints_params_flops_kmapp_and_ops(resnet_dag, capsys):
    main(["info", str(resnet_dag)])
    out = capsys.readouterr().out
    dag = td.load(resnet_dag)
    report = td.count_flops(dag, *dag.example_inputs())
    assert report.total_params == sum(p.numel() for p in dag.parameters())
    assert f"params: {report.total_params / 1e6:.3f} M" in out
    assert f"FLOPs: {report.total_flops / 1e9:.3f} G (batch 1)" in out
    assert f"kmapp: {report.kmapp:.2f}" in out
    assert f"{resnet_dag}  (inputs x: 1x3x64x64)" in out
    histogram = report.op_histogram()
    assert histogram["Conv2d"] == 20
    for op, count in histogram.items():
        assert f"{op} x{count}" in out


def test_info_at_another_input_size(resnet_dag, capsys):
    main(["info", str(resnet_dag), "--input-size", "3x32x32", "--top", "2"])
    out = capsys.readouterr().out
    dag = td.load(resnet_dag)
    report = td.count_flops(dag, torch.randn(1, 3, 32, 32))
    assert f"FLOPs: {report.total_flops / 1e9:.3f} G" in out
    assert f"kmapp: {report.kmapp:.2f}" in out
    assert "(inputs x: 1x3x32x32)" in out
    assert "top 2 vertices by FLOPs:" in out


def test_info_on_a_missing_file_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["info", str(tmp_path / "missing.dag")])
    assert info.value.code == 2
    assert (
        capsys.readouterr().err
        == f"torch-dag info: error: the .dag file {tmp_path / 'missing.dag'}: no such file\n"
    )


def test_convert_a_module_factory(mypkg, capsys):
    path = mypkg / "net.dag"
    main(["convert", "mypkg:factory", "--input-size", "3x8x8", "-o", str(path), "-q"])
    assert "mypkg:factory:" in capsys.readouterr().out
    import mypkg as user_models

    model = user_models.factory().eval()
    dag = td.load(path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(dag(x), model(x))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet18", "must be 'timm:NAME' or 'package.module:factory'"),
        ("timm:", "must be 'timm:NAME'"),
        ("mypkg:nope", "mypkg has no attribute 'nope'"),
        ("mypkg:not_a_model", "returned str, not an nn.Module"),
        ("no_such_pkg_for_torch_dag:f", "no_such_pkg_for_torch_dag"),
        ("timm:no_such_model", "no_such_model"),
    ],
)
def test_bad_model_spec_exits_with_a_message(mypkg, spec, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", spec, "--input-size", "3x8x8", "-o", str(mypkg / "x.dag"), "-q"])
    assert info.value.code == 2, "a usage error, not a traceback"
    err = capsys.readouterr().err
    assert err.startswith("torch-dag convert: error: ") and err.count("\n") == 1
    assert message in err
    assert not (mypkg / "x.dag").exists()


def test_factory_model_without_input_size_gets_inferred_inputs(mypkg, capsys):
    main(["convert", "mypkg:factory", "-o", str(mypkg / "x.dag"), "-q"])
    dag = td.load(mypkg / "x.dag")
    assert dag.input_meta["x"]["shape"] == [1, 3, 224, 224] and dag.input_meta["x"]["inferred"] is True
    capsys.readouterr()
    main(["info", str(mypkg / "x.dag")])
    assert "inferred" in capsys.readouterr().out


def test_a_model_that_does_not_tell_its_input_size_asks_for_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", "torch.nn:Identity", "-o", str(tmp_path / "x.dag"), "-q"])
    assert info.value.code == 2
    assert "pass --input-size, e.g. 3x224x224" in capsys.readouterr().err


def test_bad_input_size_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", "timm:resnet18", "--input-size", "3xax4", "-o", str(tmp_path / "x.dag")])
    assert info.value.code == 2
    assert "expected sizes like 3x224x224, got '3xax4'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_in_a_subprocess(tmp_path):
    pytest.importorskip("timm")
    path = tmp_path / "r.dag"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch_dag.cli",
            "convert",
            "timm:resnet18",
            "--input-size",
            "3x64x64",
            "-o",
            str(path),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("timm:resnet18: ")
    dag = td.load(path)
    (x,) = dag.example_inputs()
    assert dag(x).shape == (1, 1000)


@pytest.mark.slow
def test_bad_spec_in_a_subprocess_exits_non_zero(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch_dag.cli", "convert", "resnet18", "-o", str(tmp_path / "x.dag")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2
    assert "must be 'timm:NAME' or 'package.module:factory'" in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.fixture
def convs_dag(tmp_path) -> tuple[Path, td.DagModule]:
    """Three convs saved as a .dag: two prunable groups and the output's group, fixed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 4, 1),
    )
    dag = td.build_from_unstructured_module(model.eval(), (torch.randn(1, 3, 16, 16),))
    return td.save(dag, tmp_path / "convs.dag"), dag


def test_prune_report_prints_every_group_and_layer(convs_dag, tmp_path, capsys):
    path, dag = convs_dag
    out = tmp_path / "half.dag"
    main(["prune", str(path), "--flops-ratio", "0.5", "--report", "-q", "-o", str(out)])
    printed = capsys.readouterr().out
    (x,) = dag.example_inputs()
    pruned, report = td.prune(dag, 0.5, (x,), return_report=True)  # the oracle: the API's own report
    assert td.pruning.group_table(report.group_rows, "FLOPs") in printed
    assert td.pruning.layer_table(report.layer_rows) in printed
    assert "fixed: a DAG output keeps its shape" in printed
    assert [row.vertex for row in report.layer_rows] == ["_0", "_2", "_4"]
    assert td.load(out).state_dict().keys() == pruned.state_dict().keys()
    main(["prune", str(path), "--flops-ratio", "0.5", "-q", "-o", str(out)])
    assert "layers: channels (in, out)" not in capsys.readouterr().out  # the tables only with --report


def test_prune_says_why_a_target_was_missed(convs_dag, tmp_path, capsys):
    path, _ = convs_dag
    small = tmp_path / "small.dag"  # 8 of 16 channels at least: about 0.3 of the params at most
    main(["prune", str(path), "--params-ratio", "0.1", "--min-channels", "8", "-q", "-o", str(small)])
    printed = capsys.readouterr().out
    assert "  target missed: the params ratio reached is " in printed
    assert "_4 (4 channels" in printed and "a DAG output keeps its shape" in printed


def test_prune_protect_of_an_unknown_vertex_is_an_error(convs_dag, tmp_path, capsys):
    path, _ = convs_dag
    with pytest.raises(SystemExit) as info:
        main(
            [
                "prune",
                str(path),
                "--flops-ratio",
                "0.5",
                "--protect",
                "_3x",
                "-q",
                "-o",
                str(tmp_path / "p.dag"),
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("torch-dag prune: error: protected: no vertex named '_3x'") and "closest '_3'" in err
    )
    assert not (tmp_path / "p.dag").exists()


def test_info_groups_lists_the_groups_and_why_fixed_ones_are(convs_dag, capsys):
    path, dag = convs_dag
    main(["info", str(path), "--groups"])
    printed = capsys.readouterr().out
    inputs = dag.example_inputs()
    groups = td.pruning.channel_groups(dag, inputs)
    expected = td.pruning.group_table(td.pruning.group_rows(groups, td.count_flops(dag, *inputs)))
    assert expected in printed
    assert "fixed: a DAG output keeps its shape" in printed and "prunable" in printed
    main(["info", str(path)])
    assert "channel groups" not in capsys.readouterr().out


def test_info_prints_the_recorded_inputs_and_marks_inferred_ones(convs_dag, tmp_path, capsys):
    path, dag = convs_dag
    main(["info", str(path)])
    printed = capsys.readouterr().out
    assert "  input input: 1x3x16x16 float32\n" in printed and "inferred" not in printed
    dag.input_meta["input"] = {**dag.input_meta["input"], "inferred": True}
    inferred = td.save(dag, tmp_path / "inferred.dag")
    main(["info", str(inferred)])
    assert (
        "  input input: 1x3x16x16 float32 [inferred from the model's first layer: " in capsys.readouterr().out
    )
