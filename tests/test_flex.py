"""Flexible models: levels of one weight-shared model, plain copies, per-group widths, level deltas and
the delta managers, save/load, hand-written flexible layers, and sandwich training."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import torch_dag as td
from tests.zoo import make
from torch_dag import flex as tf
from torch_dag.cli import main
from torch_dag.core.compare import bitwise_equal, compare_outputs
from torch_dag.flex import delta_file as delta_file_module
from torch_dag.flex import delta_level
from torch_dag.pruning import channel_groups, channel_scores

LEVELS = [0.25, 0.5, 1.0]
ZOO = ["residual", "concat_split", "depthwise_grouped", "squeeze_excite", "attention"]


def flexible(name: str, levels=LEVELS):
    """A zoo model, its inputs, its DAG and a flexible copy (no rounding: the zoo's layers are narrow)."""
    model, inputs = make(name)
    dag = td.build_from_unstructured_module(model, inputs)
    return model, inputs, dag, tf.make_flexible(dag, levels, inputs, config=tf.FlexConfig(round_to=1))


def run(module, inputs):
    with torch.no_grad():
        return module(*inputs)


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = state(a), state(b)
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )


def plain_at(flex: tf.FlexDagModule, level: int) -> td.DagModule:
    flex.set_level_use(level)
    return flex.make_base_copy()


@pytest.fixture(scope="module")
def resnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = (torch.randn(2, 3, 64, 64),)
    dag = td.build_from_unstructured_module(model, x)
    return dag, x, tf.make_flexible(dag, LEVELS, x)


# --- levels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_each_level_runs_and_equals_its_plain_copy(name):
    model, inputs, dag, flex = flexible(name)
    assert flex.max_level() == 2 and flex.current_level() == 2
    flops = []
    for level in range(flex.max_level() + 1):
        flex.set_level_use(level)
        assert flex.current_level() == level
        plain = flex.make_base_copy()
        assert type(plain) is td.DagModule and not any(tf.is_flex(v.module) for v in plain)
        td.verify(plain)
        assert bitwise_equal(run(flex, inputs), run(plain, inputs)), level
        flops.append(td.count_flops(plain, *inputs).total_flops)
        assert td.count_flops(flex, *inputs).total_flops == flops[-1]  # FLOPs of the level in use
    assert flops[0] < flops[1] < flops[2] == td.count_flops(dag, *inputs).total_flops
    equal, worst, why = compare_outputs(run(model, inputs), run(flex, inputs))
    assert equal, (worst, why)  # the top level is the original model


def test_the_input_dag_is_untouched_and_levels_are_nested():
    _, inputs, dag, flex = flexible("residual")
    before = copy.deepcopy(dag)
    flex.set_level_use(0)
    flex.train()(*inputs)
    assert same_state(dag, before) and not any(tf.is_flex(v.module) for v in dag)
    for vertex in flex.flex_vertices():
        for low, high in itertools.pairwise(vertex.module.cuts):
            for attr, axes in low.items():
                wider = dict(high.get(attr, []))
                for axis, index in axes:
                    kept = wider.get(axis)
                    assert kept is None or set(index.tolist()) <= set(kept.tolist()), (vertex.name, attr)


def test_channels_are_sorted_by_importance_so_levels_take_prefixes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    x = (torch.randn(2, 3, 8, 8),)
    dag = td.build_from_unstructured_module(model, x)
    flex = tf.make_flexible(dag, [0.25, 0.5, 1.0], x, config=tf.FlexConfig(criterion="l1", round_to=1))
    groups = channel_groups(dag, x)
    (group,) = [g for g in groups.groups() if g.prunable]
    scores = channel_scores(dag, groups, "l1")
    best = sorted(range(16), key=lambda c: -scores[group.channels[c]])
    first, second = (v.module for v in flex.flex_vertices())
    assert torch.equal(first.weight, model[0].weight[best])  # the most important channels first
    assert torch.equal(second.weight, model[2].weight[:, best])
    for level, keep in enumerate([4, 8, 16]):
        rows = dict(first.cuts[level].get("weight", [(0, np.arange(16))]))[0]
        assert rows.tolist() == list(range(keep)), level  # a prefix
    equal, worst, why = compare_outputs(run(model, x), run(flex, x))
    assert equal, (worst, why)
    unsorted = tf.make_flexible(
        dag, [0.25, 1.0], x, config=tf.FlexConfig(criterion="l1", round_to=1, reorder=False)
    )
    rows = dict(next(iter(unsorted.flex_vertices())).module.cuts[0]["weight"])[0]
    assert sorted(rows.tolist()) == sorted(best[:4]) and bitwise_equal(
        run(unsorted.set_level_use(1) or unsorted, x), run(dag, x)
    )


