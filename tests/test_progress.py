"""Progress: a tqdm bar on a terminal; plain lines (no carriage returns) in logs and CI."""

from __future__ import annotations

import io

import torch
from torch import nn
from tqdm import tqdm

import torch_dag as td
from torch_dag.core.progress import LineProgress, show_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_about_every_tenth_of_the_way_and_at_the_end():
    out = io.StringIO()
    bar = LineProgress(total=95, desc="prune", unit="try", file=out)
    for step in range(95):
        bar.set_postfix(step=step)
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split()[1] for line in lines] == [
        f"{n}/95" for n in (9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 95)
    ]
    assert lines[-1].startswith("prune: 95/95 try (100%) in ") and lines[-1].endswith(", step=94")


def test_iterating_reports_every_item_and_closes():
    out = io.StringIO()
    assert list(LineProgress(range(3), desc="levels", file=out)) == [0, 1, 2]
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]


def test_without_a_total_lines_come_by_time_and_at_the_end():
    out = io.StringIO()
    bar = LineProgress(desc="finetune", unit="step", file=out)
    for _ in range(50):
        bar.update()
    assert out.getvalue() == ""  # well under the 10 s between lines
    bar.close()
    assert out.getvalue().startswith("finetune: 50 step in ")


def test_disabled_prints_nothing(capsys):
    assert list(show_progress(range(5), desc="quiet", disable=True)) == list(range(5))
    assert capsys.readouterr().err == ""


def test_a_bar_on_a_terminal_lines_elsewhere(monkeypatch):
    monkeypatch.setattr("sys.stderr", Terminal())
    bar = show_progress(total=3, desc="on a terminal")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(show_progress(total=3, desc="in a log"), LineProgress)


def test_the_toolkit_prints_lines_when_stderr_is_not_a_terminal(capsys):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    dag = td.build_from_unstructured_module(net, (x,))
    td.prune(dag, 0.5, (x,), config=td.pruning.PruneConfig(round_to=2), calibration=[(x,)], progress=True)
    td.factorize(dag, rank_ratio=0.5, calibration=[(x,)] * 2, example_inputs=(x,), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    for prefix in ("prune: 1/", "factorize: calibration: ", "factorize: spectra: "):
        assert any(line.startswith(prefix) for line in lines), (prefix, err)
