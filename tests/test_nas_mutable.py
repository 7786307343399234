"""Mutable vertices (`td.nas`): candidate ops, kernel sizes and skippable blocks on a hand-written CNN,
checked against the eager model with the chosen op put in by hand; choice dicts, sub-networks, files."""

from __future__ import annotations

import copy
import functools
import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dag as td
from torch_dag.passes.pattern import op


class Net(nn.Module):
    """Depthwise convs, a residual block, a concat, shapes read in forward, a global mean."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.block_act = nn.Hardswish()
        self.pw = nn.Conv2d(16, 16, 1)
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b2 = nn.Conv2d(16, 8, 3, padding=1)
        self.dw2 = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.head = nn.Linear(16, 10)
        self.skip_block = False  # the oracle of depth: the block left out by hand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        assert C == 3 and H == W, "a square RGB image"
        x = self.act(self.bn(self.stem(x)))
        if not self.skip_block:
            x = x + self.pw(self.block_act(self.dw(x)))
        x = torch.cat([self.b1(x), self.b2(x)], 1)
        x = F.relu(self.dw2(x))
        return self.head(x.mean((2, 3))).reshape(B, -1)


def _model() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # batchnorm statistics that are not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


ACTIVATIONS = {"relu": nn.ReLU(), "hswish": nn.Hardswish(), "gelu": nn.GELU()}


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@functools.cache
def _converted() -> td.DagModule:
    return td.build_from_unstructured_module(_model(), example_inputs=(_x(),))


def _searchable(inferred: bool = False) -> td.DagModule:
    """`_model()` with activations, depthwise kernel sizes and the residual block mutable; converted at
    the test's input size (or, with `inferred`, without example inputs: 224 x 224 from the first conv)."""
    dag = td.build_from_unstructured_module(_model()) if inferred else copy.deepcopy(_converted())
    sdag = td.nas.make_mutable(dag, (nn.ReLU, nn.Hardswish), ACTIVATIONS)
    depthwise = op(td.passes.CONVS, where=lambda v, g: v.module.groups == v.module.in_channels > 1)
    sdag = td.nas.make_mutable(sdag, depthwise, td.nas.kernel_sizes(3, 5, 7))
    return td.nas.make_mutable(sdag, td.nas.residual, td.nas.skippable())


@pytest.mark.slow
def test_a_mutable_dag_starts_as_the_model_and_leaves_its_input_untouched():
    model, x = _model(), _x()
    dag = td.build_from_unstructured_module(model)
    before = [(v.name, v.op) for v in dag]
    sdag = _searchable(inferred=True)
    assert [(v.name, v.op) for v in dag] == before
    kinds = {m.name: (m.kind, m.choices, m.current_choice) for m in td.nas.mutables(sdag)}
    assert kinds == {
        "act": ("op", ["relu", "hswish", "gelu"], "relu"),
        "add": ("op", ["block", "identity"], "block"),
        "dw": ("value", [3, 5, 7], 3),
        "block_act": ("op", ["relu", "hswish", "gelu"], "hswish"),
        "dw2": ("value", [3, 5, 7], 5),
        "relu": ("op", ["relu", "hswish", "gelu"], "relu"),  # F.relu, a module op once converted
    }
    with torch.no_grad():
        assert torch.equal(sdag(x), model(x))


def test_op_mutable_computes_the_model_with_the_op_put_in_by_hand():
    model, x = _model(), _x()
    sdag = _searchable()
    td.nas.set_chosen(sdag, {"act": "gelu", "block_act": "relu"})
    oracle = copy.deepcopy(model)
    oracle.act, oracle.block_act = nn.GELU(), nn.ReLU()  # the last relu (F.relu) stays
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), oracle(x), rtol=0, atol=0)


def test_kernel_size_mutable_pads_and_crops_the_original_kernel():
    model, x = _model(), _x()
    sdag = _searchable()
    mutable = {m.name: m for m in td.nas.mutables(sdag)}
    mutable["dw"].current_choice = 7  # a 3x3 kernel zero-padded to 7x7: the same outputs
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), model(x))
    mutable["dw2"].current_choice = 3  # the centre of the 5x5 kernel: the ring around it zeroed
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        ring = torch.ones(5, 5, dtype=torch.bool)
        ring[1:4, 1:4] = False
        oracle.dw2.weight[:, :, ring] = 0
        torch.testing.assert_close(sdag(x), oracle(x))


