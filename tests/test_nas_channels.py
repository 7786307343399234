"""Channel mutables of a flexible DAG (`td.nas`): one per prunable group, derived widths (a concat's width
is the sum of its parts), the slimmable interface, sub-networks and files; oracles are the flexible model
driven directly (`set_level_use`, `set_widths`) and the shapes of the exported plain model."""

from __future__ import annotations

import copy
import functools
import random
import warnings

import pytest
import torch
from torch import nn

import torch_dag as td
from tests.test_nas_mutable import _model, _x

LEVELS = [0.25, 0.5, 1.0]
ACTIVATIONS = {"relu": nn.ReLU(), "hswish": nn.Hardswish()}


def _flex() -> td.flex.FlexDagModule:
    return copy.deepcopy(_made_flexible())


@functools.cache
def _made_flexible() -> td.flex.FlexDagModule:
    dag = td.build_from_unstructured_module(_model(), example_inputs=(_x(),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # narrow groups round finer than 8 (said in a warning)
        return td.make_flexible(dag, levels=LEVELS)


def _searchable() -> td.flex.FlexDagModule:
    sdag = td.nas.make_mutable(_flex(), (nn.ReLU, nn.Hardswish), ACTIVATIONS)
    assert isinstance(sdag, td.flex.FlexDagModule)
    return sdag


def test_one_channel_mutable_per_group_with_the_levels_as_choices():
    sdag = _searchable()
    channel = [m for m in td.nas.mutables(sdag) if m.kind == "channel"]
    assert len(channel) == sdag.search_dimension
    # stem, dw, pw and the residual are one tied group; b1 and b2 are one each; dw2 follows the concat
    assert [m.name for m in channel] == ["width:stem", "width:b1", "width:b2"]
    assert all(m.choices == LEVELS and m.current_choice == 1.0 for m in channel)
    (cat,) = td.nas.derived(sdag)
    assert (cat.name, cat.sources, cat.kind) == ("width:cat", ["width:b1", "width:b2"], "derived")


def test_a_choice_at_a_level_runs_that_level():
    sdag, oracle = _searchable(), _flex()
    x = _x()
    td.nas.set_chosen(sdag, {"width:stem": 0.5, "width:b1": 0.5, "width:b2": 0.5})
    assert sdag.current_level() == 1
    oracle.set_level_use(1)
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), oracle(x), rtol=0, atol=0)


def test_mixed_widths_run_set_widths_and_export_a_plain_model_of_those_widths():
    sdag, oracle = _searchable(), _flex()
    x = _x()
    choice = {"width:stem": 0.25, "width:b1": 1.0, "width:b2": 0.5, "act": "hswish"}
    td.nas.set_chosen(sdag, choice)
    assert sdag.current_level() is None and td.nas.dump_chosen(sdag)["width:b2"] == 0.5
    oracle.set_widths([0.25, 1.0, 0.5])
    sub = td.nas.export_subnet(sdag)
    assert type(sub) is td.DagModule and not td.nas.mutables(sub)
    with torch.no_grad():
        y = sdag(x)
        torch.testing.assert_close(sub(x), y, rtol=0, atol=0)
        td.nas.set_chosen(sdag, {"act": "relu"})
        torch.testing.assert_close(sdag(x), oracle(x), rtol=0, atol=0)
        values = sub.run_collecting(x)
    assert values["cat"].shape[1] == 8 + 4  # b1 whole, b2 at half
    assert td.nas.decode(sdag, [0, 0, 0, 0.2, 1.0, 0.5])["width:cat"] == values["cat"].shape[1]
    assert td.count_flops(sub, x).total_flops == td.count_flops(sdag, x).total_flops


def test_decode_takes_width_multipliers_and_expands_derived_widths():
    sdag = _searchable()
    assert td.nas.search_dim(sdag) == 6  # act, block_act, relu, three groups
    choice = td.nas.decode(sdag, [0.0, 0.6, 1.0, 0.3, 0.25, 1.0])
    assert choice == {
        "act": "relu",
        "block_act": "hswish",
        "relu": "hswish",
        "width:stem": 0.5,
        "width:b1": 0.25,
        "width:b2": 1.0,
        "width:cat": 2 + 8,
    }
    td.nas.set_chosen(sdag, choice)  # derived widths may be given back: they must agree
    sub = td.nas.export_subnet(sdag)
    with torch.no_grad():
        assert sub.run_collecting(_x())["cat"].shape[1] == choice["width:cat"]
    with pytest.raises(td.DagError, match="width:cat"):
        td.nas.set_chosen(sdag, {**choice, "width:cat": 16})