def test_an_order_the_graph_does_not_carry_is_caught_and_left_out(monkeypatch):
    from torch_dag.flex import make as flex_make

    calls = itertools.count(1)

    def inconsistent(roots, rank, allowed):  # each axis moved its own way: layers disagree on the order
        return np.roll(np.arange(len(roots)), next(calls)) if allowed else np.arange(len(roots))

    monkeypatch.setattr(flex_make, "_sorted_runs", inconsistent)
    model, inputs = make("residual")
    dag = td.build_from_unstructured_module(model, inputs)
    with pytest.warns(UserWarning, match="keep their channel order"):
        flex = tf.make_flexible(dag, LEVELS, inputs, config=tf.FlexConfig(round_to=1))
    assert bitwise_equal(run(model, inputs), run(flex, inputs))  # left in place
    flex.set_level_use(0)
    assert bitwise_equal(run(flex, inputs), run(flex.make_base_copy(), inputs))


def test_levels_from_flops_ratios_land_near_them(resnet):
    dag, x, _ = resnet
    flex = tf.make_flexible(dag, example_inputs=x, flops_ratios=[0.3, 0.6, 1.0])
    full = td.count_flops(dag, *x).total_flops
    ratios = []
    for level in range(3):
        flex.set_level_use(level)
        ratios.append(td.count_flops(flex, *x).total_flops / full)
    assert abs(ratios[0] - 0.3) < 0.08 and abs(ratios[1] - 0.6) < 0.08 and ratios[2] == 1.0, ratios


@pytest.mark.slow
def test_levels_per_group(resnet):
    dag, x, flex = resnet
    dimension = flex.search_dimension
    widths = [[0.5] * dimension, [1.0] * (dimension - 1) + [0.5], [1.0] * dimension]
    per_group = tf.make_flexible(dag, widths, x)
    per_group.set_level_use(1)
    assert td.count_flops(per_group, *x).total_flops < td.count_flops(dag, *x).total_flops
    with pytest.raises(td.DagError, match="one width per prunable channel group"):
        tf.make_flexible(dag, [[0.5, 0.5]], x)


def test_level_errors_are_clear():
    _, inputs, _, flex = flexible("residual")
    for bad in (3, -1, 1.5, "1"):
        with pytest.raises(td.DagError, match=r"levels 0\.\.2"):
            flex.set_level_use(bad)
    flex.set_level_use(0)
    wide = torch.randn(2, 5, 16, 16)  # the model takes 3 channels
    with pytest.raises(RuntimeError) as error:
        flex(wide)
    assert "level 0" in "".join(getattr(error.value, "__notes__", [])) + str(error.value)
    with pytest.raises(td.DagError, match="at least one level"):
        tf.make_flexible(flex.make_base_copy(), [], inputs)


def test_batchnorm_statistics_are_kept_per_level():
    _, inputs, _, flex = flexible("residual")
    flex.train()
    bn = next(v.module for v in flex.flex_vertices() if v.module.op == "BatchNorm2d")
    before = [level.running_mean.clone() for level in bn.levels]
    flex.set_level_use(0)
    flex(*inputs)
    assert not torch.equal(bn.levels[0].running_mean, before[0])
    assert torch.equal(bn.levels[1].running_mean, before[1]) and torch.equal(
        bn.levels[2].running_mean, before[2]
    )


