"""`td.nas.search`: costs from the FLOP counter at each choice, candidates over the constraint never scored,
each scored sub-network recalibrated and exported plain, the Pareto front, the strategies, the predictor."""

from __future__ import annotations

import itertools
import json
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dag as td
from torch_dag.nas.predictor import ChoiceEncoder, RidgePredictor


class Idioms(nn.Module):
    """What people write: `B, _, H, W = x.shape`, a concat, a residual, `x.mean((2, 3))`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.a, self.b = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, padding=1)
        self.mix, self.bn2 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        y = F.relu(self.bn(self.stem(x)))
        z = torch.cat([self.a(y), self.b(y)], 1)
        y = y + F.relu(self.bn2(self.mix(z)))
        return self.head(y.sum((2, 3)).reshape(B, -1) / (H * W) + y.mean((2, 3)))


class Attention(nn.Module):
    """Tokens through `nn.MultiheadAttention` and an MLP, both residual."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(self.norm(h))
        return self.head(h.mean(1))


ACTIVATIONS = {"relu": nn.ReLU(), "hswish": nn.Hardswish(), "gelu": nn.GELU()}


def searchable(model: nn.Module, x: torch.Tensor | None = None) -> td.DagModule:
    """`model` converted (on `x`, or without example inputs), flexible widths, its activations mutable."""
    torch.manual_seed(0)
    dag = td.build_from_unstructured_module(model.eval(), (x,) if x is not None else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # narrow groups round finer (make_flexible says so)
        flex = td.make_flexible(dag)
    return td.nas.make_mutable(flex, (nn.ReLU, nn.GELU), ACTIVATIONS)


def image_batches(n: int, seed: int = 0, size: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, size, size, generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(n)
    ]


def flops_ratios(sdag: td.DagModule, choices: list[dict], x: torch.Tensor) -> list[float]:
    """The oracle: FLOPs of each exported plain sub-network over those of the exported largest."""
    full = td.count_flops(td.nas.export_subnet(sdag, td.nas.largest(sdag)), x).total_flops
    return [td.count_flops(td.nas.export_subnet(sdag, c), x).total_flops / full for c in choices]


def output_score(batches):
    """A deterministic score of a sub-network: minus its mean squared output (any number to maximise)."""

    @torch.no_grad()
    def score(model):
        return -float(sum(model(x).pow(2).mean() for x, _ in batches))

    return score


@pytest.mark.parametrize("strategy", ["evolution", pytest.param("random", marks=pytest.mark.slow)])
def test_front_meets_the_constraint_and_costs_match_the_exported_subnets(strategy):
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    before = td.nas.dump_chosen(sdag)
    batches = image_batches(2)
    front = td.nas.search(
        sdag,
        td.nas.accuracy_score(batches),
        {"flops_ratio": 0.5},
        strategy=strategy,
        budget=8,
        population=4,
        example_inputs=(x,),
        progress=False,
    )
    assert td.nas.dump_chosen(sdag) == before  # left at the choice it had
    assert 1 <= len(front) <= len(front.evaluated) == 8 == front.stats["scored"]
    assert len({json.dumps(c.choice, sort_keys=True) for c in front.evaluated}) == 8  # distinct
    expected = flops_ratios(sdag, [c.choice for c in front.evaluated], x)
    assert [c.cost for c in front.evaluated] == pytest.approx(expected, rel=1e-9)
    assert max(expected) <= 0.5
    costs, scores = [c.cost for c in front], [c.score for c in front]
    assert costs == sorted(costs) and scores == sorted(scores)
    for member in front:  # nothing scored beats a front member on both counts
        assert not any(c.cost <= member.cost and c.score > member.score for c in front.evaluated)
    assert front.best == max(front.evaluated, key=lambda c: (c.score, -c.cost))


def test_each_candidate_is_scored_as_its_recalibrated_plain_subnet():
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    calibration = [b for b, _ in image_batches(3, seed=1)]
    seen = []

    def score(model):
        assert not any(td.nas.is_mutable(v.module) or td.flex.is_flex(v.module) for v in model)
        seen.append(model)
        return float(len(seen))

    front = td.nas.search(
        sdag,
        score,
        {"flops_ratio": 0.6},
        budget=5,
        example_inputs=(x,),
        calibration=calibration,
        progress=False,
    )
    probe = torch.randn(4, 3, 12, 12)
    for candidate, model in zip(front.evaluated, seen):
        expected = td.nas.export_subnet(sdag, candidate.choice)  # the oracle: export, then recalibrate
        td.recalibrate_batchnorm(expected, calibration)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(probe), expected.eval()(probe))


@pytest.mark.slow
def test_with_the_budget_over_the_space_random_search_finds_the_true_best():
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    for m in td.nas.mutables(sdag):
        if m.kind == "op":
            m.fix_chosen("relu")
    batches = image_batches(1)
    score = output_score(batches)
    space = [m for m in td.nas.mutables(sdag) if not m.is_fixed]
    every = [
        {**td.nas.dump_chosen(sdag), **{m.name: v for m, v in zip(space, values)}}
        for values in itertools.product(*(m.choices for m in space))
    ]
    valid = [c for c, ratio in zip(every, flops_ratios(sdag, every, x)) if ratio <= 0.4]
    assert 1 < len(valid) < len(every)
    front = td.nas.search(
        sdag,
        score,
        {"flops_ratio": 0.4},
        strategy="random",
        budget=len(every),
        example_inputs=(x,),
        progress=False,
    )
    assert len(front.evaluated) == len(valid)  # the space exhausted; nothing over the constraint scored
    best = max(valid, key=lambda c: score(td.nas.export_subnet(sdag, c)))
    assert front.best.choice == best


