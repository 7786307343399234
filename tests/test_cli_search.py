"""`torch-dag search`: the front as a table, the PNG plot, the best sub-network saved as scored, and the
refusals (no mutables, no matplotlib for -o)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import torch_dag as td
from tests.test_nas_search import Idioms, searchable
from torch_dag.cli import main


@pytest.fixture
def files(tmp_path):
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    td.save(sdag, tmp_path / "s.dag")
    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "x.npy", torch.randn(48, 3, 12, 12, generator=g).numpy())
    np.save(tmp_path / "y.npy", torch.randint(0, 10, (48,), generator=g).numpy())
    return tmp_path


def search(files, *options: str) -> None:
    main(
        [
            "search",
            str(files / "s.dag"),
            "--flops-ratio",
            "0.5",
            "--data",
            str(files / "x.npy"),
            "--calibration-samples",
            "16",
            "--batch-size",
            "16",
            "--budget",
            "4",
            "--population",
            "2",
            "-q",
            *options,
        ]
    )


@pytest.mark.slow
def test_search_prints_the_front_plots_it_and_saves_the_best_as_scored(files, capsys):
    search(
        files,
        "--labels",
        str(files / "y.npy"),
        "-o",
        str(files / "f.png"),
        "--save-best",
        str(files / "b.dag"),
    )
    out = capsys.readouterr().out
    assert "Pareto front:" in out and "flops_ratio" in out and "accuracy" in out
    assert (files / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    choice = json.loads(out.split("choice: ")[1].splitlines()[0])
    score = float(out.split("best: ")[1].splitlines()[0].split("accuracy ")[1])
    best = td.load(files / "b.dag")
    assert not any(td.nas.is_mutable(v.module) or td.flex.is_flex(v.module) for v in best)

    sdag = td.load(files / "s.dag")  # the oracle: export, recalibrate on the first 16 samples, score the rest
    x, y = torch.from_numpy(np.load(files / "x.npy")), torch.from_numpy(np.load(files / "y.npy"))
    expected = td.nas.export_subnet(sdag, choice)
    td.recalibrate_batchnorm(expected, [x[:16]])
    with torch.no_grad():
        torch.testing.assert_close(best.eval()(x), expected.eval()(x))
        accuracy = float((best(x[16:]).argmax(1) == y[16:]).float().mean())
    assert score == pytest.approx(accuracy, abs=1e-4)
    flops = td.count_flops(best, x[:1]).total_flops
    full = td.count_flops(td.nas.export_subnet(sdag, td.nas.largest(sdag)), x[:1]).total_flops
    assert flops <= 0.5 * full


@pytest.mark.slow
def test_without_labels_the_score_is_minus_the_distillation_loss(files, capsys):
    search(files)
    out = capsys.readouterr().out
    assert "-distillation loss" in out
    assert float(out.split("best: ")[1].splitlines()[0].split("-distillation loss ")[1]) <= 0


def test_refusals_are_one_line_with_exit_status_2(files, capsys, monkeypatch):
    plain = td.build_from_unstructured_module(Idioms().eval(), (torch.randn(1, 3, 12, 12),))
    td.save(plain, files / "plain.dag")
    with pytest.raises(SystemExit) as stop:
        main(["search", str(files / "plain.dag"), "--flops-ratio", "0.5", "--data", str(files / "x.npy")])
    assert stop.value.code == 2 and "has no mutables" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    with pytest.raises(SystemExit) as stop:
        search(files, "-o", str(files / "f.png"))
    assert stop.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err
    assert not (files / "f.png").exists()