def test_gradients_reach_the_shared_weights_from_a_narrow_level():
    _, inputs, _, flex = flexible("residual")
    flex.set_level_use(0)
    flex(*inputs).sum().backward()
    conv = next(v.module for v in flex.flex_vertices() if v.module.op == "Conv2d")
    grad = conv.weight.grad
    rows = dict(conv.cuts[0]["weight"])[0]
    assert grad is not None and grad[rows].abs().sum() > 0
    outside = sorted(set(range(grad.shape[0])) - set(rows.tolist()))
    assert grad[outside].abs().sum() == 0


# --- plain models ---------------------------------------------------------------------------------


def test_load_from_base_and_copy_to_base(resnet):
    _, x, flex = resnet
    flex = copy.deepcopy(flex)  # the fixture is shared
    flex.set_level_use(1)
    plain = flex.make_base_copy()
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(0.5)
    flex.load_from_base(plain)
    assert bitwise_equal(run(flex, x), run(plain, x))
    other = flex.make_base_copy()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    flex.copy_to_base(other)
    assert same_state(other, plain)
    flex.set_level_use(2)
    with pytest.raises(td.DagError, match="another level"):
        flex.load_from_base(plain)
    with pytest.raises(td.DagError, match="same names"):
        flex.load_from_base(td.DagModule(plain.input_names, list(plain)[:3], list(plain)[2].name))


def test_set_widths_runs_the_sub_network(resnet):
    dag, x, flex = resnet
    flex = copy.deepcopy(flex)
    dimension = flex.search_dimension
    assert dimension == len(flex.width_info["ranking"]) > 5
    widths = [random.Random(i).choice([0.3, 0.6, 1.0]) for i in range(dimension)]
    flex.set_widths(widths)
    assert flex.current_level() is None
    plain = flex.make_base_copy()
    assert bitwise_equal(run(flex, x), run(plain, x))
    assert td.count_flops(plain, *x).total_flops < td.count_flops(dag, *x).total_flops
    channel_counts = [8] * dimension  # widths as channel counts
    flex.set_widths(channel_counts)
    assert bitwise_equal(run(flex, x), run(flex.make_base_copy(), x))
    with pytest.raises(td.DagError, match=f"{dimension} \\(the search dimension\\)"):
        flex.set_widths([0.5])
    with pytest.raises(td.DagError, match="fraction in"):
        flex.set_widths([1.5] * dimension)
    with pytest.raises(td.DagError, match="set_level_use"):
        flex.export_level_delta()
    flex.set_level_use(2)
    assert compare_outputs(run(dag, x), run(flex, x))[0]


# --- save / load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["residual", "concat_split", "attention"])
def test_save_and_load_keep_every_level(tmp_path, name):
    _, inputs, _, flex = flexible(name)
    flex.set_level_use(1)
    td.save(flex, tmp_path / "f.dag")
    loaded = td.load(tmp_path / "f.dag")
    assert isinstance(loaded, tf.FlexDagModule) and loaded.current_level() == 1
    for level in range(3):
        flex.set_level_use(level)
        loaded.set_level_use(level)
        assert bitwise_equal(run(flex, inputs), run(loaded, inputs)), level
    if name == "residual":  # the analysis behind set_widths is rebuilt from the file
        widths = [0.4] * flex.search_dimension
        flex.set_widths(widths)
        loaded.set_widths(widths)
        assert bitwise_equal(run(flex, inputs), run(loaded, inputs))


# --- deltas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["residual", "concat_split", "depthwise_grouped", "attention"])
def test_deltas_move_plain_models_exactly(name):
    _, inputs, _, flex = flexible(name)
    plains = [plain_at(flex, level) for level in range(3)]
    flex.set_level_use(1)
    down, up = flex.export_level_delta()
    low, high = plain_at(flex, 0), plain_at(flex, 2)
    up.apply(low)
    down.apply(high)
    for moved in (low, high):
        assert same_state(moved, plains[1])
        assert bitwise_equal(run(moved, inputs), run(plains[1], inputs))
        td.verify(moved)
    # only what differs: going down carries no weights at all (per-level norm statistics at most), going
    # up fewer than the level holds
    assert not any(key.endswith(("weight", "bias")) for key in down.values)
    assert down.nbytes < up.nbytes < sum(t.numel() * t.element_size() for t in state(plains[1]).values())
    with pytest.raises(td.DagError, match="not at level 0"):
        up.apply(plain_at(flex, 2))
    flex.set_level_use(0)
    assert flex.export_level_delta()[1] is None
    flex.set_level_use(2)
    assert flex.export_level_delta()[0] is None