def test_largest_smallest_and_samples_bound_the_flops():
    sdag, x = _searchable(), _x()
    assert td.nas.largest(sdag)["width:stem"] == 1.0 and td.nas.smallest(sdag)["width:b1"] == 0.25
    low, high = (
        td.count_flops(td.nas.export_subnet(sdag, c), x).total_flops
        for c in (td.nas.smallest(sdag), td.nas.largest(sdag))
    )
    rng = random.Random(0)
    for _ in range(4):
        td.nas.set_chosen(sdag, td.nas.sample(sdag, rng))
        assert low <= td.count_flops(sdag, x).total_flops <= high


def test_a_finer_grid_fixing_and_files(tmp_path):
    sdag, x = _searchable(), _x()
    td.nas.channel_grid(sdag, [0.25, 0.5, 0.75, 1.0])
    mutable = {m.name: m for m in td.nas.mutables(sdag)}
    assert mutable["width:b1"].choices == [0.25, 0.5, 0.75, 1.0]
    mutable["width:stem"].fix_chosen(0.5)
    td.nas.set_chosen(sdag, {"width:b1": 0.5, "width:b2": 0.5, "block_act": "relu"})
    assert sdag.current_level() == 1
    td.save(sdag, tmp_path / "s.dag")
    loaded = td.load(tmp_path / "s.dag")
    assert isinstance(loaded, td.flex.FlexDagModule)
    assert td.nas.dump_chosen(loaded) == td.nas.dump_chosen(sdag)
    assert {m.name: m.choices for m in td.nas.mutables(loaded)}["width:stem"] == [0.5]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sdag(x), rtol=0, atol=0)
        td.nas.set_chosen(loaded, {"width:b1": 0.75})  # the width analysis is redone after loading
        td.nas.set_chosen(sdag, {"width:b1": 0.75})
        torch.testing.assert_close(loaded(x), sdag(x), rtol=0, atol=0)
    td.save(sdag, tmp_path / "custom.dag")  # at widths between levels: saved with them (issue 26)
    custom = td.load(tmp_path / "custom.dag")
    assert custom.current_level() is None and td.nas.dump_chosen(custom) == td.nas.dump_chosen(sdag)
    with torch.no_grad():
        torch.testing.assert_close(custom(x), sdag(x), rtol=0, atol=0)
    sub = td.nas.export_subnet(sdag)
    td.save(sub, tmp_path / "sub.dag")
    with torch.no_grad():
        torch.testing.assert_close(td.load(tmp_path / "sub.dag")(x), sdag(x), rtol=0, atol=0)


def test_channel_carrying_candidates_are_refused_on_a_flexible_dag():
    flex = _flex()  # kernel sizes and skippable blocks are flexible too: tests/test_nas_flex_ops.py
    with pytest.raises(td.DagError, match=r"vertex 'dw'.*flexible layer"):
        td.nas.make_mutable(flex, lambda v, g: v.name == "dw", {"same": nn.Identity(), "x2": nn.Identity()})
    with pytest.raises(td.DagError, match=r"vertex 'relu'.*not all element-wise"):
        td.nas.make_mutable(
            flex, lambda v, g: v.name == "relu", {"relu": nn.ReLU(), "mix": nn.Conv2d(16, 16, 1)}
        )
    with pytest.raises(td.DagError, match="flexible DAGs"):
        td.nas.channel_grid(td.build_from_unstructured_module(_model(), example_inputs=(_x(),)), [0.5, 1.0])


def test_an_activation_or_nothing_on_a_flexible_dag():
    sdag = td.nas.make_mutable(_flex(), (nn.Hardswish,), {"hswish": nn.Hardswish(), "none": nn.Identity()})
    assert isinstance(sdag, td.flex.FlexDagModule)
    td.nas.set_chosen(sdag, {"block_act": "none", "width:stem": 1.0})
    oracle = _model()
    oracle.block_act = nn.Identity()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), oracle(x))
