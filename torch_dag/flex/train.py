"""Training all levels of a flexible model together (the sandwich rule of slimmable networks)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

from .model import FlexDagModule


def sandwich_step(
    flex: FlexDagModule,
    inputs: tuple | torch.Tensor,
    target: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    distill: bool = True,
    temperature: float = 1.0,
    rng: random.Random | None = None,
) -> dict[int, float]:
    """One optimizer step over the largest, the smallest and one random middle level (each batch).

    The largest level learns from `target` with `loss_fn`; the others too, or, with `distill`, from the
    largest level's (detached) outputs by KL divergence at `temperature` (in-place distillation).
    Gradients of every level accumulate into the shared weights before the step. Returns the loss per
    level trained; the model is left at its largest level."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    top = flex.max_level()
    levels = [top, 0]
    if top > 1:
        levels.append((rng or random).randint(1, top - 1))
    optimizer.zero_grad(set_to_none=True)
    losses, teacher = {}, None
    for level in dict.fromkeys(levels):
        flex.set_level_use(level)
        out = flex(*inputs)
        if level == top or not distill:
            loss = loss_fn(out, target)
            teacher = out.detach() if level == top else teacher
        else:
            teacher = cast(torch.Tensor, teacher)  # the largest level runs first and sets it
            loss = (
                F.kl_div(
                    F.log_softmax(out / temperature, -1),
                    F.log_softmax(teacher / temperature, -1),
                    reduction="batchmean",
                    log_target=True,
                )
                * temperature**2
            )
        loss.backward()
        losses[level] = float(loss)
    optimizer.step()
    flex.set_level_use(top)
    return losses