def test_delta_bytes_round_trip(resnet):
    _, _, flex = resnet
    flex.set_level_use(2)
    _, up = flex.export_level_delta()
    again = tf.LevelDelta.from_bytes(up.to_bytes())
    plain = plain_at(flex, 1)
    again.apply(plain)
    assert same_state(plain, plain_at(flex, 2))
    with pytest.raises(td.LoadError):
        tf.LevelDelta.from_bytes(up.to_bytes()[:-10])


@pytest.mark.slow
def test_in_memory_manager_moves_between_any_levels(resnet):
    _, x, flex = resnet
    flex.set_level_use(1)
    manager = tf.InMemoryDeltaManager(flex)
    model = manager.managed_model()
    plains = [plain_at(flex, level) for level in range(3)]
    for level in [2, 0, 2, 1, 0, 1, 1]:
        assert manager.move_to(level) is model
        assert same_state(model, plains[level]), level
        assert bitwise_equal(run(model, x), run(plains[level], x))
    with pytest.raises(td.DagError, match=r"levels are 0\.\.2"):
        manager.move_to(5)


def test_file_manager_reads_only_what_it_needs(tmp_path, resnet):
    _, x, flex = resnet
    path = tf.FileDeltaManager.make_delta_file(tmp_path / "r18.delta", flex, starting_level=0)
    weights = sum(p.numel() * p.element_size() for p in flex.parameters())
    assert path.stat().st_size <= weights * 1.01  # base + up-deltas add up to about the flexible weights
    plains = [plain_at(flex, level) for level in range(3)]
    with tf.file_delta_manager(path) as manager:
        model = manager.move_to(0)
        read_at_start = manager.bytes_read
        assert read_at_start < path.stat().st_size / 4
        for level in [1, 2, 0, 2, 1]:
            assert manager.move_to(level) is model
            assert same_state(model, plains[level]), level
            assert bitwise_equal(run(model, x), run(plains[level], x))
            # going down frees the larger level's memory: no tensor is a view into a bigger one
            assert all(
                t.untyped_storage().nbytes() == t.numel() * t.element_size()
                for t in model.state_dict().values()
            ), level
        assert manager.bytes_read < 3 * path.stat().st_size
    with pytest.raises(ValueError):  # closed
        manager.move_to(0)


def test_delta_file_corruption_is_reported(tmp_path, resnet):
    _, _, flex = resnet
    path = tf.FileDeltaManager.make_delta_file(tmp_path / "r.delta", flex)
    data = path.read_bytes()
    cases = {
        "magic": b"XXXXXXXX" + data[8:],
        "truncated": data[: len(data) // 2],
        "index": data[:60] + bytes([data[60] ^ 1]) + data[61:],
        "segment": data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:],
        "empty": b"",
    }
    for what, broken in cases.items():
        bad = tmp_path / f"{what}.delta"
        bad.write_bytes(broken)
        with pytest.raises(td.LoadError), tf.file_delta_manager(bad) as manager:
            for level in (0, 1, 2):
                manager.move_to(level)


