"""The pruning tables keyed by op: every key is a known op, and every registered op has a channel rule or
is listed, with a reason, as deliberately without one (so a new op cannot be forgotten silently)."""

from __future__ import annotations

import pytest

import torch_dag
from torch_dag.core import traits
from torch_dag.core.traits import Trait, registered_ops
from torch_dag.pruning import surgery
from torch_dag.pruning.rules import (
    ARITHMETIC,
    KEYWORD_OPERANDS,
    NO_CHANNEL_RULE,
    RULES,
    SHAPE_QUERIES,
    SIZED_BY_COUNTS,
    rule_for,
)
from torch_dag.pruning.rules.coverage import (
    missing_rule_message,
    ops_missing_a_rule,
    ops_with_rule_and_reason,
    unknown_ops,
)
from torch_dag.pruning.rules.elementwise import elementwise, pass_through
from torch_dag.pruning.rules.table import derived_rule

TABLES = {
    "rules.RULES": RULES,
    "rules.NO_CHANNEL_RULE": NO_CHANNEL_RULE,
    "rules.ARITHMETIC": ARITHMETIC,
    "rules.SIZED_BY_COUNTS": SIZED_BY_COUNTS,
    "rules.SHAPE_QUERIES": SHAPE_QUERIES,
    "rules.KEYWORD_OPERANDS": KEYWORD_OPERANDS,
    "surgery.LAYOUTS": surgery.LAYOUTS,
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_key_is_a_known_op(table):
    unknown = unknown_ops(TABLES[table])
    assert not unknown, f"{table} names ops outside the vocabulary: {unknown}; known: torch_dag.known_ops()"


def test_a_typo_in_a_table_is_caught():
    assert unknown_ops({**RULES, "Conv2D": RULES["Conv2d"], "relu6_": elementwise}) == ["Conv2D", "relu6_"]
    assert unknown_ops([*SIZED_BY_COUNTS, "reshpae"]) == ["reshpae"]


def test_every_registered_op_has_a_rule_or_a_reason():
    assert set(torch_dag.known_ops()) == registered_ops()
    missing = ops_missing_a_rule(registered_ops())
    assert not missing, missing_rule_message(missing)


def test_an_op_registered_without_a_rule_is_caught():
    assert ops_missing_a_rule(["cumsum", "brand_new_op", "relu", "arange"]) == ["brand_new_op"]
    message = missing_rule_message(["brand_new_op"])
    assert "brand_new_op" in message and "rules/table.py" in message and "rules/coverage.py" in message


def test_no_op_has_both_a_rule_and_a_reason(monkeypatch):
    assert ops_with_rule_and_reason(registered_ops()) == []
    monkeypatch.setitem(NO_CHANNEL_RULE, "relu", "listed by mistake")
    assert ops_with_rule_and_reason(registered_ops()) == ["relu"]


def test_explicit_rules_are_not_what_the_traits_derive():
    """One source of truth: an entry of RULES is there because the op's traits do not give that rule."""
    redundant = [op for op, rule in RULES.items() if derived_rule(op) is rule]
    assert not redundant, f"drop these entries of RULES, their traits derive the same rule: {redundant}"


@pytest.mark.parametrize(
    ("op", "rule"),
    [
        ("add", elementwise),
        ("where", elementwise),
        ("ReLU", elementwise),
        ("gelu", elementwise),
        ("Dropout2d", pass_through),
        ("Identity", pass_through),
        ("clone", pass_through),
        ("MaxPool2d", pass_through),
        ("interpolate", pass_through),
        ("to", pass_through),
        ("PReLU", None),
        ("cumsum", None),
    ],
)
def test_rules_derived_from_traits(op, rule):
    assert rule_for(op) is rule


def test_an_op_registered_later_gets_its_rule_from_its_traits(monkeypatch):
    monkeypatch.setitem(traits._TRAITS, "my_swish", frozenset({Trait.ACTIVATION, Trait.ELEMENTWISE}))
    monkeypatch.setitem(traits._TRAITS, "my_blur", frozenset({Trait.POOL}))
    monkeypatch.setitem(traits._TRAITS, "my_scan", frozenset())
    assert rule_for("my_swish") is elementwise
    assert rule_for("my_blur") is pass_through
    assert rule_for("my_scan") is None
    assert ops_missing_a_rule(["my_swish", "my_blur", "my_scan"]) == ["my_scan"]


def test_shape_arithmetic_is_element_wise():
    """ARITHMETIC stays explicit (not every element-wise op keeps a count exact), but only within them."""
    assert all(traits.has_trait(op, Trait.ELEMENTWISE) for op in ARITHMETIC)
    assert all(traits.has_trait(op, Trait.METADATA) for op in SHAPE_QUERIES)


def test_surgery_layouts_follow_the_channel_rules():
    """Every op whose channel rule gives it weights to slice (the layer rules) has a surgery layout."""
    layers = [op for op, rule in RULES.items() if rule.__module__ == "torch_dag.pruning.rules.layers"]
    assert "Conv2d" in layers and "LayerNorm" in layers
    assert [op for op in layers if op not in surgery.LAYOUTS] == []
