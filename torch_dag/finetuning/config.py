"""The settings of a finetuning run, and what it reports."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..core.options import check_option, choices


@dataclass
class FinetuneReport:
    """What a run did: optimizer steps (this run and in total, with those of a resumed checkpoint), the
    mean training loss of each epoch (over all ranks), wall time, and the processes it ran on."""

    steps: int
    total_steps: int
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1
    resumed_at: int = 0  # optimizer steps the checkpoint had already done


Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "constant"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of `finetune` (its docstring says what each does); its keyword arguments build one."""

    epochs: int = 1
    lr: float = 1e-3  # the peak learning rate
    optimizer: Optimizer = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd's
    schedule: Schedule = "cosine"
    temperature: float = 1.0
    alpha: float = 0.5  # the weight of distillation against the labels' loss
    label_loss: Callable[[torch.Tensor, Any], torch.Tensor] = F.cross_entropy
    features: tuple[str, ...] = ()  # vertices of both DAGs whose values are matched too
    feature_weight: float = 1.0
    freeze_bn: bool = False
    checkpoint: str | Path | None = None  # a folder
    checkpoint_every: int = 0  # steps between checkpoints (0: at the end of each epoch)
    resume: bool = True
    device: str | torch.device | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        _check_number("epochs", self.epochs, "an integer >= 1 (0 would train nothing)", integer=True, low=1)
        _check_number("lr", self.lr, "a finite number >= 0", low=0.0)
        _check_number("weight_decay", self.weight_decay, "a finite number >= 0", low=0.0)
        _check_number("momentum", self.momentum, "a finite number >= 0", low=0.0)
        _check_number("temperature", self.temperature, "a finite number > 0", above=0.0)
        _check_number("feature_weight", self.feature_weight, "a finite number >= 0", low=0.0)
        _check_number("checkpoint_every", self.checkpoint_every, "an integer >= 0", integer=True, low=0)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"alpha (the weight of distillation against labels) must be in [0, 1], got {self.alpha}"
            )
        check_option("optimizer", self.optimizer, choices(Optimizer), error=ValueError)
        check_option(
            "schedule", self.schedule, choices(Schedule), what="learning-rate schedule", error=ValueError
        )
        object.__setattr__(self, "features", tuple(self.features))


def _check_number(
    name: str,
    value: Any,
    expected: str,
    *,
    integer: bool = False,
    low: float | None = None,
    above: float | None = None,
) -> None:
    """Raise ValueError "<name> must be <expected>, got <value>" unless `value` is a finite number (an
    int when `integer`) >= `low` and > `above`."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and (not integer or isinstance(value, int))
    ok = ok and (low is None or value >= low) and (above is None or value > above)
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