@pytest.mark.slow
def test_delta_file_checks_every_chunk_of_a_segment(tmp_path, resnet, monkeypatch):
    _, _, flex = resnet
    plains = [plain_at(flex, level) for level in range(3)]
    monkeypatch.setattr(delta_file_module, "_CHUNK", 4096)  # many pieces per segment
    path = tf.FileDeltaManager.make_delta_file(tmp_path / "r.delta", flex)
    with tf.file_delta_manager(path) as manager:
        index = manager.index
        for level in (2, 0, 1):
            assert same_state(manager.move_to(level), plains[level])
    entry = index["by_name"]["up/2"]
    assert len(entry["crc32"]) > 4
    data = bytearray(path.read_bytes())
    at = len(data) - sum(e["length"] for e in index["segments"]) + entry["offset"] + 3 * 4096 + 17
    data[at] ^= 0x01  # one bit in the fourth piece of one segment
    (tmp_path / "bad.delta").write_bytes(bytes(data))
    with tf.file_delta_manager(tmp_path / "bad.delta") as manager:
        manager.move_to(1)  # the segments it needs are intact
        with pytest.raises(td.LoadError, match="'up/2' is corrupted"):
            manager.move_to(2)
        assert manager.level == 1 and same_state(manager.move_to(1), plains[1])
    with tf.file_delta_manager(tmp_path / "bad.delta") as manager:  # a path of two segments, the second bad
        model = manager.move_to(0)
        with pytest.raises(td.LoadError, match="'up/2' is corrupted"):
            manager.move_to(2)
        assert manager.level == 0 and same_state(model, plains[0])  # not left halfway, at level 1
    data = bytearray(path.read_bytes())  # a broken header (which would not parse) reads as corruption too
    data[at - 3 * 4096 - 17 + 20] ^= 0x20
    (tmp_path / "bad_header.delta").write_bytes(bytes(data))
    with tf.file_delta_manager(tmp_path / "bad_header.delta") as manager:
        model = manager.move_to(1)
        with pytest.raises(td.LoadError, match="'up/2' is corrupted"):
            manager.move_to(2)
        assert manager.level == 1 and same_state(model, plains[1])


def test_a_move_across_levels_rebuilds_the_model_once(tmp_path, resnet, monkeypatch):
    _, x, flex = resnet
    path = tf.FileDeltaManager.make_delta_file(tmp_path / "r.delta", flex)
    rebuilds = []
    update = delta_level.update_in_place
    monkeypatch.setattr(delta_level, "update_in_place", lambda *a: rebuilds.append(a[-1]) or update(*a))
    plain = plain_at(flex, 2)
    with tf.file_delta_manager(path) as manager:
        model = manager.move_to(0)
        assert manager.move_to(2) is model and same_state(model, plain)
        assert bitwise_equal(run(model, x), run(plain, x))
        assert manager.move_to(0) is model and same_state(model, plain_at(flex, 0))
    assert rebuilds == ["level deltas 0 -> 1 -> 2", "level deltas 2 -> 1 -> 0"]


def test_delta_file_of_another_version_is_refused(tmp_path, resnet):
    _, _, flex = resnet
    data = tf.FileDeltaManager.make_delta_file(tmp_path / "r.delta", flex).read_bytes()
    length = struct.unpack("<Q", data[8:16])[0]
    index = json.loads(data[48 : 48 + length])
    index["version"] = 1
    raw = json.dumps(index).encode()
    (tmp_path / "old.delta").write_bytes(
        data[:8] + struct.pack("<Q", len(raw)) + hashlib.sha256(raw).digest() + raw + data[48 + length :]
    )
    with pytest.raises(td.LoadError, match="not a version 2 torch_dag delta file"):
        tf.FileDeltaManager(tmp_path / "old.delta")


# --- hand-written flexible models -----------------------------------------------------------------


class HandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = tf.Conv2d([3, 3, 3], [8, 12, 16], kernel_size=3, padding=1)
        self.b1 = tf.BatchNorm2d([8, 12, 16])
        self.dw = tf.Conv2d([8, 12, 16], [8, 12, 16], kernel_size=3, padding=1, groups=16)
        self.attn = tf.MultiheadAttention([8, 12, 16], [1, 2, 4], head_dim=4)
        self.ln = tf.LayerNorm([8, 12, 16])
        self.fc = tf.Linear([8, 12, 16], [10, 10, 10])

    def forward(self, x):
        x = self.b1(self.c1(x)).relu()
        x = x + self.dw(x)
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.ln(t))
        return self.fc(t.mean(1))


def set_eager_level(model: nn.Module, level: int) -> None:
    for layer in tf.flex_layers(model):
        layer.set_level(level)


