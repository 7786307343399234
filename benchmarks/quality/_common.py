"""Shared by the quality benchmarks: Torch-Pruning at a FLOPs target with a given criterion, the
fidelity measures (top-1 agreement, KL divergence), resumable CSV rows and the plots."""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent.parent
RESULTS = BENCH / "results" / "quality"
sys.path.insert(0, str(BENCH))  # _fmnist, _sweep

import _fmnist  # noqa: E402, F401  (for the scripts here: benchmarks/_fmnist.py)

import torch_dag as td  # noqa: E402

CRITERIA = ["l1", "l2", "bn_scale", "taylor", "random"]


def flops(module: torch.nn.Module, x: torch.Tensor) -> float:
    """fvcore-convention FLOPs of any module, counted on its conversion (the same counter for both tools)."""
    dag = module if isinstance(module, td.DagModule) else td.build_from_unstructured_module(module, (x,))
    return td.count_flops(dag, x).total_flops


def self_supervised_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the model's own top-1: torch-dag's default loss for the taylor criterion."""
    return F.cross_entropy(logits, logits.argmax(1))


def tp_prune(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: float,
    criterion: str,
    calibration: Iterable[torch.Tensor],
    ignored: list[torch.nn.Module],
    round_to: int | None = None,
    steps: int = 8,
    options: Callable[[torch.nn.Module, float], dict] | None = None,
    after: Callable[[torch.nn.Module, object], None] | None = None,
) -> tuple[torch.nn.Module, float]:
    """Torch-Pruning's MetaPruner (global ranking) with the matching importance, its pruning ratio
    bisected until the FLOPs ratio is closest to `target`; (pruned copy, FLOPs ratio reached).
    `options(copy, ratio)` gives more MetaPruner arguments (e.g. attention heads), `after(copy, pruner)` fixes
    the copy's attributes after the pruning step, as Torch-Pruning's examples do for timm ViTs."""
    import torch_pruning as tp

    base = flops(model, x)
    importance = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }[criterion]
    batches = list(calibration)

    def attempt(ratio: float) -> torch.nn.Module:
        candidate = copy.deepcopy(model).eval()
        names = {id(m): n for n, m in model.named_modules()}
        skip = [dict(candidate.named_modules())[names[id(m)]] for m in ignored]
        if criterion == "taylor":  # gradients of the same self-supervised loss, accumulated over batches
            candidate.zero_grad()
            for batch in batches:
                self_supervised_loss(candidate(batch)).backward()
        torch.manual_seed(0)
        pruner = tp.pruner.MetaPruner(
            candidate,
            x,
            importance=importance(),
            global_pruning=True,
            pruning_ratio=ratio,
            ignored_layers=skip,
            round_to=round_to,
            **(options(candidate, ratio) if options else {}),
        )
        pruner.step()
        if after is not None:
            after(candidate, pruner)
        candidate.zero_grad(set_to_none=True)
        try:
            with torch.no_grad():
                candidate.eval()(x)
        except Exception as e:
            raise RuntimeError(f"Torch-Pruning's pruned model does not run: {type(e).__name__}: {e}") from e
        return candidate

    low, high, best, failure = 0.0, 0.95, None, None
    for _ in range(steps):
        ratio = (low + high) / 2
        try:
            kept = flops(attempt(ratio), x) / base
        except RuntimeError as e:  # pruned too far to run (e.g. every head of a block): prune less
            high, failure = ratio, e
            continue
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (ratio, kept)
        low, high = (ratio, high) if kept > target else (low, ratio)
    if best is None:
        raise RuntimeError(
            f"no ratio tried (down to {high:.3f}) gave a model that runs: {failure}"
        ) from failure
    return attempt(best[0]), best[1]


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk) for chunk in x.split(batch)])


def agreement_and_kl(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement with the teacher, and the mean KL(teacher || student) of the softmax outputs."""
    agree = (student.argmax(1) == teacher.argmax(1)).float().mean().item()
    kl = F.kl_div(
        student.log_softmax(1), teacher.log_softmax(1), reduction="batchmean", log_target=True
    ).item()
    return agree, kl


class Rows:
    """A CSV of result rows keyed by some columns; rows already there are skipped (resumable)."""

    def __init__(self, path: Path, fields: list[str], key: list[str], defaults: dict | None = None):
        """`defaults`: values of columns that older files (and rows added without them) lack."""
        self.path, self.fields, self.key, self.defaults = path, fields, key, defaults or {}
        self.rows: dict[tuple, dict] = {}
        if path.exists():
            for row in csv.DictReader(path.open()):
                self.rows[self._key(row)] = {**self.defaults, **row}

    def _key(self, row: dict) -> tuple:
        row = {**self.defaults, **row}
        return tuple(str(row[k]) for k in self.key)

    def has(self, **key) -> bool:
        return self._key(key) in self.rows

    def get(self, **key) -> dict:
        return self.rows[self._key(key)]

    def add(self, row: dict) -> None:
        row = {**self.defaults, **row}
        self.rows[self._key(row)] = {k: row.get(k, "") for k in self.fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(self.rows.values())

    def all(self) -> list[dict]:
        return list(self.rows.values())


def plot(
    rows: list[dict],
    x: str,
    y: str,
    line: Callable[[dict], str],
    path: Path,
    title: str,
    ylabel: str,
    reference: float | None = None,
    panel: Callable[[dict], str] | None = None,
    sharey: bool = True,
) -> None:
    """One line per method (rows grouped by `line`), y against x, in side-by-side panels when `panel`
    names one per row (a method keeps its colour across panels); saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        if row.get(y) not in (None, "") and not math.isnan(float(row[y])):
            lines = panels.setdefault(panel(row) if panel else "", {})
            lines.setdefault(line(row), []).append((float(row[x]), float(row[y])))
    labels = sorted({label for lines in panels.values() for label in lines})
    colours = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    colour = {label: colours(i % colours.N) for i, label in enumerate(labels)}
    names = list(panels)  # in the order rows first name them
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4.5), sharey=sharey, squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, points in sorted(panels[name].items()):
            points.sort()
            style = "--" if "finetuned" in label else "-"
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                style,
                marker="o",
                label=label,
                color=colour[label],
            )
        if reference is not None:
            ax.axhline(reference, color="gray", linestyle=":", label="unpruned")
        ax.set_xlabel("FLOPs ratio kept" if x.endswith("flops") else x)
        ax.set_title(f"{title}: {name}" if name else title, fontsize=10 if name else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in axes[0] if not sharey else axes[0][:1]:
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timed(fn: Callable, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
