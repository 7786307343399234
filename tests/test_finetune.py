"""Distillation finetuning: `td.finetune` (losses, flexible students, feature matching, checkpoints and
resume, DDP under torchrun) and `torch-dag finetune`."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import torch_dag as td
from torch_dag.cli import main as cli

HERE = Path(__file__).resolve().parent


def small_teacher_and_student(flexible: bool = False) -> tuple[td.DagModule, td.DagModule]:
    """A small CNN as teacher (logits large enough that distillation has something to learn) and its
    half-FLOPs pruning (or a two-level flexible version) as student; the same on every call."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():
        net[-1].weight.mul_(8)
        net.train()  # norm statistics of the data, as a trained model has
        for batch in synthetic_batches(8, seed=5):
            net(batch)
    x = torch.randn(4, 3, 12, 12)
    teacher = td.build_from_unstructured_module(net.eval(), (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if flexible:
            student = td.make_flexible(teacher, [0.5, 1.0], (x,), config=td.flex.FlexConfig(round_to=1))
            with torch.no_grad():  # the top level starts away from the teacher too
                for p in student.parameters():
                    p.add_(0.1 * torch.randn_like(p))
        else:
            student = td.prune(teacher, 0.5, (x,))
    return teacher, student


def synthetic_batches(n: int, labels: bool = False, seed: int = 1) -> list:
    """n batches of 16 random images (with random labels when asked), the same on every call."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 3, 12, 12, generator=g) for _ in range(n)]
    if labels:
        return [(x, torch.randint(0, 10, (16,), generator=g)) for x in xs]
    return xs


def distance(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    """KL divergence of the student's output distribution from the teacher's on held-out inputs."""
    with torch.no_grad():
        return float(
            F.kl_div(
                student(x).log_softmax(-1), teacher(x).log_softmax(-1), reduction="batchmean", log_target=True
            )
        )


HELD_OUT = torch.Generator().manual_seed(99)
HELD = torch.randn(128, 3, 12, 12, generator=HELD_OUT)


def test_distillation_brings_a_pruned_student_towards_its_teacher():
    teacher, student = small_teacher_and_student()
    before = distance(student, teacher, HELD)
    report = td.finetune(student, teacher, synthetic_batches(16), epochs=3, lr=1e-2, progress=False)
    assert report.steps == 48 and report.world_size == 1 and len(report.epoch_losses) == 3
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert distance(student, teacher, HELD) < 0.5 * before
    assert not student.training and not teacher.training


def test_labels_enter_the_loss_with_weight_one_minus_alpha():
    teacher, student = small_teacher_and_student()
    batches = synthetic_batches(4, labels=True)
    pure = td.finetune(student, teacher, batches, alpha=1.0, lr=0.0, progress=False).epoch_losses[0]
    mixed = td.finetune(student, teacher, batches, alpha=0.0, lr=0.0, progress=False).epoch_losses[0]
    with torch.no_grad():
        student.train()
        expected = np.mean([float(F.cross_entropy(student(x), y)) for x, y in batches])
    assert mixed == pytest.approx(expected, rel=1e-5) and pure != pytest.approx(mixed)


def test_frozen_batch_norm_statistics_stay_as_they_are():
    teacher, student = small_teacher_and_student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    td.finetune(student, teacher, synthetic_batches(4), lr=1e-2, freeze_bn=True, progress=False)
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if "running" in k)
    assert not torch.equal(
        before["vertex_modules._1.weight"], after["vertex_modules._1.weight"]
    )  # affine: trained


def test_a_student_sharing_layers_with_its_teacher_leaves_the_teacher_alone():
    """A factorized model keeps the layers it did not factorize, as the teacher's own modules: finetuning
    gives the student copies of them, so the teacher (and the model it was converted from) stays as it was."""
    teacher, _ = small_teacher_and_student()
    # every layer factorized, the output layer too (as this test was written before factorize protected it)
    student = td.factorize(teacher, rank_ratio=0.5, example_inputs=(HELD[:2],), protect_outputs=False)
    assert {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = distance(student, teacher, HELD)
    td.finetune(student, teacher, synthetic_batches(8), epochs=2, lr=1e-2, progress=False)
    assert all(torch.equal(reference[k], v) for k, v in teacher.state_dict().items())
    assert not {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    assert distance(student, teacher, HELD) < before and teacher.training is False
    with pytest.raises(ValueError, match="the teacher itself"):
        td.finetune(teacher, teacher, synthetic_batches(1), progress=False)


def test_a_plain_module_student_sharing_a_layer_with_its_teacher_leaves_the_teacher_alone():
    torch.manual_seed(0)
    head = nn.Linear(8, 10)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 8), nn.ReLU(), head)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 8), nn.ReLU(), head)
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    td.finetune(student, teacher, synthetic_batches(4), lr=1e-2, progress=False)
    assert all(torch.equal(reference[k], v) for k, v in teacher.state_dict().items())
    assert student[3] is not head and not torch.equal(student[3].weight, head.weight)


def test_a_flexible_student_trains_every_level():
    teacher, student = small_teacher_and_student(flexible=True)
    before = []
    for level in range(student.max_level() + 1):
        student.set_level_use(level)
        before.append(distance(student, teacher, HELD))
    td.finetune(student, teacher, synthetic_batches(16), epochs=3, lr=1e-2, progress=False)
    assert student.current_level() == student.max_level()
    for level in range(student.max_level() + 1):
        student.set_level_use(level)
        assert distance(student, teacher, HELD) < 0.7 * before[level], level


def test_features_are_matched_by_vertex_name():
    teacher, student = small_teacher_and_student()
    name = next(v.name for v in teacher if v.op == "AdaptiveAvgPool2d")  # pruning narrows it: a clear error
    with pytest.raises(td.DagError, match=f"feature '{name}'.*shape"):
        td.finetune(student, teacher, synthetic_batches(2), features=[name], progress=False)
    with pytest.raises(td.DagError, match="not in the student"):
        td.finetune(student, teacher, synthetic_batches(2), features=["nowhere"], progress=False)
    kept = [v.name for v in teacher if v.op == "Linear"]  # the output layer keeps its width
    with_features = td.finetune(student, teacher, synthetic_batches(2), features=kept, lr=0.0, progress=False)
    without = td.finetune(student, teacher, synthetic_batches(2), lr=0.0, progress=False)
    assert with_features.epoch_losses[0] > without.epoch_losses[0]


def test_bad_arguments_are_refused_clearly():
    teacher, student = small_teacher_and_student()
    with pytest.raises(ValueError, match="one-pass iterator"):
        td.finetune(student, teacher, iter(synthetic_batches(2)), epochs=2, progress=False)
    with pytest.raises(ValueError, match="alpha"):
        td.finetune(student, teacher, synthetic_batches(2), alpha=2.0, progress=False)
    with pytest.raises(TypeError, match="a batch must be"):
        td.finetune(student, teacher, [(HELD[:2], None, None)], progress=False)


def batchnorm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_recalibrated_statistics_are_the_exact_averages_over_the_batches():
    _, student = small_teacher_and_student()
    batches = synthetic_batches(3)
    conv, bn = (vertex.module for vertex in list(student)[:2])
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    before = {
        k: v.clone() for k, v in student.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    momentum = bn.momentum
    student.train()
    assert td.recalibrate_batchnorm(student, [(b,) for b in batches]) == 2
    with torch.no_grad():
        activations = [conv(b) for b in batches]
    mean = torch.stack([a.mean((0, 2, 3)) for a in activations]).mean(0)
    var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in activations]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 3 and bn.momentum == momentum
    assert student.training and all(m.training for m in student.modules())  # modes restored
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # nothing but the statistics moved


def test_each_flexible_level_gets_the_statistics_of_its_own_plain_model():
    teacher, flexible = small_teacher_and_student(flexible=True)
    reference = {k: v.clone() for k, v in teacher.state_dict().items()}
    flexible.set_level_use(0)
    plains = []
    for level in range(flexible.max_level() + 1):
        flexible.set_level_use(level)
        plains.append(flexible.make_base_copy())
    flexible.set_level_use(0)
    batches = synthetic_batches(3)
    assert td.recalibrate_batchnorm(flexible, batches) == 2 * (flexible.max_level() + 1)
    assert flexible.current_level() == 0
    for level, plain in enumerate(plains):
        td.recalibrate_batchnorm(plain, batches)
        flexible.set_level_use(level)
        torch.testing.assert_close(flexible(HELD), plain(HELD))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in reference.items())  # the source untouched

    top = batchnorm_statistics(flexible)
    td.recalibrate_batchnorm(flexible, synthetic_batches(2, seed=7), levels=[0])  # only level 0's change
    changed = {k for k, v in batchnorm_statistics(flexible).items() if not torch.equal(v, top[k])}
    assert changed and all(".levels.0." in k for k in changed)

    flexible.set_widths([0.75] * flexible.search_dimension)  # widths between the levels
    plain = flexible.make_base_copy()
    td.recalibrate_batchnorm(flexible, batches)
    td.recalibrate_batchnorm(plain, batches)
    torch.testing.assert_close(flexible(HELD), plain(HELD))
    # the widths' own statistics (custom_layers: saved with them) changed, the levels' did not
    stats = batchnorm_statistics(flexible)
    levels = {k: v for k, v in stats.items() if not k.startswith("custom_layers.")}
    assert levels.keys() == top.keys() and len(stats) > len(levels)
    assert all(torch.equal(v, top[k]) or ".levels.0." in k for k, v in levels.items())


def test_recalibration_errors_leave_the_statistics_as_they_were():
    teacher, flexible = small_teacher_and_student(flexible=True)
    with pytest.raises(td.DagError, match="at least one calibration batch"):
        td.recalibrate_batchnorm(teacher, [])
    with pytest.raises(td.DagError, match="levels= is for flexible models"):
        td.recalibrate_batchnorm(teacher, synthetic_batches(1), levels=[0])
    with pytest.raises(td.DagError, match="level 5 does not exist"):
        td.recalibrate_batchnorm(flexible, synthetic_batches(1), levels=[5])
    flexible.set_widths([0.75] * flexible.search_dimension)
    with pytest.raises(td.DagError, match="set_level_use"):
        td.recalibrate_batchnorm(flexible, synthetic_batches(1), levels=[0])
    before = batchnorm_statistics(teacher)
    with pytest.raises(RuntimeError):  # the second batch has the wrong channel count
        td.recalibrate_batchnorm(teacher, [HELD[:4], torch.randn(4, 5, 12, 12)])
    after = batchnorm_statistics(teacher)
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_cli_prune_and_flexify_recalibrate_on_the_calibration_data(tmp_path, capsys):
    teacher, _ = small_teacher_and_student()
    td.save(teacher, tmp_path / "teacher.dag")
    np.save(tmp_path / "x.npy", torch.cat(synthetic_batches(2)).numpy())
    common = ["--calibration", str(tmp_path / "x.npy"), "--batch-size", "16", "--recalibrate-bn", "-q"]
    cli(
        [
            "prune",
            str(tmp_path / "teacher.dag"),
            "--flops-ratio",
            "0.5",
            "--compensate",
            "none",
            "-o",
            str(tmp_path / "pruned.dag"),
            *common,
        ]
    )
    assert "batchnorm statistics re-estimated" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = td.prune(
            teacher, 0.5, teacher.example_inputs(), config=td.pruning.PruneConfig(compensate="none")
        )
    td.recalibrate_batchnorm(expected, synthetic_batches(2))
    torch.testing.assert_close(td.load(tmp_path / "pruned.dag")(HELD), expected(HELD))
    cli(
        [
            "flexify",
            str(tmp_path / "teacher.dag"),
            "--levels",
            "0.5",
            "1.0",
            "-o",
            str(tmp_path / "flex.dag"),
            *common,
        ]
    )
    assert "per-level batchnorm statistics re-estimated" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(
            [
                "prune",
                str(tmp_path / "teacher.dag"),
                "--flops-ratio",
                "0.5",
                "--recalibrate-bn",
                "-o",
                str(tmp_path / "p.dag"),
                "-q",
            ]
        )
    assert "give --calibration" in capsys.readouterr().err


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(tmp_path):
    batches = synthetic_batches(6, labels=True)
    teacher, straight = small_teacher_and_student()
    td.finetune(straight, teacher, batches, epochs=3, lr=3e-3, progress=False)

    class Crashing:  # the same batches, but the process dies at the 6th
        def __len__(self):
            return len(batches)

        def __iter__(self):
            yield from batches[:5]
            raise RuntimeError("stop")

    teacher, student = small_teacher_and_student()  # (pruning shares the tensors it left whole: a fresh pair)
    with pytest.raises(RuntimeError, match="stop"):  # checkpointed at step 4, then lost step 5
        td.finetune(
            student,
            teacher,
            Crashing(),
            epochs=3,
            lr=3e-3,
            checkpoint=tmp_path / "mid",
            checkpoint_every=4,
            progress=False,
        )
    teacher, resumed = small_teacher_and_student()
    report = td.finetune(
        resumed,
        teacher,
        batches,
        epochs=3,
        lr=3e-3,
        checkpoint=tmp_path / "mid",
        checkpoint_every=4,
        progress=False,
    )
    assert report.resumed_at == 4 and report.total_steps == 18 and report.steps == 14
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert td.load(tmp_path / "mid" / "student.dag").state_dict().keys() == straight.state_dict().keys()


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pruned", "flex"])
def test_two_ddp_processes_end_with_identical_weights(tmp_path, kind):
    done = torchrun(str(HERE / "_ddp_finetune.py"), str(tmp_path), *(["flex"] if kind == "flex" else []))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    _, start = small_teacher_and_student(flexible=kind == "flex")
    assert any(not torch.equal(v, ranks[0][k]) for k, v in start.state_dict().items())  # and they trained
    from safetensors import safe_open

    with safe_open(str(tmp_path / "rank0.safetensors"), "pt") as f:
        assert f.metadata() == {"world_size": "2", "steps": "8"}  # 8 batches, 2 epochs, half each


def test_cli_finetune(tmp_path, capsys):
    teacher, student = small_teacher_and_student()
    td.save(teacher, tmp_path / "teacher.dag")
    td.save(student, tmp_path / "student.dag")
    np.save(tmp_path / "x.npy", torch.randn(64, 3, 12, 12).numpy())
    np.save(tmp_path / "y.npy", torch.randint(0, 10, (64,)).numpy())
    cli(
        [
            "finetune",
            str(tmp_path / "student.dag"),
            "--teacher",
            str(tmp_path / "teacher.dag"),
            "--data",
            str(tmp_path / "x.npy"),
            "--labels",
            str(tmp_path / "y.npy"),
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "-o",
            str(tmp_path / "out.dag"),
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert "8 steps on 1 process(es)" in out and "mean loss per epoch" in out
    tuned = td.load(tmp_path / "out.dag")
    assert any(not torch.equal(v, tuned.state_dict()[k]) for k, v in student.state_dict().items())
    assert (tmp_path / "ckpt" / "state.safetensors").exists()


@pytest.mark.slow
def test_cli_finetune_under_torchrun_runs_two_processes(tmp_path):
    teacher, student = small_teacher_and_student()
    td.save(teacher, tmp_path / "teacher.dag")
    td.save(student, tmp_path / "student.dag")
    np.save(tmp_path / "x.npy", torch.randn(64, 3, 12, 12).numpy())
    done = torchrun(
        "-m",
        "torch_dag.cli",
        "finetune",
        str(tmp_path / "student.dag"),
        "--teacher",
        str(tmp_path / "teacher.dag"),
        "--data",
        str(tmp_path / "x.npy"),
        "--batch-size",
        "8",
        "-o",
        str(tmp_path / "out.dag"),
        "-q",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finetuned") == 1 and "4 steps on 2 process(es)" in done.stdout  # 64 / 8 / 2
    td.load(tmp_path / "out.dag")
