"""Search over a searchable DAG's choices (op choices, values, widths) under a cost constraint.

    front = td.nas.search(sdag, score, {"flops_ratio": 0.5}, example_inputs=(x,), calibration=batches)
    best = front.best          # (choice, cost, score): the highest score under the constraint
    plain = td.nas.export_subnet(sdag, best.choice)

Costs come from the FLOP counter at each choice (one forward pass of one sample, cached per choice), or
from a latency table's prediction; candidates over the constraint are dropped before they are scored.
A scored candidate is exported as a plain sub-network, its batchnorm statistics are re-estimated on the
calibration batches (sandwich training leaves statistics that fit no sub-network in particular), and
`score(subnet)` says how good it is (higher is better: `accuracy_score`, `loss_score`).

"evolution" starts from random valid samples and breeds the best half of the population by mutation
(each mutable redrawn with probability 1 / number of mutables, at least one) and uniform crossover;
"random" scores random valid samples. With a `predictor`, once enough candidates are scored, each round
draws several times more candidates than it scores and scores those the predictor ranks highest.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..analysis.flops import FlopReport, count_flops
from ..core.dag import DagModule
from ..core.errors import DagError
from ..core.options import check_option, choices
from ..core.progress import show_progress
from ..finetuning.batchnorm import recalibrate_batchnorm
from ..finetuning.losses import logits, unpack
from ..flex.modules import FlexModule
from ..latency.table import LatencyTable
from ..passes.prepare import as_inputs
from .predictor import ChoiceEncoder, Predictor, make_predictor
from .space import dump_chosen, export_subnet, largest, mutables, sample, set_chosen, smallest

Choice = dict[str, Any]  # {mutable name: its choice}, as td.nas.dump_chosen gives

Strategy = Literal["evolution", "random"]
METRICS = ("flops", "params", "latency")  # each as an absolute bound ("flops") or a ratio ("flops_ratio")
SCREEN = 4  # with a predictor: candidates drawn per candidate scored
DRAWS_PER_CANDIDATE = 50  # draws allowed per candidate scored before the search stops (space exhausted)


class Candidate(NamedTuple):
    """One scored sub-network: its choice, its cost in the constraint's metric, its score."""

    choice: Choice
    cost: float
    score: float


class ParetoFront(list[Candidate]):
    """The candidates no other beats on both cost and score, sorted by cost (so by score too). `best` is
    the highest-scoring candidate under the constraint (the last of the front); `evaluated` is every
    candidate scored, in order; `metric` names the cost ("flops_ratio", ...)."""

    def __init__(self, evaluated: list[Candidate], metric: str, seconds: float, stats: dict[str, Any]):
        super().__init__(pareto(evaluated))
        self.evaluated = evaluated
        self.metric = metric
        self.seconds = seconds
        self.stats = stats  # drawn, rejected over the constraint, predictor correlation ...

    @property
    def best(self) -> Candidate:
        if not self:
            raise DagError("the search scored no candidate: nothing is best")
        return self[-1]


