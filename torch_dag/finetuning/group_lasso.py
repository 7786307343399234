"""Sparse training for pruning (`train_prune(..., method="group_lasso")`): a group-lasso penalty over
every weight a channel class owns, in every member of its group (producers' output rows and biases,
norms' affine entries, readers' input columns, tied parameters: the tensors `weight_members` lists, the
ones surgery slices), so that whole classes shrink together; removal then ranks classes by the norms
learned (Liu et al., 2017; Fang et al., 2023, Torch-Pruning's group regularizer)."""

from __future__ import annotations

import numpy as np
import torch

from ..core.dag import DagModule
from ..pruning.channels import ChannelGroups
from ..pruning.prune import weight_members


class GroupNorms:
    """The L2 norm of each prunable channel class over all its members' weights, differentiable."""

    def __init__(self, dag: DagModule, groups: ChannelGroups):
        self.members = [(t, axis, torch.from_numpy(roots)) for t, axis, roots in weight_members(dag, groups)]
        prunable = sorted({r for g in groups.groups() if g.prunable for r in g.channels})
        self.prunable = torch.tensor(prunable, dtype=torch.int64)
        self.size = groups.size

    def squares(self) -> torch.Tensor:
        """Over channel ids (at class roots): the sum of squares of every weight the class owns."""
        total = torch.zeros(self.size, dtype=torch.float32, device=self._device())
        for tensor, axis, roots in self.members:
            rows = tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1).float().square().sum(1)
            total = total.index_add(0, roots.to(total.device), rows)
        return total

    def penalty(self) -> torch.Tensor:
        """The sum over prunable classes of their norms (the group lasso)."""
        squares = self.squares()[self.prunable.to(self._device())]
        return torch.sqrt(squares + 1e-12).sum()

    def scores(self) -> dict[int, float]:
        """Each prunable class root's learned norm (what removal ranks by)."""
        with torch.no_grad():
            norms = self.squares().sqrt().cpu().numpy()
        return {int(r): float(norms[r]) for r in self.prunable.tolist()}

    def _device(self) -> torch.device:
        return self.members[0][0].device if self.members else torch.device("cpu")


def shrunk(norms: dict[int, float], before: dict[int, float]) -> float:
    """The median ratio of classes' norms after training to before (how far the penalty pulled them)."""
    ratios = [norms[r] / before[r] for r in norms if before.get(r, 0.0) > 0]
    return float(np.median(ratios)) if ratios else 1.0
