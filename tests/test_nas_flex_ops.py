"""Kernel-size and depth mutables on a flexible DAG, and flexible DAGs saved at widths between levels
(issue 26). Oracles: the flexible DAG itself (before the mutables) at the same level or widths, its plain
copy with the conv swapped or the block cut out by hand, the eager model, and `export_subnet`'s plain
sub-network; files are compared with the model they were saved from."""

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
from torch_dag.core.editor import Editor
from torch_dag.core.template import Ref
from torch_dag.serde.format import build, graph_and_tensors

LEVELS = [0.25, 0.5, 1.0]
GROUPS = ["width:stem", "width:b1", "width:b2"]  # the channel mutables of `_model()` (test_nas_channels)
# a level, the top level, and widths between levels (a different width per group)
WIDTHS = {
    "level 0": dict.fromkeys(GROUPS, 0.25),
    "top level": dict.fromkeys(GROUPS, 1.0),
    "between levels": {"width:stem": 0.5, "width:b1": 1.0, "width:b2": 0.25},
}


@functools.cache
def _made_flexible(inferred: bool = False) -> td.flex.FlexDagModule:
    """The hand-written CNN (depthwise convs, a residual block, a concat, `B, C, H, W = x.shape`, a global
    mean) made flexible; converted at the tests' input size or (`inferred`) without example inputs."""
    dag = td.build_from_unstructured_module(_model(), example_inputs=None if inferred else (_x(),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # narrow groups round finer than 8 (said in a warning)
        return td.make_flexible(dag, levels=LEVELS)


def _flexible(widths: dict[str, float] | None = None, inferred: bool = False) -> td.flex.FlexDagModule:
    """A copy of the flexible CNN at `widths` (one per channel group), set directly: the oracle."""
    flex = copy.deepcopy(_made_flexible(inferred))
    if widths is not None:
        values = [widths[name] for name in GROUPS]
        if values in ([w] * len(GROUPS) for w in LEVELS):
            flex.set_level_use(LEVELS.index(values[0]))
        else:
            flex.set_widths(values)
    return flex


def _depthwise(vertex: td.Vertex, dag: td.DagModule) -> bool:
    layer = getattr(vertex.module, "full", vertex.module)  # a flexible layer's full-width layer
    return isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels > 1


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_a_flexible_dag_saves_and_loads_at_widths_between_levels(tmp_path):
    flex, x = _flexible(), _x()
    widths = [0.75, 3, 0.625]  # fractions and a channel count, none of them a level
    flex.set_widths(widths)
    td.save(flex, tmp_path / "w.dag")
    loaded = td.load(tmp_path / "w.dag")
    assert loaded.current_level() is None and loaded.current_widths() == widths
    with torch.no_grad():
        _same(loaded(x), flex(x))
        _same(loaded.make_base_copy()(x), flex(x))
        assert loaded(x).shape == (2, 10)
        # the batchnorm statistics of these widths, recalibrated, are saved and loaded with them
        before = flex(x)
    td.recalibrate_batchnorm(
        flex, [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    )
    with torch.no_grad():
        assert not torch.allclose(flex(x), before)
        td.save(flex, tmp_path / "r.dag")
        _same(td.load(tmp_path / "r.dag")(x), flex(x))
        for model in (loaded, flex):  # the levels and the width analysis are there after loading
            model.set_level_use(1)
        _same(loaded(x), flex(x))
        for model in (loaded, flex):
            model.set_widths([0.5, 0.5, 1.0])
        _same(loaded(x), flex(x))


def test_widths_between_levels_follow_train_and_eval_and_a_tampered_file_is_refused():
    flex, x = _flexible(), _x()
    flex.train()
    flex.set_widths([0.75, 0.5, 0.625])  # made in train mode: eval() must reach its batchnorms
    flex.eval()
    with torch.no_grad():
        _same(flex(x), flex.make_base_copy().eval()(x))
    graph, tensors = graph_and_tensors(flex)
    assert graph["flex"]["widths"] == [0.75, 0.5, 0.625]
    _same(build(copy.deepcopy(graph), tensors, "test")(x), flex(x))
    for edit, message in [
        (lambda g: g["flex"].pop("widths"), "no widths saved"),
        (lambda g: g["flex"].update(widths=[0.5, -1]), "positive numbers"),
        (lambda g: [v["config"].pop("custom") for v in g["vertices"] if v["op"] == "Flex"], "at a level"),
    ]:
        tampered = copy.deepcopy(graph)
        edit(tampered)
        with pytest.raises(td.LoadError, match=message):
            build(tampered, tensors, "test")


def test_a_channel_mutable_at_a_width_between_levels_saves_and_loads(tmp_path):
    sdag, x = td.nas.make_mutable(_flexible(), (nn.ReLU,), {"relu": nn.ReLU(), "gelu": nn.GELU()}), _x()
    td.nas.channel_grid(sdag, [0.25, 0.5, 0.75, 1.0])
    td.nas.set_chosen(sdag, {"width:stem": 0.75, "act": "gelu"})
    assert sdag.current_level() is None
    td.save(sdag, tmp_path / "s.dag")
    loaded = td.load(tmp_path / "s.dag")
    assert td.nas.dump_chosen(loaded) == td.nas.dump_chosen(sdag)
    with torch.no_grad():
        _same(loaded(x), sdag(x))


@pytest.mark.parametrize("case", sorted(WIDTHS))
def test_kernel_sizes_of_a_flexible_conv_equal_the_plain_model_with_the_conv_swapped_by_hand(case):
    widths, x = WIDTHS[case], _x()
    sdag = td.nas.make_mutable(_flexible(), _depthwise, td.nas.kernel_sizes(3, 5, 7))
    assert isinstance(sdag, td.flex.FlexDagModule)
    assert {m.name: m.choices for m in td.nas.mutables(sdag) if m.kind == "value"} == {
        "dw": [3, 5, 7],
        "dw2": [3, 5, 7],
    }
    k7 = sdag["dw"].module.candidates["k7"]  # a flexible conv: its own full-width 7 x 7 kernel
    assert isinstance(k7, td.flex.FlexModule)
    with torch.no_grad():
        k7.weight.normal_(generator=torch.Generator().manual_seed(0))  # not the padded 3 x 3 any more
    td.nas.set_chosen(sdag, {"dw": 7, **widths})
    oracle = _flexible(widths).make_base_copy()  # the plain model of those widths, the conv swapped
    channels = oracle["dw"].module.out_channels  # levels and widths keep the first channels (sorted)
    conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
    with torch.no_grad():
        conv.weight.copy_(k7.weight[:channels])
        conv.bias.copy_(k7.bias[:channels])
    editor = Editor(oracle)
    editor.set_module("dw", conv)
    oracle = editor.build().eval()
    sub = td.nas.export_subnet(sdag)
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), oracle(x))
        _same(sub(x), sdag(x))
    assert td.count_flops(sdag, x).total_flops == td.count_flops(sub, x).total_flops
    assert td.count_flops(sdag, x).total_flops == td.count_flops(oracle, x).total_flops
    assert td.count_flops(sdag, x).total_params == td.count_flops(oracle, x).total_params


@pytest.mark.parametrize("case", sorted(WIDTHS))
def test_a_skippable_block_of_flexible_layers_equals_the_flexible_model_with_or_without_it(case):
    widths, x = WIDTHS[case], _x()
    sdag = td.nas.make_mutable(_flexible(), td.nas.residual, td.nas.skippable())
    flex = _flexible(widths)
    td.nas.set_chosen(sdag, {"add": "block", **widths})
    with torch.no_grad():
        _same(sdag(x), flex(x))  # levels and widths reach the layers inside the block
    td.nas.set_chosen(sdag, {"add": "identity"})
    editor = Editor(flex.make_base_copy())
    editor.remove("add", replacement=Ref("act"))  # the block x + pw(block_act(dw(x))) cut out by hand
    editor.remove_dead()
    oracle = editor.build().eval()
    sub = td.nas.export_subnet(sdag)
    with torch.no_grad():
        _same(sdag(x), oracle(x))
        _same(sub(x), sdag(x))
        if case == "top level":
            eager = _model()
            eager.skip_block = True
            torch.testing.assert_close(sdag(x), eager(x))
    assert td.count_flops(sdag, x).total_flops == td.count_flops(sub, x).total_flops
    assert td.count_flops(sdag, x).total_flops == td.count_flops(oracle, x).total_flops


def _searchable(inferred: bool = False) -> td.flex.FlexDagModule:
    activations = {"relu": nn.ReLU(), "hswish": nn.Hardswish(), "gelu": nn.GELU()}
    sdag = td.nas.make_mutable(_flexible(inferred=inferred), (nn.ReLU, nn.Hardswish), activations)
    sdag = td.nas.make_mutable(sdag, _depthwise, td.nas.kernel_sizes(3, 5, 7))
    sdag = td.nas.make_mutable(sdag, td.nas.residual, td.nas.skippable())
    assert isinstance(sdag, td.flex.FlexDagModule)
    return sdag


@pytest.mark.slow
def test_every_choice_of_a_searchable_flexible_dag_equals_its_export_and_its_file(tmp_path):
    sdag, x = _searchable(inferred=True), _x()  # converted without example inputs (224 x 224 inferred)
    with torch.no_grad():
        _same(sdag(x), _flexible(inferred=True)(x))  # it starts as the flexible model
    kinds = sorted({m.kind for m in td.nas.mutables(sdag)})
    assert kinds == ["channel", "op", "value"]
    rng = random.Random(0)
    for _ in range(4):
        td.nas.set_chosen(sdag, td.nas.sample(sdag, rng))
        sub = td.nas.export_subnet(sdag)
        assert type(sub) is td.DagModule
        with torch.no_grad():
            _same(sub(x), sdag(x))
        ours, theirs = td.count_flops(sdag, x), td.count_flops(sub, x)
        assert (ours.total_flops, ours.total_params) == (theirs.total_flops, theirs.total_params)
    choice = {"add": "identity", "dw": 7, "dw2": 3, "act": "gelu", **WIDTHS["between levels"]}
    td.nas.set_chosen(sdag, choice)
    td.save(sdag, tmp_path / "s.dag")
    loaded = td.load(tmp_path / "s.dag")
    assert td.nas.dump_chosen(loaded) == td.nas.dump_chosen(sdag)
    with torch.no_grad():
        _same(loaded(x), sdag(x))
        other = {"add": "block", "dw": 5, "dw2": 7, "width:b1": 0.5}  # every candidate came back
        for model in (loaded, sdag):
            td.nas.set_chosen(model, other)
        _same(loaded(x), sdag(x))


def test_weights_move_between_a_searchable_flexible_dag_and_its_plain_copy():
    sdag, x = _searchable(), _x()
    td.nas.set_chosen(sdag, {"dw": 5, "add": "block", "width:stem": 0.5, "width:b1": 0.5, "width:b2": 0.5})
    plain = sdag.make_base_copy()  # mutable vertices and blocks of plain layers of level 1
    with torch.no_grad():
        _same(plain(x), sdag(x))
        for p in plain.parameters():
            p.mul_(1.5)
        changed = plain(x)
        sdag.load_from_base(plain)
        _same(sdag(x), changed)
        fresh = sdag.make_base_copy()
        for p in fresh.parameters():
            p.zero_()
        sdag.copy_to_base(fresh)
        _same(fresh(x), changed)


def test_what_stays_unsupported_says_what_to_do():
    sdag = _searchable()
    sdag.set_level_use(1)
    with pytest.raises(td.DagError, match=r"mutable vertices.*make_base_copy"):
        sdag.export_level_delta()
    with pytest.raises(td.DagError, match=r"vertex 'dw'.*flexible layer.*kernel_sizes"):
        td.nas.make_mutable(_flexible(), _depthwise, {"a": nn.Identity(), "b": nn.Identity()})


class _Tokens(nn.Module):
    """A transformer block by hand: `nn.MultiheadAttention` and an MLP, each a residual (`skip_*`: the
    oracle of depth, the branch left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.n1, self.n2 = nn.LayerNorm(32), nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)
        self.skip_attn = self.skip_mlp = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if not self.skip_attn:
            h = self.n1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
        if not self.skip_mlp:
            x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.n2(x))))
        return self.head(x.mean(1))


def test_skippable_attention_and_mlp_blocks_of_a_flexible_transformer(tmp_path):
    torch.manual_seed(0)
    model, x = _Tokens().eval(), torch.randn(2, 7, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = td.make_flexible(td.build_from_unstructured_module(model, example_inputs=(x,)), levels=LEVELS)
    sdag = td.nas.make_mutable(flex, td.nas.residual, td.nas.skippable())
    blocks = [m.name for m in td.nas.mutables(sdag) if m.kind == "op"]
    assert len(blocks) == 2
    channels = [m.name for m in td.nas.mutables(sdag) if m.kind == "channel"]
    for level, width in enumerate(LEVELS):  # the head-count reshapes inside the attention block follow
        td.nas.set_chosen(sdag, {**dict.fromkeys(blocks, "block"), **dict.fromkeys(channels, width)})
        flex.set_level_use(level)
        with torch.no_grad():
            _same(sdag(x), flex(x))
    td.nas.set_chosen(sdag, {blocks[0]: "identity", blocks[1]: "block"})
    model.skip_attn = True
    with torch.no_grad():
        torch.testing.assert_close(sdag(x), model(x))
    choice = {blocks[0]: "block", blocks[1]: "identity", channels[0]: 0.5, channels[-1]: 0.25}
    td.nas.set_chosen(sdag, choice)
    assert sdag.current_level() is None
    sub = td.nas.export_subnet(sdag)
    td.save(sdag, tmp_path / "t.dag")
    with torch.no_grad():
        _same(sub(x), sdag(x))
        _same(td.load(tmp_path / "t.dag")(x), sdag(x))
    assert td.count_flops(sdag, x).total_flops == td.count_flops(sub, x).total_flops


@pytest.mark.slow
def test_kernel_sizes_and_depth_on_a_flexible_timm_model(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = td.make_flexible(
            td.build_from_unstructured_module(model, example_inputs=(x,)), levels=[0.5, 1.0]
        )
    sdag = td.nas.make_mutable(flex, _depthwise, td.nas.kernel_sizes(3, 5))
    sdag = td.nas.make_mutable(sdag, td.nas.residual, td.nas.skippable())
    kinds = [m.kind for m in td.nas.mutables(sdag)]
    assert kinds.count("value") >= 8 and kinds.count("op") >= 5
    with torch.no_grad():
        _same(sdag(x), flex(x))
        torch.testing.assert_close(sdag(x), model(x))
    rng = random.Random(0)
    for _ in range(3):
        td.nas.set_chosen(sdag, td.nas.sample(sdag, rng))
        sub = td.nas.export_subnet(sdag)
        with torch.no_grad():
            _same(sub(x), sdag(x))
        ours, theirs = td.count_flops(sdag, x), td.count_flops(sub, x)
        assert (ours.total_flops, ours.total_params) == (theirs.total_flops, theirs.total_params)
    td.save(sdag, tmp_path / "m.dag")
    with torch.no_grad():
        _same(td.load(tmp_path / "m.dag")(x), sdag(x))
