"""Damaged and hostile `.dag` and delta files: the graph checksum, full validation of signed (deliberately
edited) headers, resource limits checked before building, `LoadError` and nothing else under fuzzing,
and the temporary files of saves."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_dag as td
from tests.zoo import make
from torch_dag import flex as tf
from torch_dag.core.compare import bitwise_equal
from torch_dag.serde.schema import graph_digest

# --- a small model and its file -----------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.LeakyReLU(0.1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4, 5)
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x):
        y = self.drop(self.act(self.bn(self.conv(x)))).mean((2, 3))
        return self.sm(self.fc(y) * 2.0)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    dag = td.build_from_unstructured_module(Small().eval(), (x,))
    return td.serde.format.dumps(dag), dag, x


def split(data: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return header, json.loads(header["__metadata__"]["torch_dag"]), data[8 + length :]


def signed(header: dict[str, Any], graph: Any, tensor_bytes: bytes) -> bytes:
    """The file with `graph` in its header, re-signed as a deliberate editor would."""
    graph_json = json.dumps(graph)
    header = {
        **header,
        "__metadata__": {"torch_dag": graph_json, "torch_dag.sha256": graph_digest(graph_json)},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + tensor_bytes


def edited(data: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    header, graph, rest = split(data)
    edit(graph)
    return signed(header, graph, rest)


def entry(graph: dict[str, Any], op: str) -> dict[str, Any]:
    return next(v for v in graph["vertices"] if v["op"] == op)


def load_error(data: bytes, *fragments: str) -> str:
    with pytest.raises(td.LoadError) as info:
        td.serde.format.loads(data)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"
    return str(info.value)


# --- the graph checksum ---------------------------------------------------------------------------


def test_an_unsigned_change_of_a_config_is_caught(small):
    data, _, _ = small
    old = b'negative_slope\\":0.1'  # the graph JSON sits escaped in the safetensors header
    assert old in data
    load_error(data.replace(old, b'negative_slope\\":0.3'), "graph checksum mismatch")


def test_a_file_without_its_graph_checksum_is_refused(small):
    header, graph, rest = split(small[0])
    raw = json.dumps({**header, "__metadata__": {"torch_dag": json.dumps(graph)}}).encode()
    load_error(struct.pack("<Q", len(raw)) + raw + rest, "graph checksum is missing")


def test_schema_version_1_files_still_load_with_their_weights_checked(small):
    data, dag, x = small
    header, graph, rest = split(data)
    graph["schema_version"] = 1
    raw = json.dumps({**header, "__metadata__": {"torch_dag": json.dumps(graph)}}).encode()
    old = struct.pack("<Q", len(raw)) + raw + rest
    assert bitwise_equal(td.serde.format.loads(old)(x), dag(x))
    broken = bytearray(old)
    broken[-2] ^= 0x10
    load_error(bytes(broken), "weight checksum mismatch")


# --- signed edits: full validation ------------------------------------------------------------------


def set_config(op: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda graph: entry(graph, op)["config"].__setitem__(key, value)


def rename(op: str, name: str) -> Callable[[dict[str, Any]], None]:
    def edit(graph: dict[str, Any]) -> None:
        old = entry(graph, op)["name"]
        text = json.dumps(graph).replace(f'"{old}"', f'"{name}"')
        graph.clear()
        graph.update(json.loads(text))

    return edit


def reads_itself(graph: dict[str, Any]) -> None:
    relu = entry(graph, "LeakyReLU")
    relu["args"] = [{"$ref": relu["name"]}]


# (id, edit, fragments of the LoadError)
SIGNED_EDITS = [
    ("stride_zero", set_config("Conv2d", "stride", {"$tuple": [0, 1]}), ["'stride' must be"]),
    ("kernel_negative", set_config("Conv2d", "kernel_size", {"$tuple": [-3, 3]}), ["'kernel_size'"]),
    ("channels_bool", set_config("Linear", "in_features", True), ["'in_features' must be a positive int"]),
    ("p_above_one", set_config("Dropout", "p", 1.5), ["'p' must be a number in [0, 1]"]),
    ("eps_zero", set_config("BatchNorm2d", "eps", 0.0), ["'eps' must be a number > 0"]),
    ("eps_nan", set_config("BatchNorm2d", "eps", {"$float": "nan"}), ["'eps'"]),
    ("slope_string", set_config("LeakyReLU", "negative_slope", "0.1"), ["'negative_slope' must be a number"]),
    ("bias_int", set_config("Linear", "bias", 1), ["'bias' must be a bool"]),
    ("padding_mode", set_config("Conv2d", "padding_mode", "evil"), ["'padding_mode'"]),
    ("required_missing", lambda g: entry(g, "Linear")["config"].pop("in_features"), ["lacks 'in_features'"]),
    ("no_output", lambda g: g.pop("output"), ["has no output"]),
    ("reads_itself", reads_itself, ["reads", "neither an input nor an earlier vertex"]),
    ("named_training", rename("LeakyReLU", "training"), ["invalid name 'training'"]),
    ("named_modules", rename("LeakyReLU", "_modules"), ["invalid name '_modules'"]),
    ("not_nfkc", rename("LeakyReLU", "\ufb01ve"), ["invalid name"]),
    (
        "inputs_same_after_nfkc",
        lambda g: g.__setitem__("inputs", ["\ufb01", "fi"]),
        ["inputs must be a list of distinct identifiers"],
    ),
    ("dtype_list", lambda g: entry(g, "Linear").__setitem__("dtypes", {"weight": ["float32"]}), ["dtype"]),
    (
        "dtype_quantized",
        lambda g: entry(g, "Linear").__setitem__("dtypes", {"weight": "qint8"}),
        ["unknown dtype 'qint8'"],
    ),
    ("lstm_layers", lambda g: g["vertices"].insert(0, _lstm(10_000)), ["makes at least 20000 tensors"]),
    ("linear_overflow", set_config("Linear", "in_features", 2**62), ["vertex"]),
]


def _lstm(layers: int) -> dict[str, Any]:
    config = {"input_size": 4, "hidden_size": 4, "num_layers": layers}
    return {"name": "lstm", "op": "LSTM", "config": config, "args": [{"$ref": "x"}]}


@pytest.mark.parametrize(
    ("edit", "fragments"), [e[1:] for e in SIGNED_EDITS], ids=[e[0] for e in SIGNED_EDITS]
)
def test_signed_edit_is_still_validated(small, edit, fragments):
    start = time.perf_counter()
    load_error(edited(small[0], edit), *fragments)
    assert time.perf_counter() - start < 2


def test_overflowing_tensor_shape(small):
    header, graph, rest = split(small[0])
    header["empty"] = {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}
    load_error(signed(header, graph, rest), "impossible shape")


@pytest.mark.slow
def test_too_many_vertices_are_refused_before_building(small):
    def many(graph: dict[str, Any]) -> None:
        graph["vertices"] += [
            {"name": f"i{k}", "op": "Identity", "config": {}, "args": [{"$ref": "x"}]} for k in range(100_001)
        ]

    data = edited(small[0], many)
    start = time.perf_counter()
    load_error(data, "more than 100000 vertices")
    assert time.perf_counter() - start < 5  # reading 10 MB of JSON, nothing built


@pytest.fixture(scope="module")
def flex_model():
    model, inputs = make("residual")
    dag = td.build_from_unstructured_module(model, inputs)
    return tf.make_flexible(dag, [0.5, 1.0], inputs, config=tf.FlexConfig(round_to=1)), inputs


def test_a_flexible_cut_of_a_billion_is_refused_before_allocating(flex_model):
    flex, _ = flex_model
    header, graph, rest = split(td.serde.format.dumps(flex))
    layer = entry(graph, "Flex")["config"]
    name = next(iter(layer["params"]))
    layer["params"][name]["shape"][0] = 10**9
    layer["levels"][-1]["cuts"][name] = [[0, [[0, 10**9]]]]
    start = time.perf_counter()
    load_error(signed(header, graph, rest), "larger than any tensor of the file")
    assert time.perf_counter() - start < 2


# --- delta files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def delta_bytes(flex_model, tmp_path_factory):
    flex, _ = flex_model
    path = tf.FileDeltaManager.make_delta_file(tmp_path_factory.mktemp("d") / "m.delta", flex)
    plains = []
    for level in range(flex.max_level() + 1):
        flex.set_level_use(level)
        plains.append(flex.make_base_copy())
    return path.read_bytes(), plains


def with_index(
    raw: bytes, edit: Callable[[dict[str, Any]], Any] | None, index_bytes: bytes | None = None
) -> bytes:
    """The delta file with its index edited (and its index hash matching, as a deliberate editor would)."""
    (length,) = struct.unpack("<Q", raw[8:16])
    if index_bytes is None:
        index = json.loads(raw[48 : 48 + length])
        assert edit is not None
        edit(index)
        index_bytes = json.dumps(index).encode()
    head = raw[:8] + struct.pack("<Q", len(index_bytes)) + hashlib.sha256(index_bytes).digest()
    return head + index_bytes + raw[48 + length :]


@pytest.mark.parametrize(
    ("edit", "raw_index", "fragment"),
    [
        (lambda i: i.__setitem__("starting_level", 10**9), None, "levels starting at"),
        (lambda i: i.__setitem__("levels", 10**9), None, "levels starting at"),
        (lambda i: i.__setitem__("segments", None), None, "no list of segments"),
        (lambda i: i["segments"].pop(), None, "lacks"),
        (None, b"{not json", "not JSON"),
        (None, b"[" * 100_000, "not JSON"),
    ],
    ids=["starting_level", "levels", "segments_null", "segment_missing", "not_json", "deep"],
)
def test_hostile_delta_index(tmp_path, delta_bytes, edit, raw_index, fragment):
    path = tmp_path / "h.delta"
    path.write_bytes(with_index(delta_bytes[0], edit, raw_index))
    start = time.perf_counter()
    with pytest.raises(td.LoadError, match=fragment), tf.file_delta_manager(path) as manager:
        manager.move_to(0)
    assert time.perf_counter() - start < 2


# --- fuzzing: LoadError or the very same model ----------------------------------------------------

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def mutate(draw, data: bytes) -> bytes:
    out = bytearray(data)
    (length,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (0,)
    for _ in range(draw(st.integers(1, 3))):
        if len(out) < 2:
            break
        where = draw(st.one_of(st.integers(8, 8 + length), st.integers(0, len(out) - 1)))
        where = min(where, len(out) - 1)
        kind = draw(st.sampled_from(["flip", "digit", "truncate", "delete"]))
        if kind == "flip":
            out[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "digit":
            out[where] = draw(st.sampled_from(b"0123456789-.e"))
        elif kind == "truncate":
            del out[max(where, 1) :]
        else:
            del out[where : where + draw(st.integers(1, 8))]
    return bytes(out)


@FUZZ
@given(data=st.data())
def test_fuzz_dag_bytes_never_load_a_different_model(small, data):
    """Unsigned damage: either `LoadError`, or (a change that means nothing) the same outputs bitwise."""
    raw, dag, x = small
    damaged = mutate(data.draw, raw)
    try:
        loaded = td.serde.format.loads(damaged)
    except td.LoadError:
        event("LoadError")
        return
    event("loaded, same outputs")
    assert bitwise_equal(loaded(x), dag(x)), "a damaged file loaded and computes something else"


JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=6)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
)


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += json_paths(item, (*prefix, index))
    return paths


def mutate_json(draw, document: Any) -> None:
    for _ in range(draw(st.integers(1, 3))):
        paths = json_paths(document)[1:]
        if not paths:
            return
        path = draw(st.sampled_from(paths))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)


@FUZZ
@given(data=st.data())
def test_fuzz_signed_graph_json_raises_only_load_error(small, data):
    """Signed (deliberate) edits of the graph JSON: `LoadError` or a model that runs as its JSON says."""
    header, graph, rest = split(small[0])
    mutate_json(data.draw, graph)
    try:
        loaded = td.serde.format.loads(signed(header, graph, rest))
    except td.LoadError:
        event("LoadError")
        return
    event("loaded (a valid edit)")
    assert isinstance(loaded, td.DagModule)


@FUZZ
@given(data=st.data())
def test_fuzz_delta_file_bytes_and_index(tmp_path, delta_bytes, data):
    """Damaged delta files, bytes or (re-hashed) index JSON: `LoadError`, or the right model at each level."""
    raw, plains = delta_bytes
    if data.draw(st.booleans()):
        damaged = mutate(data.draw, raw)
        event("bytes")
    else:
        (length,) = struct.unpack("<Q", raw[8:16])
        index = json.loads(raw[48 : 48 + length])
        mutate_json(data.draw, index)
        damaged = with_index(raw, None, json.dumps(index).encode())
        event("index JSON")
    path = tmp_path / "f.delta"
    path.write_bytes(damaged)
    try:
        with tf.file_delta_manager(path) as manager:
            for level in (0, 1, 0):
                moved = manager.move_to(level)
                expected = plains[level].state_dict()
                assert moved.state_dict().keys() == expected.keys()
                assert all(torch.equal(moved.state_dict()[k], v) for k, v in expected.items())
    except td.LoadError:
        event("LoadError")
        return
    event("moved, same models")


# --- temporary files of saves -------------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_failed_save_leaves_no_temporary_file(tmp_path, small, monkeypatch):
    _, dag, _ = small

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        td.save(dag, tmp_path / "m.dag")
    assert list(tmp_path.iterdir()) == []


def test_a_save_removes_the_leftovers_of_killed_saves_only(tmp_path, small):
    _, dag, x = small
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".m.dag.torch_dag-tmp-{dead}-abc123"
    running = tmp_path / f".m.dag.torch_dag-tmp-{alive}-def456"
    other_model = tmp_path / f".n.dag.torch_dag-tmp-{dead}-abc123"
    user = tmp_path / f".m.dag.torch_dag-tmp-{dead}"  # not the pattern: someone's own file
    for path in (stale, running, other_model, user):
        path.write_bytes(b"partial")
    td.save(dag, tmp_path / "m.dag")
    assert not stale.exists()
    assert running.exists() and other_model.exists() and user.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.dag", running.name, other_model.name, user.name]
    )
    assert bitwise_equal(td.load(tmp_path / "m.dag")(x), dag(x))


@pytest.mark.slow
def test_a_killed_save_is_cleaned_up_by_the_next(tmp_path, small):
    _, dag, _ = small
    target = tmp_path / "m.dag"
    code = (
        "import os, sys, torch_dag as td\n"
        "from torch_dag.serde import save as s\n"
        "def die(*a): os._exit(9)\n"
        "os.fsync = die\n"
        f"td.save(td.load({str(tmp_path / 'src.dag')!r}), {str(target)!r})\n"
    )
    td.save(dag, tmp_path / "src.dag")
    result = subprocess.run([sys.executable, "-c", code], check=False)
    assert result.returncode == 9
    left = [p for p in tmp_path.iterdir() if ".torch_dag-tmp-" in p.name]
    assert len(left) == 1 and not target.exists()
    td.save(dag, target)
    assert [p for p in tmp_path.iterdir() if ".torch_dag-tmp-" in p.name] == []


def test_infinite_bounds_are_configs_that_load(tmp_path):
    """Infinities are meaningful config values (an open bound); only NaN is refused."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Hardtanh(-float("inf"), 6.0))
    x = torch.randn(1, 3, 8, 8)
    dag = td.build_from_unstructured_module(model, (x,))
    with torch.no_grad():
        assert torch.equal(td.load(td.save(dag, tmp_path / "m.dag"))(x), dag(x))
