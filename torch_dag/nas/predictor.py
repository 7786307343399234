"""A learned accuracy predictor for `search`: scores of sub-networks regressed on their choices, so that
many candidates are screened for the price of scoring a few.

A choice is encoded as a vector: each mutable's choice index scaled to [0, 1] (the `decode` vector's
convention: 0 the first choice, 1 the last), plus one indicator per candidate of op mutables with more
than two candidates (their order means nothing). `RidgePredictor` fits a ridge regression on those
features and their squares; any object with `fit(x, y)` and `predict(x)` can replace it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..core.errors import DagError


class Predictor(Protocol):
    """What `search(predictor=...)` needs: fitted on encoded choices and their scores, it predicts scores."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> None: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


class RidgePredictor:
    """Ridge regression on the encoded choices and their squares (standardized), closed form."""

    def __init__(self, alpha: float = 1.0):
        if not alpha > 0:
            raise ValueError(f"alpha (the ridge penalty) must be > 0, got {alpha!r}")
        self.alpha = alpha
        self._mean: np.ndarray | None = None
        self._scale: np.ndarray | None = None
        self._coef: np.ndarray | None = None
        self._offset = 0.0

    def _features(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, x**2], axis=1)

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        features = self._features(np.asarray(x, dtype=np.float64))
        self._mean = features.mean(0)
        self._scale = features.std(0) + 1e-9
        z = (features - self._mean) / self._scale
        target = np.asarray(y, dtype=np.float64)
        self._offset = float(target.mean())
        gram = z.T @ z + self.alpha * np.eye(z.shape[1])
        self._coef = np.linalg.solve(gram, z.T @ (target - self._offset))

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self._coef is None or self._mean is None or self._scale is None:
            raise DagError("RidgePredictor.predict before fit: fit it on scored candidates first")
        z = (self._features(np.asarray(x, dtype=np.float64)) - self._mean) / self._scale
        return z @ self._coef + self._offset


class ChoiceEncoder:
    """Choices of one searchable DAG's mutables as fixed-length vectors (see the module docstring)."""

    def __init__(self, mutables: Sequence[Any]):
        self.names = [m.name for m in mutables]
        self.kinds = {m.name: m.kind for m in mutables}
        self.index = {m.name: {_key(c): i for i, c in enumerate(m.choices)} for m in mutables}
        self.one_hot = [m.name for m in mutables if m.kind == "op" and m.num_choices > 2]

    @property
    def width(self) -> int:
        return len(self.names) + sum(len(self.index[name]) for name in self.one_hot)

    def encode(self, choice: dict[str, Any]) -> np.ndarray:
        row = []
        for name in self.names:
            positions = self.index[name]
            position = positions.get(_key(choice[name]))
            if position is None:
                raise DagError(f"mutable {name!r}: {choice[name]!r} is not one of its choices")
            row.append(position / max(1, len(positions) - 1))
        for name in self.one_hot:
            hot = [0.0] * len(self.index[name])
            hot[self.index[name][_key(choice[name])]] = 1.0
            row.extend(hot)
        return np.asarray(row, dtype=np.float64)

    def encode_all(self, choices: Sequence[dict[str, Any]]) -> np.ndarray:
        return np.stack([self.encode(c) for c in choices]) if choices else np.zeros((0, self.width))


def make_predictor(predictor: Predictor | str | None) -> Predictor | None:
    """`search`'s `predictor`: None, "ridge", or an object with fit / predict."""
    if predictor is None or predictor == "none":
        return None
    if predictor == "ridge":
        return RidgePredictor()
    if isinstance(predictor, str) or not (hasattr(predictor, "fit") and hasattr(predictor, "predict")):
        raise ValueError(
            f"predictor must be None, 'ridge' or an object with fit(x, y) and predict(x), got {predictor!r}"
        )
    return predictor


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