def test_a_skipped_block_is_the_model_without_it():
    model, x = _model(), _x()
    sdag = _searchable()
    td.nas.set_chosen(sdag, {"add": "identity"})
    oracle = copy.deepcopy(model)
    oracle.skip_block = True
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), oracle(x), rtol=0, atol=0)


def test_flops_count_the_chosen_candidates():
    model, x = _model(), _x()
    sdag = _searchable()
    base = td.count_flops(td.build_from_unstructured_module(model, example_inputs=(x,)), x)
    assert td.count_flops(sdag, x).total_flops == base.total_flops
    assert td.count_flops(sdag, x).total_params == base.total_params
    td.nas.set_chosen(sdag, {"dw": 7, "add": "block"})
    grown = 16 * (7 * 7 - 3 * 3) * 16 * 16 * 2  # 16 channels, 40 more taps, 16 x 16 pixels, batch 2
    assert td.count_flops(sdag, x).total_flops == base.total_flops + grown
    td.nas.set_chosen(sdag, {"add": "identity"})
    oracle = copy.deepcopy(model)
    oracle.skip_block = True
    assert (
        td.count_flops(sdag, x).total_flops
        == td.count_flops(td.build_from_unstructured_module(oracle, example_inputs=(x,)), x).total_flops
    )


def test_largest_and_smallest_are_the_choices_of_most_and_fewest_flops():
    sdag = _searchable()
    assert td.nas.largest(sdag) == {
        "act": "relu",
        "add": "block",
        "dw": 7,
        "block_act": "relu",
        "dw2": 7,
        "relu": "relu",
    }
    assert td.nas.smallest(sdag) == {
        "act": "relu",
        "add": "identity",
        "dw": 3,
        "block_act": "relu",
        "dw2": 3,
        "relu": "relu",
    }
    x = _x()
    flops = [
        td.count_flops(td.nas.export_subnet(sdag, c), x).total_flops
        for c in (td.nas.smallest(sdag), td.nas.largest(sdag))
    ]
    rng = random.Random(0)
    for _ in range(5):
        sampled = td.count_flops(td.nas.export_subnet(sdag, td.nas.sample(sdag, rng)), x).total_flops
        assert flops[0] <= sampled <= flops[1]


def test_export_subnet_is_plain_equal_saves_and_loads(tmp_path):
    x = _x()
    sdag = _searchable()
    choice = {"act": "gelu", "add": "block", "dw": 5, "block_act": "relu", "dw2": 3, "relu": "hswish"}
    sub = td.nas.export_subnet(sdag, choice)
    assert td.nas.dump_chosen(sdag) != choice  # the searchable DAG is left as it was
    assert type(sub) is td.DagModule and not td.nas.mutables(sub)
    assert {v.op for v in sub} & {"Mutable", "MutableElementwise"} == set()
    td.nas.set_chosen(sdag, choice)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), sdag(x), rtol=0, atol=0)
        td.save(sub, tmp_path / "sub.dag")
        loaded = td.load(tmp_path / "sub.dag")
        torch.testing.assert_close(loaded(x), sub(x), rtol=0, atol=0)
    assert td.count_flops(sub, x).total_flops == td.count_flops(sdag, x).total_flops


@pytest.mark.slow
def test_an_exported_subnet_prunes_further():
    x = _x()
    sub = td.nas.export_subnet(_searchable(), {"act": "gelu", "add": "block", "dw": 5, "dw2": 3})
    pruned = td.prune(sub, flops_ratio=0.7, example_inputs=(x,))
    assert td.count_flops(pruned, x).total_flops < 0.8 * td.count_flops(sub, x).total_flops
    with torch.no_grad():
        assert pruned(x).shape == sub(x).shape


