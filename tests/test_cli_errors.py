"""Every user mistake on the command line is one line on stderr and exit status 2, never a traceback:
a table of bad invocations, run in-process through `main` (a few through a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import torch_dag as td
from torch_dag.cli import main

NET = textwrap.dedent(
    '''
    """A user's model, importable as `cli_errors_net`."""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


    def factory():
        torch.manual_seed(0)
        return Net()
    '''
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The paths the table names: a model, a .dag, data of every wrong kind, a file and a folder."""
    root = tmp_path_factory.mktemp("cli_errors")
    (root / "cli_errors_net.py").write_text(NET)
    sys.path.insert(0, str(root))
    import cli_errors_net

    model = cli_errors_net.factory().eval()
    x = torch.randn(2, 3, 8, 8)
    td.save(td.build_from_unstructured_module(model, (x,)), root / "net.dag")
    rng = np.random.default_rng(0)
    arrays = {
        "data": rng.standard_normal((16, 3, 8, 8)).astype(np.float32),
        "labels": np.arange(16) % 5,
        "float_labels": rng.standard_normal(16).astype(np.float32),
        "short_labels": np.arange(7),
        "flat": rng.standard_normal((16, 5)).astype(np.float32),
        "four_channels": rng.standard_normal((16, 4, 8, 8)).astype(np.float32),
        "empty": np.zeros((0, 3, 8, 8), np.float32),
        "objects": np.array([{"a": 1}, None], dtype=object),
    }
    for name, array in arrays.items():
        np.save(root / f"{name}.npy", array, allow_pickle=True)
    np.savez(root / "archive.npz", a=arrays["data"])
    (root / "text.npy").write_text("not an array\n")
    (root / "text.dag").write_text("not a dag\n")
    (root / "afile").write_text("the user's file\n")
    (root / "adir").mkdir()
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("the user's notes\n")
    yield {"root": str(root), "model": "cli_errors_net:factory", "dag": str(root / "net.dag")}
    sys.path.remove(str(root))
    sys.modules.pop("cli_errors_net", None)


TUNE = "finetune {dag} --teacher {dag} --data {root}/data.npy --batch-size 4 -o {root}/out.dag -q"
PRUNE = "prune {dag} --flops-ratio 0.5 -o {root}/out.dag -q"
FACTORIZE = "factorize {dag} --rank-ratio 0.5 -o {root}/out.dag -q"
FLEXIFY = "flexify {dag} -o {root}/out.dag -q"
CONVERT = "convert {model} --input-size 3x8x8 -o {root}/out.dag -q"

# (command line, what the one line of stderr must say)
BAD = [
    # options argparse refuses, with the accepted range
    ("", "the following arguments are required: command"),
    ("nosuch {dag}", "invalid choice: 'nosuch'"),
    ("convert {model} --input-size 3x8x8", "the following arguments are required: -o/--output"),
    (CONVERT + " --batch 0", "argument --batch: expected an integer >= 1, got '0'"),
    (CONVERT + " --batch=-3", "argument --batch: expected an integer >= 1, got '-3'"),
    (CONVERT + " --batch two", "expected an integer >= 1, got 'two'"),
    (CONVERT + " --input-size 3xax4", "expected sizes like 3x224x224, got '3xax4'"),
    (CONVERT + " --input-size 0x8x8", "each from 1 to 2**20, got '0x8x8'"),
    (CONVERT + " --input-size=-3x8x8", "each from 1 to 2**20, got '-3x8x8'"),
    ("info {dag} --top=-1", "argument --top: expected an integer >= 0, got '-1'"),
    ("export-onnx {dag} -o {root}/m.onnx --opset 0", "expected an integer from 7 to 30, got '0'"),
    ("prune {dag} --flops-ratio 0 -o {root}/o.dag", "expected a finite number > 0 and <= 1, got '0'"),
    ("prune {dag} --flops-ratio 1.5 -o {root}/o.dag", "> 0 and <= 1, got '1.5'"),
    ("prune {dag} --flops-ratio nan -o {root}/o.dag", "--flops-ratio: expected a finite number"),
    ("prune {dag} --params-ratio=-0.5 -o {root}/o.dag", "--params-ratio: expected a finite number > 0"),
    ("prune {dag} --kmapp 0 -o {root}/o.dag", "--kmapp: expected a finite number > 0, got '0'"),
    ("prune {dag} --kmapp inf -o {root}/o.dag", "--kmapp: expected a finite number > 0, got 'inf'"),
    ("prune {dag} --flops-ratio 0.5 --kmapp 2 -o {root}/o.dag", "not allowed with argument"),
    (
        "prune {dag} -o {root}/o.dag",
        "one of the arguments --flops-ratio --params-ratio --kmapp --latency-ratio is required",
    ),
    (PRUNE + " --criterion nosuch", "argument --criterion: invalid choice: 'nosuch'"),
    (PRUNE + " --round-to 0", "argument --round-to: expected an integer >= 1, got '0'"),
    (PRUNE + " --min-channels=-1", "argument --min-channels: expected an integer >= 1, got '-1'"),
    (PRUNE + " --min-channels 0", "argument --min-channels: expected an integer >= 1, got '0'"),
    (PRUNE + " --batch-size 0", "argument --batch-size: expected an integer >= 1, got '0'"),
    (PRUNE + " --attention nosuch", "argument --attention: invalid choice"),
    (PRUNE + " --compensate nosuch", "argument --compensate: invalid choice"),
    ("factorize {dag} --rank-ratio 0 -o {root}/o.dag", "--rank-ratio: expected a finite number > 0"),
    ("factorize {dag} --flops-ratio 2 -o {root}/o.dag", "--flops-ratio: expected a finite number > 0"),
    (FACTORIZE + " --allocation nosuch", "argument --allocation: invalid choice"),
    (FACTORIZE + " --batch-size 0", "argument --batch-size: expected an integer >= 1"),
    (FACTORIZE + " --top=-5", "argument --top: expected an integer >= 0"),
    (FLEXIFY + " --levels 0 0.5", "argument --levels: expected a finite number > 0 and <= 1, got '0'"),
    (FLEXIFY + " --levels 0.5 1.5", "got '1.5'"),
    (FLEXIFY + " --starting-level=-1", "argument --starting-level: expected an integer >= 0"),
    (FLEXIFY + " --levels 0.5 1 --flops-ratios 0.5 1", "not allowed with argument"),
    (TUNE + " --epochs 0", "argument --epochs: expected an integer >= 1, got '0'"),
    (TUNE + " --epochs=-1", "argument --epochs: expected an integer >= 1, got '-1'"),
    (TUNE + " --batch-size 0", "argument --batch-size: expected an integer >= 1, got '0'"),
    (TUNE + " --lr nan", "argument --lr: expected a finite number > 0, got 'nan'"),
    (TUNE + " --lr 0", "argument --lr: expected a finite number > 0, got '0'"),
    (TUNE + " --lr=-1e-3", "argument --lr: expected a finite number > 0"),
    (TUNE + " --weight-decay=-1", "argument --weight-decay: expected a finite number >= 0"),
    (TUNE + " --temperature 0", "argument --temperature: expected a finite number > 0"),
    (TUNE + " --alpha 1.5", "argument --alpha: expected a finite number >= 0 and <= 1, got '1.5'"),
    (TUNE + " --optimizer nosuch", "argument --optimizer: invalid choice"),
    (TUNE + " --checkpoint-every=-1", "argument --checkpoint-every: expected an integer >= 0"),
    ("finetune {dag} --data {root}/data.npy -o {root}/o.dag", "required: --teacher"),
    # values only the whole command line shows to be nonsense
    (FLEXIFY + " --levels 0.5 0.25", "--levels 0.5 0.25: expected distinct values in increasing order"),
    (FLEXIFY + " --levels 0.5 0.5", "--levels 0.5 0.5: expected distinct values in increasing order"),
    (FLEXIFY + " --flops-ratios 0.9 0.3", "--flops-ratios 0.9 0.3: expected distinct values"),
    (FLEXIFY + " --starting-level 99", "--starting-level 99: the model will have 3 levels; give 0 to 2"),
    (TUNE + " --batch-size 64", "--batch-size 64: --data has 16 samples, fewer than one batch"),
    (FACTORIZE + " --protect nosuchvertex", "--protect nosuchvertex: no such vertex in"),
    # files: missing, of the wrong kind, outputs where nothing can be written
    ("info {root}/missing.dag", "the .dag file {root}/missing.dag: no such file"),
    ("info {root}/text.dag", "text.dag"),
    ("simplify {root}/missing.dag -o {root}/o.dag", "no such file"),
    (PRUNE.replace("{dag}", "{root}/missing.dag"), "the source {root}/missing.dag: no such file"),
    (CONVERT.replace("{root}/out.dag", "{root}/adir"), "-o/--output {root}/adir is a folder"),
    (CONVERT.replace("{root}/out.dag", "{root}/afile/x.dag"), "{root}/afile is a file, not a folder"),
    ("viz {dag} -o {root}/adir", "-o/--output {root}/adir is a folder"),
    ("fold-bn {dag} -o {root}/adir", "-o/--output {root}/adir is a folder"),
    ("export-onnx {dag} -o {root}/afile/m.onnx", "is a file, not a folder"),
    (FLEXIFY.replace("{root}/out.dag", "{root}/adir"), "-o/--output {root}/adir is a folder"),
    (FLEXIFY + " --delta-file {root}/adir", "--delta-file {root}/adir is a folder"),
    (TUNE.replace("{root}/out.dag", "{root}/adir"), "-o/--output {root}/adir is a folder"),
    (PRUNE + " --calibration {root}/missing.npy", "--calibration {root}/missing.npy: no such file"),
    (PRUNE + " --calibration {root}/text.npy", "--calibration {root}/text.npy is not a .npy array"),
    (PRUNE + " --calibration {root}/objects.npy", "objects.npy is not a .npy array"),
    (PRUNE + " --calibration {root}/archive.npz", "archive.npz is an .npz archive"),
    (PRUNE + " --calibration {root}/empty.npy", "expected numbers, N samples along the first axis"),
    (PRUNE + " --calibration {root}/flat.npy", "--calibration {root}/flat.npy (5 per sample)"),
    (FACTORIZE + " --calibration {root}/four_channels.npy", "(4x8x8 per sample): the model cannot run"),
    (PRUNE + " --recalibrate-bn", "give --calibration"),
    (TUNE.replace("data.npy", "missing.npy"), "--data {root}/missing.npy: no such file"),
    (TUNE.replace("data.npy", "text.npy"), "--data {root}/text.npy is not a .npy array"),
    (TUNE.replace("data.npy", "flat.npy"), "the model cannot run on it"),
    (TUNE + " --labels {root}/float_labels.npy", "expected 16 integer class labels"),
    (TUNE + " --labels {root}/short_labels.npy", "expected 16 integer class labels"),
    (TUNE + " --features nosuchvertex", "feature vertices ['nosuchvertex'] are not in the student"),
    (TUNE + " --checkpoint {root}/afile", "{root}/afile is a file; a checkpoint would replace it"),
    (TUNE + " --checkpoint {root}/busy", "is a folder that is not a torch-dag checkpoint"),
    (TUNE.replace("finetune {dag}", "finetune {root}/missing.dag"), "the student {root}/missing.dag: no"),
    (TUNE.replace("--teacher {dag}", "--teacher resnet18"), "must be 'timm:NAME' or 'package.module:f"),
    # models and inputs that cannot go together
    ("info {dag} --input-size 5x8x8", "--input-size 5x8x8 (5x8x8 per sample): the model cannot run"),
    ("info {dag} --input-size 8x8", "--input-size 8x8 (8x8 per sample): the model cannot run on it"),
    (PRUNE + " --input-size 7x8x8", "--input-size 7x8x8 (7x8x8 per sample): the model cannot run"),
    (CONVERT.replace("3x8x8", "3x8"), "--input-size 3x8 (3x8 per sample): the model cannot run on it"),
    ("convert torch.nn:Identity -o {root}/o.dag", "tell the size of its input; pass --input-size"),
    ("convert cli_errors_net:nope --input-size 3x8x8 -o {root}/o.dag", "has no attribute 'nope'"),
    ("convert resnet18 -o {root}/o.dag", "must be 'timm:NAME' or 'package.module:factory'"),
    ("swap-act {dag} relu -o {root}/o.dag", "expected OLD=NEW (e.g. relu=hardswish), got 'relu'"),
    ("swap-act {dag} relu=gelu --names ( -o {root}/o.dag", "--names '(' is not a regular expression"),
]


def run_in_process(line: str, files: dict[str, str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(line.format(**files).split())
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("line", "expected"), BAD, ids=[line or "(nothing)" for line, _ in BAD])
def test_a_bad_command_line_is_one_line_and_status_2(line, expected, files, capsys):
    before = sorted(p.name for p in Path(files["root"]).iterdir())
    code, err = run_in_process(line, files, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("torch-dag") and ": error: " in err, err
    assert expected.format(**files) in err
    assert "Traceback" not in err
    assert sorted(p.name for p in Path(files["root"]).iterdir()) == before, "nothing written"
    assert Path(files["root"], "afile").read_text() == "the user's file\n"


def test_the_table_covers_every_subcommand_and_at_least_70_lines():
    assert len(BAD) >= 70
    commands = {line.split()[0] for line, _ in BAD if line}
    parser_commands = {"convert", "info", "viz", "swap-act", "fold-bn", "simplify", "export-onnx"}
    assert parser_commands | {"prune", "factorize", "flexify", "finetune"} <= commands


def test_every_default_is_in_the_help():
    from torch_dag.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, sub in subparsers.choices.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.default in (None, False) or action.nargs == 0 or not action.option_strings:
                continue
            help_text = " ".join((action.help or "").split())
            assert "default" in help_text or f"(default: {action.default})" in text, (name, action.dest)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (CONVERT + " --batch 0", "argument --batch: expected an integer >= 1, got '0'"),
        (FLEXIFY + " --levels 0.5 0.25", "expected distinct values in increasing order"),
        (TUNE + " --batch-size 64", "fewer than one batch"),
    ],
)
def test_a_bad_command_line_in_a_subprocess(line, expected, files):
    result = subprocess.run(
        [sys.executable, "-m", "torch_dag.cli", *line.format(**files).split()],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([files["root"], os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
