"""The setup shared by the passes that take a target, example inputs and calibration batches (`prune`,
`factorize`, `make_flexible`): one target checked, example inputs defaulted, nested DAGs flattened,
calibration batches listed (each is read more than once)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch

from ..core.dag import DagModule
from ..core.errors import DagError
from ..core.ops import is_dag_module
from .hierarchy import flatten


@dataclass(frozen=True)
class Prepared:
    """What such a pass starts from."""

    dag: DagModule  # flat: nested DagModules inlined (channels and layers cross block boundaries)
    example_inputs: tuple
    calibration: tuple[tuple, ...] | None  # each batch as a tuple of the DAG's inputs
    target: str | None = None  # the name of the one target given
    value: float | None = None  # its value

    @property
    def goal(self) -> tuple[str, float]:
        """(name, value) of the target, for a pass that asked `prepare` to choose one."""
        if self.target is None or self.value is None:
            raise DagError("no target: call prepare(..., targets=...)")
        return self.target, self.value


def prepare(
    dag: DagModule,
    example_inputs: tuple | torch.Tensor | None = None,
    calibration: Iterable | None = None,
    *,
    targets: Mapping[str, float | None] | None = None,
    fractions: Collection[str] = (),
    inputs_from_calibration: bool = False,
    empty_calibration: str | None = None,
) -> Prepared:
    """Check that exactly one of `targets` is given (those named in `fractions` must lie in (0, 1]);
    default `example_inputs` to random inputs of the converted shapes, or with `inputs_from_calibration`
    to the first calibration batch; list the calibration batches (`empty_calibration`: the error to
    raise if there is none); flatten a DAG with nested DagModules."""
    target, value = _one_target(targets, fractions) if targets is not None else (None, None)
    if example_inputs is None and not inputs_from_calibration:
        example_inputs = dag.example_inputs()
    batches = tuple(as_inputs(b) for b in calibration) if calibration is not None else None
    if batches == () and empty_calibration is not None:
        raise DagError(empty_calibration)
    if example_inputs is None:
        example_inputs = batches[0] if batches else dag.example_inputs()
    if any(is_dag_module(v.module) for v in dag):
        dag = flatten(dag)
    return Prepared(dag, as_inputs(example_inputs), batches, target, value)


def as_inputs(batch: tuple | list | torch.Tensor) -> tuple:
    """A batch (one tensor, or a sequence of the DAG's inputs) as a tuple of inputs."""
    return (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)


def check_fraction(name: str, value: float, note: str = "") -> None:
    """A ratio of what the model keeps must lie in (0, 1]."""
    if not 0 < value <= 1:
        raise DagError(f"{name} must be in (0, 1], got {value:.4g}{note}")


def _one_target(targets: Mapping[str, float | None], fractions: Collection[str]) -> tuple[str, float]:
    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) != 1:
        raise DagError(f"give exactly one of {', '.join(targets)} (got {sorted(given) or 'none'})")
    ((name, value),) = given.items()
    if name in fractions:
        check_fraction(name, value)
    return name, value