def test_attention_model_without_example_inputs_searches_under_a_params_constraint():
    sdag = searchable(Attention())  # inputs inferred: (1, 16, 12)
    x = torch.randn(2, 16, 12)
    full = td.count_flops(td.nas.export_subnet(sdag, td.nas.largest(sdag)), x).total_params

    @torch.no_grad()
    def score(model):
        return -float(model(x).pow(2).mean())

    front = td.nas.search(
        sdag, score, {"params_ratio": 0.5}, budget=5, population=4, example_inputs=(x,), progress=False
    )
    assert front.metric == "params_ratio"
    for c in front.evaluated:
        params = td.count_flops(td.nas.export_subnet(sdag, c.choice), x).total_params
        assert c.cost == pytest.approx(params / full) and c.cost <= 0.5


@pytest.mark.slow
def test_the_ridge_predictor_screens_candidates_once_warm():
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    front = td.nas.search(
        sdag,
        output_score(image_batches(1)),
        {"flops_ratio": 0.7},
        budget=40,
        population=10,
        example_inputs=(x,),
        predictor="ridge",
        progress=False,
    )
    assert len(front.evaluated) == 40
    assert -1.0 <= front.stats["predictor_correlation"] <= 1.0  # recorded for the screened candidates
    assert front.stats["drawn"] > 40  # more drawn than scored


def test_ridge_predictor_recovers_a_linear_function():
    rng = np.random.default_rng(0)
    x = rng.random((200, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3
    predictor = RidgePredictor(alpha=1e-6)
    predictor.fit(x, y)
    np.testing.assert_allclose(predictor.predict(x[:20]), y[:20], atol=1e-4)


def test_choices_encode_as_scaled_indices_and_one_hot_ops():
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    encoder = ChoiceEncoder(td.nas.mutables(sdag))
    choice = td.nas.sample(sdag, random.Random(3))
    row = encoder.encode(choice)
    assert row.shape == (encoder.width,) == (5 + 2 * 3,)
    for value, m in zip(row, td.nas.mutables(sdag)):
        assert value == m.choices.index(choice[m.name]) / (m.num_choices - 1)
    with pytest.raises(td.DagError, match="not one of its choices"):
        encoder.encode({**choice, "relu": "swish"})


def test_bad_constraints_and_spaces_are_refused_clearly():
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    score = output_score(image_batches(1))

    def search(constraints, **options):
        return td.nas.search(
            sdag, score, constraints, budget=2, example_inputs=(x,), progress=False, **options
        )

    with pytest.raises(ValueError, match="constraint"):
        search({"flop_ratio": 0.5})
    with pytest.raises(ValueError, match=r"ratio in \(0, 1\]"):
        search({"flops_ratio": 1.5})
    with pytest.raises(ValueError, match="latency_table"):
        search({"latency_ratio": 0.5})
    with pytest.raises(td.DagError, match="even the smallest has flops_ratio"):
        search({"flops_ratio": 0.01})
    with pytest.raises(ValueError, match="strategy"):
        search({"flops_ratio": 0.5}, strategy="grid")
    with pytest.raises(ValueError, match="predictor"):
        search({"flops_ratio": 0.5}, predictor="forest")
    plain = td.build_from_unstructured_module(Idioms().eval(), (x,))
    with pytest.raises(td.DagError, match="no mutables"):
        td.nas.search(plain, score, {"flops_ratio": 0.5}, progress=False)


@pytest.mark.slow
def test_latency_constraint_reads_the_table_at_each_candidates_widths():
    x = torch.randn(2, 3, 12, 12)
    sdag = searchable(Idioms(), x)
    for m in td.nas.mutables(sdag):
        if m.kind == "op":
            m.fix_chosen("relu")  # a latency table models widths only
    table = td.latency_table(td.nas.export_subnet(sdag, td.nas.largest(sdag)), (x,), probes=3, round_to=1)
    front = td.nas.search(
        sdag,
        output_score(image_batches(1)),
        {"latency": 1e12},  # every candidate: what is checked is the cost (timings on a busy CPU vary)
        latency_table=table,
        budget=4,
        population=2,
        example_inputs=(x,),
        progress=False,
    )
    for c in front.evaluated:  # the oracle: each group's width read off the exported plain sub-network
        plain = td.nas.export_subnet(sdag, c.choice)
        widths = {g.key: plain[g.key].module.out_channels for g in table.prunable}
        assert c.cost == pytest.approx(table.predict(widths))
    with pytest.raises(td.DagError, match="predicts channel widths only"):
        td.nas.search(
            searchable(Idioms(), x),
            output_score(image_batches(1)),
            {"latency_ratio": 0.7},
            latency_table=table,
            example_inputs=(x,),
            progress=False,
        )