def test_hand_written_layers_are_prefixes_of_one_weight():
    conv = tf.Conv2d([1, 2, 3], [10, 15, 20], kernel_size=3)
    assert conv.weight.shape == (20, 3, 3, 3)
    x = torch.randn(2, 2, 8, 8)
    conv.set_level(1)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight[:15, :2], conv.bias[:15]))
    linear = tf.Linear([4, 8], [6, 6])
    linear.set_level(0)
    assert linear(torch.randn(3, 4)).shape == (3, 6)
    with pytest.raises(td.DagError, match="non-decreasing"):
        tf.Linear([8, 4], [6, 6])
    with pytest.raises(td.DagError, match="one input and one output width per level"):
        tf.Linear([4, 8], [6])
    with pytest.raises(td.DagError, match="level 3 does not exist"):
        conv.set_level(3)


def test_a_hand_written_flexible_model_converts_saves_and_moves(tmp_path):
    torch.manual_seed(0)
    net = HandWritten().eval()
    x = (torch.randn(2, 3, 8, 8),)
    dag = td.build_from_unstructured_module(net, x)
    assert isinstance(dag, tf.FlexDagModule) and dag.max_level() == 2
    td.save(dag, tmp_path / "h.dag")
    loaded = td.load(tmp_path / "h.dag")
    plains = []
    for level in range(3):
        set_eager_level(net, level)
        dag.set_level_use(level)
        loaded.set_level_use(level)
        equal, worst, why = compare_outputs(run(net, x), run(dag, x))
        assert equal, (level, worst, why)
        assert bitwise_equal(run(dag, x), run(loaded, x))
        plains.append(dag.make_base_copy())
        assert bitwise_equal(run(dag, x), run(plains[-1], x))
    dag.set_level_use(1)
    with tf.file_delta_manager(tf.FileDeltaManager.make_delta_file(tmp_path / "h.delta", dag)) as manager:
        for level in (2, 0, 1):
            assert same_state(manager.move_to(level), plains[level])
    with pytest.raises(td.DagError, match="set_level_use"):
        dag.set_widths([0.5])  # a hand-written model has no channel analysis: levels only


# --- training -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sandwich_training_lowers_the_loss_at_every_level():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )
    x = torch.randn(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()  # learnable classes
    flex = tf.make_flexible(td.build_from_unstructured_module(model, (x[:2],)), LEVELS, (x[:2],))
    flex.train()

    def losses():
        flex.eval()
        out = {}
        with torch.no_grad():
            for level in range(3):
                flex.set_level_use(level)
                out[level] = float(F.cross_entropy(flex(x), y))
        flex.train()
        return out

    before = losses()
    optimizer = torch.optim.Adam(flex.parameters(), lr=1e-2)
    rng = random.Random(0)
    for _ in range(60):
        trained = tf.sandwich_step(flex, x, y, F.cross_entropy, optimizer, rng=rng)
    assert set(trained) == {0, 1, 2} and flex.current_level() == 2
    after = losses()
    assert all(after[level] < 0.7 * before[level] for level in range(3)), (before, after)


# --- compensation ---------------------------------------------------------------------------------


def _two_layer_flex(compensate: str, batches: list) -> tuple[td.DagModule, tf.FlexDagModule]:
    """An MLP whose only layer that loses inputs is its (protected) output layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    dag = td.build_from_unstructured_module(model, (batches[0],))
    return dag, tf.make_flexible(
        dag,
        LEVELS,
        (batches[0],),
        calibration=batches,
        config=tf.FlexConfig(round_to=1, compensate=compensate),
    )


def test_compensation_fits_all_levels_at_once():
    """The re-solved shared weights fit the input model's outputs better summed over the levels (what
    the layer's solution minimizes, here the model's outputs), giving up the top level's exactness."""
    torch.manual_seed(1)
    batches = [torch.randn(64, 16) for _ in range(4)]
    errors = {}
    for how in ("none", "lstsq"):
        dag, flex = _two_layer_flex(how, batches)
        with torch.no_grad():
            reference = torch.cat([dag(b) for b in batches])
            errors[how] = []
            for level in range(flex.max_level() + 1):
                flex.set_level_use(level)
                errors[how].append((torch.cat([flex(b) for b in batches]) - reference).square().sum().item())
                assert bitwise_equal(flex.make_base_copy()(batches[0]), flex(batches[0]))
    assert errors["none"][-1] < 1e-9 < errors["lstsq"][-1]  # float rounding only: the sort permutes sums
    assert sum(errors["lstsq"]) < sum(errors["none"]), errors
    assert errors["lstsq"][0] < errors["none"][0], errors