def test_save_and_load_at_a_non_default_choice(tmp_path):
    x = _x()
    sdag = _searchable()
    choice = {"act": "hswish", "add": "identity", "dw": 7, "block_act": "gelu", "dw2": 3, "relu": "gelu"}
    td.nas.set_chosen(sdag, choice)
    mutable = {m.name: m for m in td.nas.mutables(sdag)}
    mutable["dw"].fix_chosen(7)
    td.save(sdag, tmp_path / "s.dag")
    loaded = td.load(tmp_path / "s.dag")
    assert td.nas.dump_chosen(loaded) == choice
    assert {m.name: m.choices for m in td.nas.mutables(loaded)}["dw"] == [7]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sdag(x), rtol=0, atol=0)
        for m in td.nas.mutables(loaded):  # every candidate's weights came back, not only the chosen
            if m.name in ("add", "dw2"):
                m.current_choice = m.choices[0]
                mutable[m.name].current_choice = m.choices[0]
        torch.testing.assert_close(loaded(x), sdag(x), rtol=0, atol=0)
    raw = (tmp_path / "s.dag").read_bytes()
    assert b"pickle" not in raw and json.dumps(td.nas.dump_chosen(loaded))


def test_mutables_are_settable_sampled_and_fixed():
    sdag = _searchable()
    mutables = td.nas.mutables(sdag)
    assert [m.name for m in mutables] == [m.name for m in td.nas.mutables(sdag)]
    rng = random.Random(3)
    for m in mutables:
        m.current_choice = m.sample_choice(rng)
        assert m.current_choice in m.choices and m.dump_chosen() == m.current_choice
        assert m.num_choices == len(m.choices) and not m.is_fixed
    assert td.nas.dump_chosen(sdag) == {m.name: m.current_choice for m in mutables}
    mutables[0].fix_chosen("gelu")
    assert mutables[0].choices == ["gelu"] and mutables[0].is_fixed
    assert td.nas.search_dim(sdag) == len(mutables) - 1
    with pytest.raises(td.DagError, match="act"):
        mutables[0].current_choice = "relu"


def test_set_chosen_names_unknown_mutables_and_values():
    sdag = _searchable()
    with pytest.raises(td.DagError, match="nope"):
        td.nas.set_chosen(sdag, {"nope": "relu"})
    with pytest.raises(td.DagError, match="dw = 9"):
        td.nas.set_chosen(sdag, {"dw": 9})
    with pytest.raises(td.DagError, match="swish"):
        td.nas.set_chosen(sdag, {"act": "swish"})


def test_decode_scales_the_choice_index():
    sdag = _searchable()
    assert td.nas.search_dim(sdag) == 6
    assert td.nas.decode(sdag, [0.0, 1.0, 0.5, 0.4, 0.99, 0.7]) == {
        "act": "relu",
        "add": "identity",
        "dw": 5,
        "block_act": "hswish",
        "dw2": 7,
        "relu": "gelu",
    }
    with pytest.raises(td.DagError, match="search_dim"):
        td.nas.decode(sdag, [0.5])
    with pytest.raises(td.DagError, match="outside"):
        td.nas.decode(sdag, [0.5, 0.5, 0.5, 0.5, 0.5, 1.5])


def test_candidates_as_factories_of_the_vertex_module():
    model, x = _model(), _x()
    dag = td.build_from_unstructured_module(model, example_inputs=(x,))
    sdag = td.nas.make_mutable(
        dag,
        lambda v, g: v.name == "pw",
        {"full": lambda conv: copy.deepcopy(conv), "halved": lambda conv: _scaled(conv, 0.5)},
    )
    assert td.nas.dump_chosen(sdag) == {"pw": "full"}
    td.nas.set_chosen(sdag, {"pw": "halved"})
    oracle = copy.deepcopy(model)
    oracle.pw = _scaled(model.pw, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), oracle(x), rtol=0, atol=0)


def _scaled(conv: nn.Conv2d, factor: float) -> nn.Conv2d:
    new = copy.deepcopy(conv)
    with torch.no_grad():
        new.weight.mul_(factor)
    return new


