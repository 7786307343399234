"""`td.train_prune` as a training run: the gates learn the budget, checkpoints resume to the same result
as an uninterrupted run, a latency table's prediction drives the budget, timm models prune, and bad
settings are refused with what to do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_dag as td
from tests.test_train_prune import _check_result, _model
from torch_dag.finetuning.gates import insert_gates
from torch_dag.pruning import channel_groups

QUIET = td.FinetuneConfig(progress=False)


@pytest.mark.slow
def test_the_gates_learn_the_budget_and_close():
    """With the budget and the polarizing term, the gates' predicted FLOPs ratio comes to the target and
    some gates close; the removal then takes the closed classes first."""
    dag, inputs = _model("residual")
    data = [torch.randn_like(inputs[0]) for _ in range(4)]
    config = td.TrainPruneConfig(training=QUIET, gate_lr=0.1, polarize_weight=16.0)
    _, report = td.train_prune(dag, data, flops_ratio=0.5, steps=60, config=config, return_report=True)
    assert report.predicted == pytest.approx(0.5, abs=0.1)
    assert report.closed > 0
    assert abs(report.reached - 0.5) <= 0.02


class Crashing:
    """The batches of `data`, pass after pass, raising when the `crash_at`-th batch is fetched (a run
    killed mid-way)."""

    def __init__(self, data, crash_at):
        self.data, self.crash_at, self.fetched = data, crash_at, 0

    def __iter__(self):
        for batch in self.data:
            self.fetched += 1
            if self.fetched == self.crash_at:
                raise RuntimeError("killed")
            yield batch


@pytest.mark.slow
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    dag, inputs = _model("residual")
    data = [torch.randn_like(inputs[0]) for _ in range(3)]

    def run(batches, checkpoint=None):
        training = td.FinetuneConfig(progress=False, checkpoint=checkpoint, checkpoint_every=2)
        config = td.TrainPruneConfig(training=training, gate_lr=0.2)
        return td.train_prune(dag, batches, flops_ratio=0.5, steps=5, config=config, return_report=True)

    straight, _ = run(data)
    with pytest.raises(RuntimeError, match="killed"):
        run(Crashing(data, crash_at=5), tmp_path / "ckpt")  # checkpoints at steps 2 and 4, then dies
    saved = td.load(tmp_path / "ckpt" / "student.dag")
    assert any(v.op == "Gate" for v in saved)  # the gated model is what checkpoints hold
    resumed, report = run(data, tmp_path / "ckpt")
    assert report.resumed_at == 4 and report.steps == 1
    with torch.no_grad():
        torch.testing.assert_close(resumed(*inputs), straight(*inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_latency_table_drives_the_budget(tmp_path):
    dag, inputs = _model("residual")
    table = td.latency_table(dag, inputs, probes=6)
    groups = channel_groups(dag, inputs)
    model = table.cost_model(groups)
    ratio = model.soft_ratio
    rng = np.random.default_rng(0)
    for _ in range(3):  # at 0/1 kept fractions: the table's own prediction
        removed = rng.random(groups.size) < 0.4
        removed = removed[groups.root(np.arange(groups.size))]
        assert float(ratio(torch.from_numpy(~removed).double())) == pytest.approx(
            model.ratio(removed), rel=1e-9
        )
    gated = insert_gates(dag, groups)
    kept = gated.per_root(gated.opened()).double()
    kept.retain_grad()
    ratio(kept).backward()
    assert kept.grad is not None and float(kept.grad.abs().sum()) > 0
    data = [torch.randn_like(inputs[0]) for _ in range(2)]
    pruned, report = td.train_prune(
        dag, data, latency_ratio=0.6, latency_table=table, steps=3, return_report=True,
        config=td.TrainPruneConfig(training=QUIET),
    )  # fmt: skip
    assert report.prune.measure == "latency" and report.prune.predicted is not None
    assert torch.isfinite(pruned(*inputs)).all()


TIMM = [
    ("resnet18", 64),
    ("mobilenetv3_small_100", 96),
    ("efficientnet_b0", 96),
    ("vit_tiny_patch16_224", 64),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), TIMM)
@pytest.mark.parametrize("method", ["gates", "group_lasso"])
def test_timm_models_train_prune(name, size, method, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = name.startswith("vit")
    model = timm.create_model(
        name, pretrained=False, **({"img_size": size, "depth": 2} if vit else {})
    ).eval()
    inputs = (torch.randn(2, 3, size, size),)
    dag = td.build_from_unstructured_module(model, inputs)
    data = [torch.randn_like(inputs[0]) for _ in range(2)]
    pruned, report = td.train_prune(
        dag, data, flops_ratio=0.5, steps=2, method=method, return_report=True,
        config=td.TrainPruneConfig(training=QUIET),
    )  # fmt: skip
    out = _check_result(dag, pruned, report, inputs, 0.5, tmp_path)
    # the gated model with closed gates is the pruned one where removed channels carry zeros; a LayerNorm
    # over a pruned residual stream (the ViT) normalizes over fewer channels once they are gone
    if method == "gates" and not vit:
        with torch.no_grad():
            torch.testing.assert_close(out, report.gated(*inputs), rtol=1e-4, atol=1e-4)


def test_bad_settings_are_refused():
    dag, inputs = _model("residual")
    data = [torch.randn_like(inputs[0])]
    with pytest.raises(ValueError, match="method"):
        td.TrainPruneConfig(method="lasso")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block"):
        td.TrainPruneConfig(block=0)
    with pytest.raises(ValueError, match="steps"):
        td.train_prune(dag, data, flops_ratio=0.5, steps=0)
    with pytest.raises(ValueError, match="re-iterable"):
        td.train_prune(dag, iter(data), flops_ratio=0.5, steps=3, config=td.TrainPruneConfig(training=QUIET))
    with pytest.raises(td.DagError, match="flops_ratio"):
        td.train_prune(dag, data, flops_ratio=1.5, steps=1)
    fixed, fixed_inputs = _model("channel_shuffle")
    with pytest.raises(td.DagError, match="no prunable channel group"):
        td.train_prune(fixed, [fixed_inputs[0]], flops_ratio=0.5, steps=1)
