"""`torch-dag train-prune`: a .dag and a .npy of inputs in, a smaller .dag out at the target, the table
printed; mistakes refused on one line with exit status 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_dag as td
from tests.zoo import make
from torch_dag.cli import main


def _files(tmp_path, labels: bool = False):
    model, inputs = make("residual")
    dag = td.build_from_unstructured_module(model, inputs)
    td.save(dag, tmp_path / "model.dag")
    data = torch.randn(8, *inputs[0].shape[1:]).numpy()
    np.save(tmp_path / "batches.npy", data)
    if labels:
        np.save(tmp_path / "labels.npy", np.arange(8) % 10)
    return dag, inputs


@pytest.mark.parametrize("method", [pytest.param("gates", marks=pytest.mark.slow), "group_lasso"])
def test_train_prune_writes_a_smaller_dag_at_the_target(tmp_path, capsys, method):
    dag, inputs = _files(tmp_path, labels=True)
    out = tmp_path / "out.dag"
    main(
        ["train-prune", str(tmp_path / "model.dag"), "--data", str(tmp_path / "batches.npy"), "--labels",
         str(tmp_path / "labels.npy"), "--flops-ratio", "0.5", "--steps", "3", "--batch-size", "4",
         "--method", method, "--report", "-q", "-o", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert f"train-prune ({method}): 3 steps" in printed and "layers: channels" in printed
    pruned = td.load(out)
    ratio = td.count_flops(pruned, *inputs).total_flops / td.count_flops(dag, *inputs).total_flops
    assert abs(ratio - 0.5) <= 0.02
    assert not any(v.op == "Gate" for v in pruned)
    with torch.no_grad():
        assert torch.isfinite(pruned(*inputs)).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "9"], "fewer than one batch"),
        (["--latency-ratio", "0.5"], "not allowed with argument"),
        (["--steps", "0"], "--steps"),
        (["--method", "lasso"], "--method"),
    ],
)
def test_mistakes_are_refused_on_one_line(tmp_path, capsys, extra, message):
    _files(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(
            ["train-prune", str(tmp_path / "model.dag"), "--data", str(tmp_path / "batches.npy"),
             "--flops-ratio", "0.5", "-q", "-o", str(tmp_path / "out.dag"), *extra]
        )  # fmt: skip
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