def test_compensation_needs_calibration_and_a_known_mode():
    dag, _ = _two_layer_flex("none", [torch.randn(8, 16)])
    with pytest.raises(td.DagError, match="compensate='mean' is not a known compensation"):
        tf.FlexConfig(compensate="mean")
    with pytest.raises(td.DagError, match="needs calibration batches"):
        tf.make_flexible(dag, LEVELS, (torch.randn(2, 16),), config=tf.FlexConfig(compensate="lstsq"))
    with pytest.raises(td.DagError, match="at least one calibration batch"):
        tf.make_flexible(
            dag,
            LEVELS,
            (torch.randn(2, 16),),
            calibration=iter([]),
            config=tf.FlexConfig(round_to=1, compensate="lstsq"),
        )


@pytest.mark.slow
def test_cli_flexify_compensates_like_the_api(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    data = torch.randn(16, 3, 32, 32)
    source = td.build_from_unstructured_module(
        timm.create_model("resnet18", pretrained=False).eval(), (data[:1],)
    )
    td.save(source, tmp_path / "r18.dag")
    np.save(tmp_path / "calibration.npy", data.numpy())
    out = tmp_path / "flex.dag"
    main(
        [
            "flexify",
            str(tmp_path / "r18.dag"),
            "--calibration",
            str(tmp_path / "calibration.npy"),
            "--compensate",
            "lstsq",
            "-q",
            "-o",
            str(out),
        ]
    )
    loaded = td.load(out)
    assert loaded.width_info["config"]["compensate"] == "lstsq"
    expected = tf.make_flexible(
        source,
        LEVELS,
        (data[:1],),
        calibration=[(b,) for b in data.split(8)],
        config=tf.FlexConfig(compensate="lstsq"),
    )
    assert bitwise_equal(loaded.state_dict(), expected.state_dict())
    assert not bitwise_equal(loaded.state_dict(), tf.make_flexible(source, LEVELS, (data[:1],)).state_dict())
    for level in range(3):
        loaded.set_level_use(level)
        assert bitwise_equal(loaded.make_base_copy()(data[:2]), loaded(data[:2]))


# --- command line ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_flexify_prints_levels_and_writes_files(tmp_path, capsys):
    pytest.importorskip("timm")
    out, deltas = tmp_path / "r18_flex.dag", tmp_path / "r18.delta"
    main(
        [
            "flexify",
            "timm:resnet18",
            "--levels",
            "0.25",
            "0.5",
            "1.0",
            "--input-size",
            "3x64x64",
            "-q",
            "-o",
            str(out),
            "--delta-file",
            str(deltas),
        ]
    )
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2"] and float(rows[2][3]) == 1.0 > float(rows[1][3]) > float(
        rows[0][3]
    )
    flex = td.load(out)
    assert isinstance(flex, tf.FlexDagModule) and flex.max_level() == 2
    main(["info", str(out)])
    assert "flexible: 3 levels" in capsys.readouterr().out
    with tf.file_delta_manager(deltas) as manager:
        flex.set_level_use(0)
        assert same_state(manager.move_to(0), flex.make_base_copy())