def test_errors_name_the_vertex_and_candidate():
    dag = td.build_from_unstructured_module(_model(), example_inputs=(_x(),))
    with pytest.raises(td.DagError, match=r"vertex 'pw' \(Conv2d\): candidate 'wide' gives"):
        td.nas.make_mutable(
            dag, lambda v, g: v.name == "pw", {"same": nn.Identity(), "wide": nn.Conv2d(16, 32, 1)}
        )
    with pytest.raises(td.DagError, match="no vertex matches"):
        td.nas.make_mutable(dag, (nn.GELU,), ACTIVATIONS)
    with pytest.raises(td.DagError, match=r"vertex '_0'.*padding"):
        td.nas.make_mutable(
            td.build_from_unstructured_module(nn.Sequential(nn.Conv2d(3, 4, 3))),
            nn.Conv2d,
            td.nas.kernel_sizes(3, 5),
        )
    with pytest.raises(td.DagError, match="odd"):
        td.nas.kernel_sizes(3, 4)
    with pytest.raises(td.DagError, match="identifier"):
        td.nas.make_mutable(dag, (nn.ReLU,), {"a.b": nn.ReLU()})


def test_a_tampered_mutable_config_is_refused_with_the_vertex_named():
    from torch_dag.core.ops import CUSTOM_OPS
    from torch_dag.serde.save import graph_and_tensors

    graph, _ = graph_and_tensors(_searchable())
    entries = {e["name"]: e for e in graph["vertices"]}
    where = "vertex 'dw2' (op Mutable)"
    good = entries["dw2"]["config"]
    assert CUSTOM_OPS["Mutable"].from_config(good, where).choices == [3, 5, 7]
    bad = [
        ({**good, "kind": "pickle"}, "kind"),
        ({**good, "values": [3, 5]}, "arity and values"),
        ({**good, "chosen": "k9"}, "k9"),
        ({**good, "arity": 10**6}, "arity"),
        ({**good, "candidates": {"inputs": "x"}}, "candidates"),
    ]
    for config, message in bad:
        with pytest.raises(td.LoadError, match=message):
            CUSTOM_OPS["Mutable"].from_config(config, where)
    with pytest.raises(td.LoadError, match="element-wise"):  # convs are not element-wise
        CUSTOM_OPS["MutableElementwise"].from_config(good, where)


class _Reuse(nn.Module):
    """An activation whose input is read again later: `h` must survive the in-place relu after `act`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return F.relu(self.act(h)) + h


def test_switching_to_an_aliasing_candidate_after_compiling_keeps_inputs_intact():
    torch.manual_seed(0)
    model, x = _Reuse().eval(), _x()
    dag = td.build_from_unstructured_module(model, example_inputs=(x,))
    act = lambda v, g: v.name == "act"  # noqa: E731 (the relu after it stays, with an in-place kernel)
    sdag = td.nas.make_mutable(dag, act, {"relu": nn.ReLU(), "none": nn.Identity()})
    sdag.eval()
    td.nas.set_chosen(sdag, {"act": "none"})  # the in-place plan was made with relu chosen
    oracle = copy.deepcopy(model)
    oracle.act = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), oracle(x), rtol=0, atol=0)


class _Functional(nn.Module):
    """Activations written as functions, one with an option the module form keeps, one with `inplace`."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.a(x), approximate="tanh")
        return F.hardswish(self.b(x), False)


def test_class_patterns_match_activations_written_as_functions():
    torch.manual_seed(0)
    model, x = _Functional().eval(), _x()
    dag = td.build_from_unstructured_module(model, example_inputs=(x,))
    candidates = {"tanh_gelu": nn.GELU(approximate="tanh"), "hswish": nn.Hardswish(), "relu": nn.ReLU()}
    sdag = td.nas.make_mutable(dag, (nn.GELU, nn.Hardswish), candidates)
    assert list(td.nas.dump_chosen(sdag).values()) == ["tanh_gelu", "hswish"]
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), model(x), rtol=0, atol=0)
        td.nas.set_chosen(sdag, dict.fromkeys(td.nas.dump_chosen(sdag), "relu"))
        torch.testing.assert_close(sdag(x), F.relu(model.b(F.relu(model.a(x)))), rtol=0, atol=0)
