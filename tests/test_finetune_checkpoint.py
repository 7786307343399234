"""Finetuning refuses to run zero steps, resumes from the complete checkpoint a crash left (or says it
starts over), and never replaces a path that is not a torch-dag checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import torch_dag as td
from tests.test_finetune import small_teacher_and_student, synthetic_batches


@pytest.mark.parametrize(
    ("data", "options", "message"),
    [
        (lambda: synthetic_batches(2), {"epochs": 0}, "epochs must be an integer >= 1"),
        (lambda: synthetic_batches(2), {"epochs": -1}, "epochs must be an integer >= 1"),
        (lambda: [], {}, "data gives no batch: finetuning would run zero steps"),
        (lambda: iter([]), {}, "epoch 0: data gives no batch"),
        (
            lambda: torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(torch.randn(10, 3, 12, 12)), batch_size=16, drop_last=True
            ),
            {},
            "a DataLoader of 10 samples in batches of 16, dropping the last incomplete one",
        ),
        (lambda: synthetic_batches(2), {"lr": float("nan")}, "lr must be a finite number >= 0"),
        (lambda: synthetic_batches(2), {"temperature": 0.0}, "temperature must be a finite number > 0"),
        (lambda: synthetic_batches(2), {"checkpoint_every": -1}, "checkpoint_every must be an integer >= 0"),
    ],
)
def test_zero_steps_and_nonsense_settings_are_refused(data, options, message, pair):
    teacher, student = copy.deepcopy(pair)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        td.finetune(student, teacher, data(), progress=False, **options)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.fixture(scope="module")
def pair() -> tuple[td.DagModule, td.DagModule]:
    """The teacher and its pruned student of test_finetune, built once (tests take deep copies)."""
    return small_teacher_and_student()


class Killed(Exception):
    """The process dying at a chosen point."""


@pytest.mark.slow
def test_a_checkpoint_interrupted_between_its_renames_resumes_from_the_complete_temporary_one(
    tmp_path, monkeypatch
):
    batches = synthetic_batches(6, labels=True)
    teacher, straight = small_teacher_and_student()
    td.finetune(straight, teacher, batches, epochs=2, lr=3e-3, progress=False)

    rename, swaps = Path.rename, []

    def rename_dying_at_the_second_swap(self: Path, target):
        if self.name == "ck.tmp":  # the new checkpoint swapped in: steps 4, 8, 12
            swaps.append(self)
            if len(swaps) == 2:  # `ck` is already `ck.old`: the state the issue found resumed from step 0
                raise Killed
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_dying_at_the_second_swap)
    options = {
        "epochs": 2,
        "lr": 3e-3,
        "checkpoint": tmp_path / "ck",
        "checkpoint_every": 4,
        "progress": False,
    }
    teacher, student = small_teacher_and_student()
    with pytest.raises(Killed):
        td.finetune(student, teacher, batches, **options)
    monkeypatch.undo()
    assert not (tmp_path / "ck").exists()
    assert (tmp_path / "ck.tmp" / "state.safetensors").exists() and (tmp_path / "ck.old").exists()

    teacher, resumed = small_teacher_and_student()
    with pytest.warns(UserWarning, match=r"ck is missing: a save was interrupted; resuming from .*ck\.tmp"):
        report = td.finetune(resumed, teacher, batches, **options)
    assert report.resumed_at == 8 and report.steps == 4 and report.total_steps == 12
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the leftovers went with the next save


def test_partial_leftovers_are_named_and_the_run_starts_over(tmp_path, pair):
    (tmp_path / "ck.tmp").mkdir()
    (tmp_path / "ck.tmp" / "torch_dag_checkpoint").write_text("a save killed before its state\n")
    teacher, student = copy.deepcopy(pair)
    with pytest.warns(UserWarning, match=r"no complete checkpoint .*ck\.tmp.* starts over from step 0"):
        report = td.finetune(
            student, teacher, synthetic_batches(2), checkpoint=tmp_path / "ck", progress=False
        )
    assert report.resumed_at == 0 and report.steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("where", ["ck", "ck.tmp", "ck.old"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_path_that_is_not_a_checkpoint_is_never_replaced(tmp_path, where, kind, pair):
    user = tmp_path / where
    if kind == "file":
        user.write_text("the user's file\n")
    else:
        user.mkdir()
        (user / "notes.txt").write_text("the user's notes\n")
    teacher, student = copy.deepcopy(pair)
    expected = "is a file" if kind == "file" else "is a folder that is not a torch-dag checkpoint"
    with pytest.raises(td.DagError, match=f"{where} {expected}; a checkpoint would replace it"):
        td.finetune(student, teacher, synthetic_batches(2), checkpoint=tmp_path / "ck", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [where]
    text = user.read_text() if kind == "file" else (user / "notes.txt").read_text()
    assert text.startswith("the user's")


def test_an_empty_folder_made_for_the_checkpoint_is_used(tmp_path, pair):
    (tmp_path / "ck").mkdir()
    teacher, student = copy.deepcopy(pair)
    td.finetune(student, teacher, synthetic_batches(2), checkpoint=tmp_path / "ck", progress=False)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "state.safetensors",
        "student.dag",
        "torch_dag_checkpoint",
    ]
