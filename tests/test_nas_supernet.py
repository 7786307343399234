"""`td.nas.train_supernet`: one optimizer step sums the sandwich's gradients (largest from the labels, the
others distilled from the largest's detached outputs), training helps every sub-network, and the checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dag as td
from tests.test_nas_search import Attention, Idioms, image_batches, searchable


def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(
        F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True
    )


@pytest.mark.slow
def test_one_step_sums_the_sandwich_gradients_with_in_place_distillation():
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    oracle = copy.deepcopy(sdag)
    (inputs, labels) = batch = image_batches(1)[0]
    td.nas.train_supernet(sdag, [batch], lr=0.1, optimizer="sgd", sandwich=(True, True, 0), progress=False)

    top_choice, bottom_choice = td.nas.largest(oracle), td.nas.smallest(oracle)
    oracle.train()  # by hand: the largest on the labels, the smallest towards the largest, one SGD step
    td.nas.set_chosen(oracle, top_choice)
    top = oracle(inputs)
    F.cross_entropy(top, labels).backward()
    td.nas.set_chosen(oracle, bottom_choice)
    kl(oracle(inputs), top.detach()).backward()
    with torch.no_grad():
        for p in oracle.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    for (name, mine), theirs in zip(sdag.state_dict().items(), oracle.state_dict().values()):
        torch.testing.assert_close(mine, theirs, msg=name)
    assert td.nas.dump_chosen(sdag) == td.nas.largest(sdag) and not sdag.training


class MeanThenLinear(nn.Module):
    """A confident teacher the attention model can imitate: a linear map of the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 5)
        with torch.no_grad():
            self.linear.weight.mul_(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(1))


@pytest.mark.slow
def test_training_lowers_the_loss_of_the_largest_and_the_smallest():
    torch.manual_seed(0)
    sdag = searchable(Attention())
    teacher = MeanThenLinear().eval()  # a task the students can learn
    data = [torch.randn(16, 16, 12) for _ in range(12)]
    held_out = torch.randn(64, 16, 12)

    def losses() -> list[float]:
        with torch.no_grad():
            return [
                float(kl(td.nas.export_subnet(sdag, c).eval()(held_out), teacher(held_out)))
                for c in (td.nas.largest(sdag), td.nas.smallest(sdag))
            ]

    before = losses()
    report = td.nas.train_supernet(sdag, data, epochs=4, lr=1e-2, teacher=teacher, progress=False)
    after = losses()
    assert report.steps == 48 and len(report.epoch_losses) == 4
    assert after[0] < 0.5 * before[0] and after[1] < 0.85 * before[1]


def test_steps_repeat_passes_and_unlabelled_batches_distill_from_the_largest_as_it_was():
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    start = td.nas.export_subnet(sdag, td.nas.largest(sdag)).eval()
    data = [b for b, _ in image_batches(3)]
    held_out = image_batches(1, seed=5)[0][0]

    def gap() -> float:  # the smallest sub-network's distance from the largest as it was
        with torch.no_grad():
            return float(
                kl(td.nas.export_subnet(sdag, td.nas.smallest(sdag)).eval()(held_out), start(held_out))
            )

    before = gap()
    report = td.nas.train_supernet(sdag, data, steps=20, lr=3e-3, sandwich=(True, True, 1), progress=False)
    assert report.steps == 20 and len(report.epoch_losses) == 7  # passes of 3 steps, the last of 2
    assert gap() < 0.5 * before


def test_bad_settings_are_refused_clearly():
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    data = image_batches(1)
    with pytest.raises(ValueError, match="sandwich must be"):
        td.nas.train_supernet(sdag, data, sandwich=(True, True), progress=False)
    with pytest.raises(ValueError, match="keep the largest"):
        td.nas.train_supernet(sdag, data, sandwich=(False, True, 1), progress=False)
    with pytest.raises(ValueError, match="re-iterable"):
        td.nas.train_supernet(sdag, iter(data), steps=3, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        td.nas.train_supernet(sdag, data, optimizer="lion", progress=False)
    plain = td.build_from_unstructured_module(Idioms().eval(), (x,))
    with pytest.raises(td.DagError, match="no mutables"):
        td.nas.train_supernet(plain, data, progress=False)