def test_a_flexible_file_loads_in_a_fresh_process(tmp_path):
    _, inputs, _, flex = flexible("attention")
    flex.set_level_use(0)
    td.save(flex, tmp_path / "f.dag")
    save_file({"x": inputs[0], "ref": run(flex, inputs)}, tmp_path / "io.safetensors")
    code = (
        "import sys; sys.modules['timm'] = None\nimport torch, torch_dag as td\n"
        "from safetensors.torch import load_file\n"
        f"m = td.load({str(tmp_path / 'f.dag')!r}); io = load_file({str(tmp_path / 'io.safetensors')!r})\n"
        "with torch.no_grad(): assert m.current_level() == 0 and torch.equal(m(io['x']), io['ref'])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- fuzzing the delta file -----------------------------------------------------------------------

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def delta_file(tmp_path_factory):
    flex = flexible("residual")[3]
    path = tf.FileDeltaManager.make_delta_file(tmp_path_factory.mktemp("fuzz") / "r.delta", flex)
    return DeltaFile(path.read_bytes(), [plain_at(flex, level) for level in range(3)])


class DeltaFile(tuple):
    """(file bytes, plain model per level), with a short repr for hypothesis's reports."""

    def __new__(cls, raw: bytes, plains: list):
        return super().__new__(cls, (raw, plains))

    def __repr__(self) -> str:
        return f"<delta file of {len(self[0])} bytes>"


def move_everywhere(path, plains) -> None:
    """Move through every level; a `LoadError` is an acceptable answer, and what loads must be right."""
    try:
        with tf.file_delta_manager(path) as manager:
            for level in (0, 2, 1, 0):
                assert same_state(manager.move_to(level), plains[level])
    except td.LoadError:
        pass


@FUZZ
@given(data=st.data())
def test_fuzz_delta_file_bytes(tmp_path, delta_file, data):
    raw, plains = delta_file
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        if len(out) < 2:
            break
        where = data.draw(st.integers(0, len(out) - 1))
        kind = data.draw(st.sampled_from(["flip", "truncate", "delete"]))
        if kind == "flip":
            out[where] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del out[max(where, 1) :]
        else:
            del out[where : where + data.draw(st.integers(1, 16))]
    (tmp_path / "f.delta").write_bytes(bytes(out))
    move_everywhere(tmp_path / "f.delta", plains)


JUNK = (
    st.none()
    | st.integers(-3, 50)
    | st.lists(st.integers(-3, 50), max_size=3)
    | st.text(max_size=4)
    | st.just({})
)


@pytest.mark.slow
@FUZZ
@given(
    segment=st.integers(1, 6),
    field=st.sampled_from(["source", "target", "graph", "source_shapes", "steps", "runs"]),
    entry=st.integers(0, 1000),
    whole=st.booleans(),
    junk=JUNK,
)
def test_fuzz_delta_contents_with_valid_checksums(tmp_path, delta_file, segment, field, entry, whole, junk):
    """A hostile file whose checksums match its (edited) contents: still only `LoadError`s."""
    raw, plains = delta_file
    length = struct.unpack("<Q", raw[8:16])[0]
    index = json.loads(raw[48 : 48 + length])
    blobs = [
        raw[48 + length + e["offset"] : 48 + length + e["offset"] + e["length"]] for e in index["segments"]
    ]
    k = segment % (len(blobs) - 1) + 1  # a delta segment (0 is the base model): edit its JSON
    head = struct.unpack("<Q", blobs[k][:8])[0]
    header = json.loads(blobs[k][8 : 8 + head])
    meta = json.loads(header["__metadata__"]["torch_dag.delta"])
    if isinstance(meta[field], dict) and meta[field] and not whole:
        meta[field][sorted(meta[field])[entry % len(meta[field])]] = junk
    else:
        meta[field] = junk
    header["__metadata__"]["torch_dag.delta"] = json.dumps(meta)
    new_head = json.dumps(header).encode()
    new_head += b" " * (-len(new_head) % 8)
    blobs[k] = struct.pack("<Q", len(new_head)) + new_head + blobs[k][8 + head :]
    offset = 0
    for item, blob in zip(index["segments"], blobs):
        crcs = [zlib.crc32(blob[i : i + index["chunk"]]) for i in range(0, len(blob), index["chunk"])]
        item.update(offset=offset, length=len(blob), crc32=crcs)
        offset += len(blob)
    index_bytes = json.dumps(index).encode()
    out = (
        raw[:8]
        + struct.pack("<Q", len(index_bytes))
        + hashlib.sha256(index_bytes).digest()
        + index_bytes
        + b"".join(blobs)
    )
    (tmp_path / "f.delta").write_bytes(out)
    move_everywhere(tmp_path / "f.delta", plains)
