"""`FlopModel`: the FLOPs ratio a removal of channels would give, predicted without building the model
(prune bisects on it; flexible models pick their levels' widths with it)."""

from __future__ import annotations

import numpy as np
import torch

from .channels import ChannelGroups


class FlopModel:
    """Predicted FLOPs after slicing: each sliced vertex's FLOPs times its kept input and output
    channel fractions (exact for convs, linears and norms), attention's products by the shares of
    their FLOPs that shrink with heads or head dims (`Role.flop_shares`); other ops count as unchanged.

    Every fraction is a mean of the removal mask over some class roots: the roots of all of them lie
    end to end in one index array, so that a prediction is a few array operations, not one per vertex."""

    def __init__(self, groups: ChannelGroups, flops: dict[str, int]):
        self.total = sum(flops.values())
        segments: list[np.ndarray] = []

        def segment(roots: np.ndarray) -> int:  # -1: no channels, nothing to remove
            if not len(roots):
                return -1
            segments.append(roots)
            return len(segments) - 1

        sliced: list[int] = []  # FLOPs of each vertex that scales with its kept channel fractions
        sides: list[list[int]] = []  # its input and output segments
        shared: list[tuple[float, int]] = []  # FLOPs that shrink with the removed share of a segment
        for name, role in groups.roles.items():
            if not flops.get(name):
                continue
            if role.flop_shares:
                shared += [
                    (flops[name] * share, segment(groups.root(ids))) for share, ids in role.flop_shares
                ]
                continue
            same = role.out_ids is role.in_ids  # depthwise: one fraction, not two
            sides.append(
                [
                    segment(groups.root(ids)) if ids is not None else -1
                    for ids in (role.in_ids, None if same else role.out_ids)
                ]
            )
            sliced.append(flops[name])
        shared = [(f, s) for f, s in shared if s >= 0]
        lengths = np.array([len(r) for r in segments], dtype=np.int64)
        self._roots = np.concatenate(segments) if segments else np.zeros(0, dtype=np.int64)
        self._starts = np.cumsum(lengths) - lengths
        self._lengths = lengths
        self._sliced = np.array(sliced, dtype=np.float64)
        self._sides = np.array(sides, dtype=np.int64).reshape(-1, 2)
        self._shared = np.array([f for f, _ in shared], dtype=np.float64)
        self._shared_segments = np.array([s for _, s in shared], dtype=np.int64)

    def ratio(self, removed: np.ndarray) -> float:
        """The predicted FLOPs ratio when the class roots where `removed` (a mask over ids) is true go."""
        if not len(self._roots):
            return 1.0
        gone = np.add.reduceat(removed[self._roots].astype(np.float64), self._starts) / self._lengths
        kept = np.append(1 - gone, 1.0)  # index -1: a side without channels keeps everything
        fraction = kept[self._sides[:, 0]] * kept[self._sides[:, 1]]
        lost = self._sliced @ (1 - fraction) + self._shared @ gone[self._shared_segments]
        return float((self.total - lost) / self.total)

    def soft_ratio(self, kept: torch.Tensor) -> torch.Tensor:
        """The same ratio with each class root kept at a fraction (`kept`, a tensor over channel ids, 1
        where nothing is removed), in torch so that a loss on it has gradients towards every fraction
        (the budget of `train_prune`'s gates)."""
        if not len(self._roots):
            return kept.new_ones((), dtype=torch.float64)
        segments = torch.from_numpy(np.repeat(np.arange(len(self._lengths)), self._lengths))
        per_segment = torch.zeros(len(self._lengths), dtype=torch.float64).index_add(
            0, segments, kept.double()[torch.from_numpy(self._roots)]
        )
        fraction = torch.cat(
            [per_segment / torch.from_numpy(self._lengths).double(), per_segment.new_ones(1)]
        )
        sides = torch.from_numpy(self._sides)
        both = fraction[sides[:, 0]] * fraction[sides[:, 1]]
        shared = fraction[torch.from_numpy(self._shared_segments)]
        lost = torch.from_numpy(self._sliced) @ (1 - both) + torch.from_numpy(self._shared) @ (1 - shared)
        return (self.total - lost) / self.total
