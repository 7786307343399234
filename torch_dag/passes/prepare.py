"""The setup shared by the passes that take a target, example inputs and calibration batches (`prune`,
`factorize`, `make_flexible`): one target checked, example inputs defaulted, nested DAGs flattened,
calibration batches listed (each is read more than once) and split into fitting and held-out parts;
nn.MultiheadAttention vertices decomposed into atomic ones (`decompose_attention`), whose heads prune.

Data-aware solutions never judge themselves on the data they were fitted to: `split_calibration` holds
out every `HOLD_OUT_EVERY`-th batch (the last one with 2 or 3 batches); a single batch of several samples
holds out its last quarter of samples, and a single sample the last quarter of each layer's rows."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ..core.dag import DagModule
from ..core.errors import DagError
from ..core.ops import is_dag_module
from .decompose_attention import decompose_attention
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
    raise if there is none); flatten a DAG with nested DagModules; decompose its nn.MultiheadAttention
    vertices (`decompose_attention`), leaving those it cannot decompose as they are."""
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
    dag = decompose_attention(dag, as_inputs(example_inputs), strict=False)  # heads become prunable
    return Prepared(dag, as_inputs(example_inputs), batches, target, value)


HOLD_OUT_EVERY = 4  # every 4th calibration batch (or a quarter of one batch's samples) is held out
Part = Literal["fit", "held", "split"]  # which moment a batch feeds; split: its rows, by `HOLD_OUT_EVERY`


@dataclass(frozen=True)
class CalibrationSplit:
    """The calibration batches cut into those solutions are fitted on and those they are judged on."""

    fit: tuple[tuple, ...]
    held: tuple[tuple, ...]  # empty: one sample, whose rows each layer splits (`Part` "split")
    batches: int  # how many batches the user gave

    def parts(self) -> Iterator[tuple[Part, tuple]]:
        """Each batch with the part it feeds."""
        if not self.held:
            yield from (("split", batch) for batch in self.fit)
            return
        yield from (("fit", batch) for batch in self.fit)
        yield from (("held", batch) for batch in self.held)

    def batches_for(self, rows_needed: int, rows_seen: int) -> int:
        """How many batches like these would give `rows_needed` fitting rows to a layer that saw
        `rows_seen` rows (fitting and held-out) from these."""
        per_batch = max(rows_seen / self.batches, 1e-9)
        count = max(self.batches, 2)
        while (count - held_out_count(count)) * per_batch < rows_needed:
            count += 1
        return count


def held_out_count(batches: int) -> int:
    """How many of `batches` calibration batches are held out."""
    return max(1, batches // HOLD_OUT_EVERY) if batches >= 2 else 0


def split_calibration(batches: tuple[tuple, ...]) -> CalibrationSplit:
    """Every `HOLD_OUT_EVERY`-th batch held out (the last of 2 or 3); one batch: its last quarter of
    samples (axis 0 of every tensor input of the common leading size), or with one sample, its rows."""
    count = len(batches)
    if count >= 2:
        held = {i for i in range(count) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1} or {count - 1}
        return CalibrationSplit(
            tuple(b for i, b in enumerate(batches) if i not in held),
            tuple(batches[i] for i in sorted(held)),
            count,
        )
    if count == 1:
        (batch,) = batches
        sizes = {x.shape[0] for x in batch if isinstance(x, torch.Tensor) and x.dim() > 0}
        if len(sizes) == 1 and (size := sizes.pop()) >= 2:
            cut = size - max(1, size // HOLD_OUT_EVERY)
            parts = [_samples(batch, size, slice(None, cut)), _samples(batch, size, slice(cut, None))]
            return CalibrationSplit((parts[0],), (parts[1],), 1)
    return CalibrationSplit(batches, (), count)


def _samples(batch: tuple, size: int, part: slice) -> tuple:
    return tuple(
        x[part] if isinstance(x, torch.Tensor) and x.dim() > 0 and len(x) == size else x for x in batch
    )


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