def pareto(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The non-dominated candidates (lower cost, higher score), sorted by cost."""
    front: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.cost, -c.score)):
        if not front or candidate.score > front[-1].score:
            front.append(candidate)
    return front


def search(
    sdag: DagModule,
    score: Callable[[DagModule], float],
    constraints: Mapping[str, float],
    strategy: Strategy = "evolution",
    budget: int = 1000,
    *,
    example_inputs: tuple | torch.Tensor | None = None,
    calibration: Iterable | None = None,
    predictor: Predictor | str | None = None,
    latency_table: LatencyTable | None = None,
    population: int = 50,
    seed: int = 0,
    progress: bool = True,
) -> ParetoFront:
    """Score up to `budget` distinct sub-networks of `sdag` meeting every constraint ({"flops_ratio": 0.5},
    {"flops": n}, {"params_ratio": r}, {"params": n}, {"latency_ratio": r} or {"latency": us} with
    `latency_table`; ratios are to the largest sub-network), and return their Pareto front of score
    against the first constraint's cost. `example_inputs` (default: the DAG's recorded ones) are what
    FLOPs are counted on; `calibration` (batches of inputs), when given, re-estimates each candidate's
    batchnorm statistics before it is scored. `sdag` is left at the choice it had."""
    check_option("strategy", strategy, choices(Strategy), what="search strategy", error=ValueError)
    if not isinstance(budget, int) or budget < 1 or not isinstance(population, int) or population < 2:
        raise ValueError(
            f"budget must be an integer >= 1 and population >= 2, got {budget!r}, {population!r}"
        )
    found = mutables(sdag)
    if not found:
        raise DagError("search needs a searchable DAG: this one has no mutables (td.nas.make_mutable)")
    initial = dump_chosen(sdag)
    batches = [as_inputs(b) for b in calibration] if calibration is not None else None
    if batches is not None and not batches:
        raise DagError("calibration= is empty: give batches of inputs, or None to keep the statistics")
    start = time.perf_counter()
    try:
        costs = Costs(sdag, example_inputs, constraints, latency_table)
        run = _Search(sdag, score, costs, batches, ChoiceEncoder(found), make_predictor(predictor), seed)
        bar = show_progress(total=budget, desc="search", unit="candidate", disable=not progress)
        try:
            run.bar = bar
            if strategy == "random":
                run.random_search(budget, population)
            else:
                run.evolve(budget, population)
        finally:
            bar.close()
    finally:
        choose(sdag, initial)
    return ParetoFront(run.scored, costs.metric, time.perf_counter() - start, run.stats())


class Costs:
    """The constrained metrics of each choice (cached), and whether a choice meets the constraints."""

    def __init__(
        self,
        sdag: DagModule,
        example_inputs: tuple | torch.Tensor | None,
        constraints: Mapping[str, float],
        table: LatencyTable | None,
    ):
        self.sdag = sdag
        self.bounds = _bounds(constraints, table)
        self.metric = next(iter(constraints))
        inputs = as_inputs(example_inputs) if example_inputs is not None else sdag.example_inputs()
        self.inputs = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)
        self.table = table
        self._cache: dict[str, dict[str, float]] = {}
        top = largest(sdag)
        self._full_shapes = self._report(top).shapes
        if table is not None:
            _check_table(sdag, table, self._full_shapes)
        self.full = self.metrics(top)
        bottom = smallest(sdag)
        if not self.meets(bottom):
            shown = ", ".join(f"{k} {self.value(bottom, k):.4g}" for k in self.bounds)
            raise DagError(
                f"no sub-network meets the constraints {dict(constraints)}: even the smallest has {shown}; "
                "loosen them"
            )

    def _report(self, choice: Choice) -> FlopReport:
        choose(self.sdag, choice)
        return count_flops(self.sdag, *self.inputs)

    def metrics(self, choice: Choice) -> dict[str, float]:
        key = _key(choice)
        cached = self._cache.get(key)
        if cached is None:
            report = self._report(choice)
            cached = {"flops": float(report.total_flops), "params": float(report.total_params)}
            if self.table is not None:
                cached["latency"] = self.table.predict(_widths(self.table, self._full_shapes, report.shapes))
            self._cache[key] = cached
        return cached

    def value(self, choice: Choice, name: str) -> float:
        """`name` ("flops", "flops_ratio", ...) at `choice`; ratios to the largest sub-network."""
        metric, ratio = name.removesuffix("_ratio"), name.endswith("_ratio")
        value = self.metrics(choice)[metric]
        return value / self.full[metric] if ratio else value

    def meets(self, choice: Choice) -> bool:
        return all(self.value(choice, name) <= bound * (1 + 1e-9) for name, bound in self.bounds.items())

    def cost(self, choice: Choice) -> float:
        return self.value(choice, self.metric)


def _bounds(constraints: Mapping[str, float], table: LatencyTable | None) -> dict[str, float]:
    known = [f"{m}{s}" for m in METRICS for s in ("", "_ratio")]
    if not isinstance(constraints, Mapping) or not constraints:
        raise ValueError(
            f"constraints must be a non-empty dict such as {{'flops_ratio': 0.5}} (keys: {known})"
        )
    bounds = {}
    for name, bound in constraints.items():
        check_option("constraint", name, known, error=ValueError)
        number = isinstance(bound, (int, float)) and not isinstance(bound, bool) and math.isfinite(bound)
        if not number or bound <= 0 or (name.endswith("_ratio") and bound > 1):
            raise ValueError(f"constraint {name}: expected a number > 0 (a ratio in (0, 1]), got {bound!r}")
        if name.startswith("latency") and table is None:
            raise ValueError(
                f"constraint {name} needs latency_table= (td.latency_table of the largest subnet)"
            )
        bounds[name] = float(bound)
    return bounds


def _check_table(sdag: DagModule, table: LatencyTable, shapes: dict[str, tuple[int, ...]]) -> None:
    """A latency table predicts widths only: every op choice must be fixed, and its groups be vertices."""
    free = [m.name for m in mutables(sdag) if m.kind != "channel" and m.num_choices > 1]
    if free:
        raise DagError(
            f"a latency table predicts channel widths only, and mutables {free} choose ops or values: fix "
            "them (m.fix_chosen) or constrain flops instead"
        )
    missing = [g.key for g in table.prunable if g.key not in shapes]
    if missing:
        raise DagError(
            f"the latency table's channel groups {missing[:5]} are not vertices of this DAG: build the table "
            "on its largest sub-network (td.latency_table(td.nas.export_subnet(sdag, td.nas.largest(sdag))))"
        )


def _widths(table: LatencyTable, full: dict, shapes: dict) -> dict[str, float]:
    """Each prunable group's kept fraction: its first producer's output at this choice against in full."""
    widths = {}
    for group in table.prunable:
        before, after = full[group.key], shapes[group.key]
        changed = [a / b for a, b in zip(after, before) if a != b]
        widths[group.key] = float(changed[0]) if changed else 1.0
    return widths


@dataclass
class _Search:
    """One search's state: what was scored, what was drawn, the predictor and its record."""

    sdag: DagModule
    score_fn: Callable[[DagModule], float]
    costs: Costs
    calibration: list[tuple] | None
    encoder: ChoiceEncoder
    predictor: Predictor | None
    seed: int
    scored: list[Candidate] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    drawn: int = 0
    rejected: int = 0
    predicted: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured)
    bar: Any = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.mutables = mutables(self.sdag)

    def valid(self, draw: Callable[[], Choice], count: int, limit: int) -> list[Choice]:
        """Up to `count` new choices from `draw` that meet the constraints, within `limit` draws."""
        out: list[Choice] = []
        keys: set[str] = set()
        for _ in range(limit):
            if len(out) == count:
                break
            choice = draw()
            key = _key(choice)
            self.drawn += 1
            if key in self.seen or key in keys:
                continue
            if not self.costs.meets(choice):
                self.rejected += 1
                continue
            keys.add(key)
            out.append(choice)
        return out

    def evaluate(self, choices: Sequence[Choice], budget: int) -> list[Candidate]:
        """Score `choices` (the predictor's favourites first, when it is trained), up to the budget."""
        room = budget - len(self.scored)
        ranked, guesses = self.screen(list(choices), room)
        fresh = []
        for choice, guess in zip(ranked, guesses):
            subnet = export_subnet(self.sdag, choice)
            if self.calibration is not None:
                recalibrate_batchnorm(subnet, self.calibration)
            subnet.eval()
            value = float(self.score_fn(subnet))
            if not math.isfinite(value):
                raise DagError(
                    f"score returned {value} for the sub-network {choice}: it must be a finite number"
                )
            candidate = Candidate(choice, self.costs.cost(choice), value)
            self.seen.add(_key(choice))
            self.scored.append(candidate)
            fresh.append(candidate)
            if guess is not None:
                self.predicted.append((guess, value))
            self.bar.update(1)
            self.bar.set_postfix(best=f"{max(c.score for c in self.scored):.4g}")
        return fresh

    def screen(self, choices: list[Choice], room: int) -> tuple[list[Choice], list[float | None]]:
        """The choices to score: all of them (up to `room`), or the predictor's best `room`."""
        if self.predictor is None or len(self.scored) < self.warmup or len(choices) <= room:
            return choices[:room], [None] * min(room, len(choices))
        self.predictor.fit(self.encoder.encode_all([c.choice for c in self.scored]), self._scores())
        guesses = self.predictor.predict(self.encoder.encode_all(choices))
        order = np.argsort(-guesses)[:room]
        return [choices[i] for i in order], [float(guesses[i]) for i in order]

    @property
    def warmup(self) -> int:
        return max(10, 2 * self.encoder.width)

    def _scores(self) -> np.ndarray:
        return np.array([c.score for c in self.scored])

    def draws(self, size: int) -> int:
        """How many candidates to draw for `size` to be scored (more when a trained predictor screens)."""
        trained = self.predictor is not None and len(self.scored) >= self.warmup
        return size * SCREEN if trained else size

    def random_search(self, budget: int, population: int) -> None:
        while len(self.scored) < budget:
            size = min(population, budget - len(self.scored))
            batch = self.valid(
                lambda: sample(self.sdag, self.rng), self.draws(size), DRAWS_PER_CANDIDATE * size
            )
            if not batch:
                return  # the space is exhausted (or nearly all of it breaks the constraints)
            self.evaluate(batch, len(self.scored) + size)

    def evolve(self, budget: int, population: int) -> None:
        first = self.valid(
            lambda: sample(self.sdag, self.rng), min(population, budget), DRAWS_PER_CANDIDATE * population
        )
        alive = self.evaluate(first, budget)
        while alive and len(self.scored) < budget:
            parents = sorted(alive, key=lambda c: -c.score)[: max(2, population // 2)]
            size = min(population, budget - len(self.scored))
            children = self.valid(
                functools.partial(self.child, parents), self.draws(size), DRAWS_PER_CANDIDATE * size
            )
            if not children:
                return  # no new valid child: the reachable space is exhausted
            fresh = self.evaluate(children, len(self.scored) + size)
            alive = sorted([*alive, *fresh], key=lambda c: -c.score)[:population]

    def child(self, parents: list[Candidate]) -> Choice:
        """A mutation of one parent, or a uniform crossover of two, half the time each."""
        if len(parents) > 1 and self.rng.random() < 0.5:
            a, b = self.rng.sample(parents, 2)
            return {name: (a if self.rng.random() < 0.5 else b).choice[name] for name in a.choice}
        choice = dict(self.rng.choice(parents).choice)
        free = [m for m in self.mutables if m.num_choices > 1]
        if not free:
            return choice
        rate = 1 / len(free)
        picked = [m for m in free if self.rng.random() < rate] or [self.rng.choice(free)]
        for m in picked:
            choice[m.name] = self.rng.choice([c for c in m.choices if c != choice[m.name]])
        return choice

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"scored": len(self.scored), "drawn": self.drawn, "rejected": self.rejected}
        if len(self.predicted) > 2:
            guess, real = np.array(self.predicted).T
            stats["predictor_correlation"] = float(np.corrcoef(guess, real)[0, 1])
        return stats


def _key(choice: Choice) -> str:
    return json.dumps(choice, sort_keys=True)


def choose(sdag: DagModule, choice: Choice) -> None:
    """`set_chosen`, then the flexible layers' cached slice indices dropped: the cache is keyed by the id
    of a cut's index array, and the arrays of custom widths set before are freed, so a new one can reuse
    an id and be served an old slice (wrong channels, or a shape error)."""
    set_chosen(sdag, choice)
    for module in sdag.modules():
        if isinstance(module, FlexModule):
            module._index_cache.clear()


# --- scores -------------------------------------------------------------------------------------------


def accuracy_score(batches: Iterable[Any]) -> Callable[[torch.nn.Module], float]:
    """A score: the top-1 accuracy over `batches` of (inputs, labels) (held out from calibration)."""
    data = [unpack(b) for b in batches]
    if not data or any(target is None for *_, target in data):
        raise DagError("accuracy_score needs batches of (inputs, labels)")

    @torch.no_grad()
    def score(model: torch.nn.Module) -> float:
        correct = total = 0
        for inputs, kwargs, target in data:
            predicted = logits(model(*inputs, **kwargs)).argmax(-1)
            correct += int((predicted == target).sum())
            total += target.numel()
        return correct / total

    return score


def loss_score(
    batches: Iterable[Any], reference: torch.nn.Module, temperature: float = 1.0
) -> Callable[[torch.nn.Module], float]:
    """A score for data without labels: minus the mean KL divergence of a sub-network's outputs from
    `reference`'s (the largest sub-network: the supernet's in-place distillation loss) over `batches`."""
    data = [unpack(b)[:2] for b in batches]
    if not data:
        raise DagError("loss_score needs at least one batch of inputs")
    with torch.no_grad():
        reference.eval()
        wanted = [logits(reference(*inputs, **kwargs)).float() / temperature for inputs, kwargs in data]

    @torch.no_grad()
    def score(model: torch.nn.Module) -> float:
        total = 0.0
        for (inputs, kwargs), target in zip(data, wanted):
            out = logits(model(*inputs, **kwargs)).float() / temperature
            total += float(
                F.kl_div(
                    F.log_softmax(out, -1), F.log_softmax(target, -1), reduction="batchmean", log_target=True
                )
            )
        return -total / len(data) * temperature**2

    return score
