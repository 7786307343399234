"""Output comparison: the toolkit's one definition of "equal" (the converter, flex, the CLI, tests and benchmarks)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten


def compare_outputs(reference: Any, actual: Any, *, rtol: float = 1e-5) -> tuple[bool, float, str]:
    """Whether `actual` equals `reference`: same structure, dtypes and shapes, and every tensor within
    `rtol * max(1, max|reference|)`; returns (equal, worst difference, reason when not equal)."""
    ref_leaves, ref_spec = tree_flatten(reference)
    act_leaves, act_spec = tree_flatten(actual)
    if len(ref_leaves) != len(act_leaves):
        return False, float("inf"), f"structure differs: {ref_spec} vs {act_spec}"
    worst = 0.0
    for i, (ref, act) in enumerate(zip(ref_leaves, act_leaves)):
        if not isinstance(ref, torch.Tensor):
            if ref != act:
                return False, float("inf"), f"output leaf {i}: {ref!r} != {act!r}"
            continue
        if not isinstance(act, torch.Tensor) or act.shape != ref.shape or act.dtype != ref.dtype:
            what = f"{tuple(act.shape)} {act.dtype}" if isinstance(act, torch.Tensor) else type(act).__name__
            return (
                False,
                float("inf"),
                f"output leaf {i}: expected {tuple(ref.shape)} {ref.dtype}, got {what}",
            )
        if ref.numel() == 0:
            continue
        ref64, act64 = ref.detach().double(), act.detach().double()
        both_nan = torch.isnan(ref64) & torch.isnan(act64)
        diff = (ref64 - act64).abs().masked_fill(both_nan, 0).nan_to_num(nan=float("inf"))
        worst = max(worst, diff.max().item())
        scale = max(1.0, ref64.abs().masked_fill(torch.isnan(ref64), 0).max().item())
        if worst > rtol * scale:
            return False, worst, f"output leaf {i}: max difference {worst:.3g} > {rtol} x {scale:.3g}"
    return True, worst, ""


def bitwise_equal(a: Any, b: Any) -> bool:
    """Same structure and bit-identical tensors (NaNs in the same places)."""
    a_leaves, a_spec = tree_flatten(a)
    b_leaves, b_spec = tree_flatten(b)
    if a_spec != b_spec:
        return False
    for x, y in zip(a_leaves, b_leaves):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
                return False
            if not torch.equal(_bits(x), _bits(y)):
                return False
        elif x != y:
            return False
    return True


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so NaNs and signed zeros compare exactly)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.is_floating_point() else flat
