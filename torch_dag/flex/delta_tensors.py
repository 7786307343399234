"""Positions along a tensor's axis as level deltas store them, and the copies between a level's tensor
and its neighbour's: runs of (start, length) copied contiguously where they are few, else index tensors
gathered and scattered."""

from __future__ import annotations

import numpy as np
import torch

from ..core.errors import DagError
from .modules import index_runs

# Positions along an axis: (start, length) runs when there are few (copied run by run, contiguously),
# else an index tensor (gathered / scattered).
Where = list[tuple[int, int]] | torch.Tensor
FEW_RUNS = 8


def outside(tensor: torch.Tensor, positions: list) -> torch.Tensor:
    """The entries of `tensor` outside the outer product of the per-axis `positions`, flat, in pieces: for
    each axis in turn, the entries off its positions among those on the earlier axes' positions."""
    pieces = []
    for axis, runs in positions:
        on = where_of(indices(runs))
        pieces.append(take(tensor, axis, complement(on, tensor.shape[axis])).reshape(-1))
        tensor = take(tensor, axis, on)
    return torch.cat(pieces)


def indices(runs: list[list[int]]) -> np.ndarray:
    """The integers of runs [start, stop), in order."""
    spans = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    lengths = spans[:, 1] - spans[:, 0]
    if (lengths < 0).any():
        raise DagError(f"runs must have start <= stop, got {runs[:4]}")
    offsets = np.repeat(spans[:, 0] - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + offsets


def where_of(positions: np.ndarray) -> Where:
    """Sorted positions as runs where they are few, else as an index tensor."""
    runs = index_runs(positions)
    return [(a, b - a) for a, b in runs] if len(runs) <= FEW_RUNS else torch.from_numpy(positions)


def count(where: Where) -> int:
    """How many positions `where` holds."""
    return sum(length for _, length in where) if isinstance(where, list) else len(where)


def complement(where: Where, size: int) -> Where:
    """The positions of range(size) not in `where`."""
    mask = np.ones(size, dtype=bool)
    if isinstance(where, list):
        for start, length in where:
            mask[start : start + length] = False
    else:
        mask[where.numpy()] = False
    return where_of(np.flatnonzero(mask))


def take(tensor: torch.Tensor, axis: int, where: Where) -> torch.Tensor:
    """`tensor` at `where` along `axis`."""
    if not isinstance(where, list):
        return tensor.index_select(axis, where)
    if len(where) == 1:
        return tensor.narrow(axis, *where[0]).contiguous()
    return torch.cat(
        [tensor.narrow(axis, start, length) for start, length in where] or [tensor.narrow(axis, 0, 0)], axis
    )


def shrink(tensor: torch.Tensor, cuts: list[tuple[int, Where]]) -> torch.Tensor:
    """`tensor` at the given positions along each axis, in memory of its own (a view would keep the
    larger level's whole tensor alive), copied once where it can be: the axes cut to one run are
    narrowed first (views), then the others gathered."""
    single = [(axis, where[0]) for axis, where in cuts if isinstance(where, list) and len(where) == 1]
    several = [(axis, where) for axis, where in cuts if not (isinstance(where, list) and len(where) == 1)]
    for axis, (start, length) in single:
        tensor = tensor.narrow(axis, start, length)
    for axis, where in several:  # each gather makes a new tensor
        tensor = take(tensor, axis, where)
    return tensor if several else tensor.clone(memory_format=torch.contiguous_format)


def put(tensor: torch.Tensor, axis: int, where: Where, value: torch.Tensor) -> None:
    """`tensor` at `where` along `axis` = `value`."""
    if not isinstance(where, list):
        if len(where):
            tensor.index_copy_(axis, where, value)
        return
    offset = 0
    for start, length in where:
        tensor.narrow(axis, start, length).copy_(value.narrow(axis, offset, length))
        offset += length


def fill(
    new: torch.Tensor, axes: list[tuple[int, list, Where]], old: torch.Tensor, parts: list[torch.Tensor]
) -> None:
    """Write an expansion into `new`: for the first axis, its part off the kept positions, then each run
    of kept positions recursively (the next axes), down to the old tensor."""
    if not axes:
        new.copy_(old)
        return
    (axis, on, off), rest = axes[0], axes[1:]
    put(new, axis, off, parts[0])
    offset = 0
    for start, length in on:
        fill(
            new.narrow(axis, start, length),
            rest,
            old.narrow(axis, offset, length),
            [part.narrow(axis, offset, length) for part in parts[1:]],
        )
        offset += length
