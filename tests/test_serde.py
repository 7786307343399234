"""`td.save` / `td.load`: round trips against the saved DAG, sharing and ties, loading in a process
without timm, atomic saves, and malformed or hostile files, which must raise `LoadError` and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_dag as td
from torch_dag.core.compare import bitwise_equal
from torch_dag.serde.format import _checksum, _whole_checksum, build, graph_and_tensors, update_in_place
from torch_dag.serde.schema import graph_digest

# --- models -----------------------------------------------------------------------------------------


class RoundTripNet(nn.Module):
    """Conv-BN-ReLU, a residual add, a Linear used twice, a free parameter, a buffer, nested outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 8))
        self.register_buffer("scale", torch.rand(8) + 0.5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = y + self.conv2(y)
        pooled = y.mean((2, 3))
        h = self.fc(pooled) + self.cls_token
        return {"logits": self.fc(h) * self.scale, "pair": (pooled, y)}


class SharedLinearNet(nn.Module):
    """One Linear called twice."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class TiedNet(nn.Module):
    """An embedding whose weight is also the head's weight and is read again through F.linear; a frozen
    projection weight and a frozen free parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight
        self.proj = nn.Linear(6, 6)
        self.proj.weight.requires_grad_(False)
        self.gamma = nn.Parameter(torch.rand(6), requires_grad=False)

    def forward(self, idx):
        e = self.proj(self.emb(idx)) * self.gamma
        return self.head(e), F.linear(e, self.emb.weight)


def convert(model: nn.Module, inputs: Any) -> td.DagModule:
    torch.manual_seed(0)
    return td.build_from_unstructured_module(model, inputs)


def small_dag() -> tuple[td.DagModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    return convert(RoundTripNet().eval(), x), x


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> bytes:
    """The bytes of a valid `.dag` file of `RoundTripNet`, shared by the hostile-file tests."""
    dag, _ = small_dag()
    return td.save(dag, tmp_path_factory.mktemp("saved") / "good.dag").read_bytes()


# --- reading and rewriting files ---------------------------------------------------------------------


def split_file(data: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """(safetensors header, graph JSON, tensor bytes) of a `.dag` file."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return header, json.loads(header["__metadata__"]["torch_dag"]), data[8 + length :]


def join_file(header: dict[str, Any], graph: Any, tensor_bytes: bytes) -> bytes:
    """Re-serialize a header carrying `graph`; data offsets are relative to the header's end."""
    header = {**header, "__metadata__": signed_metadata(graph)}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + tensor_bytes


def signed_metadata(graph: Any) -> dict[str, str]:
    """The metadata `save` writes for `graph`, signed as a deliberate editor would sign it."""
    graph_json = json.dumps(graph)
    return {"torch_dag": graph_json, "torch_dag.sha256": graph_digest(graph_json)}


def edit_graph(data: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    header, graph, tensor_bytes = split_file(data)
    edit(graph)
    return join_file(header, graph, tensor_bytes)


def rewrite_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], Any]) -> None:
    """Let `edit` change the stored tensors (and the graph), then store them with a valid checksum, as a
    hostile file would."""
    _, graph, _ = split_file(path.read_bytes())
    tensors = safetensors.torch.load_file(str(path))
    edit(tensors, graph)
    graph["checksum"] = _checksum(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=signed_metadata(graph))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def vertex(graph: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in graph["vertices"] if v["name"] == name)


def assert_load_error(path: Path, *fragments: str) -> td.LoadError:
    with pytest.raises(td.LoadError) as info:
        td.load(path)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"
    return info.value


# --- round trip --------------------------------------------------------------------------------------


def test_round_trip_is_bitwise_and_keeps_the_graph(tmp_path):
    dag, x = small_dag()
    loaded = td.load(td.save(dag, tmp_path / "model.dag"))
    assert isinstance(loaded, td.DagModule)
    td.verify(loaded)
    with torch.no_grad():
        expected, actual = dag(x), loaded(x)
    assert set(actual) == {"logits", "pair"} and isinstance(actual["pair"], tuple)
    assert bitwise_equal(expected, actual)

    assert loaded.input_names == dag.input_names and loaded.output == dag.output
    assert [(v.name, v.op, v.args, v.kwargs) for v in loaded] == [
        (v.name, v.op, v.args, v.kwargs) for v in dag
    ]
    ops = {v.op for v in loaded}
    assert {"Conv2d", "BatchNorm2d", "ReLU", "add", "Linear", "Parameter", "Constant"} <= ops
    expected_state, state = dag.state_dict(), loaded.state_dict()
    assert list(state) == list(expected_state)
    assert all(bitwise_equal(expected_state[k], state[k]) for k in state)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_training_flag_survives(tmp_path, training):
    dag, x = small_dag()
    dag.train(training)
    loaded = td.load(td.save(dag, tmp_path / "model.dag"))
    assert loaded.training is training
    assert all(m.training is training for m in loaded.modules())
    # in training mode both use batch statistics and update the running ones identically
    assert bitwise_equal(dag(x), loaded(x))
    assert bitwise_equal(dag.state_dict(), loaded.state_dict())


def test_per_vertex_training_mode_survives(tmp_path):
    dag, x = small_dag()
    dag.train()
    dag.vertex_modules["bn"].eval()  # frozen batch statistics while fine-tuning
    loaded = td.load(td.save(dag, tmp_path / "model.dag"))
    assert [m.training for m in loaded.modules()] == [m.training for m in dag.modules()]
    assert bitwise_equal(dag(x), loaded(x))


# --- round trip of single layers and of other dtypes -------------------------------------------------


class First(nn.Module):
    """The first output of a layer that returns a tuple (attention: called with the input three times)."""

    def __init__(self, layer: nn.Module, attention: bool = False):
        super().__init__()
        self.layer, self.attention = layer, attention

    def forward(self, x):
        return (self.layer(x, x, x) if self.attention else self.layer(x))[0]


def _img() -> torch.Tensor:
    return torch.randn(2, 4, 6, 6)


def _seq() -> torch.Tensor:
    return torch.randn(2, 5, 8)


# layers whose configs hold tuples, strings, None, floats and flags: (make layer, make input)
LAYERS = {
    "Conv1d_reflect": (
        lambda: nn.Conv1d(5, 6, 3, stride=2, padding=1, bias=False, padding_mode="reflect"),
        _seq,
    ),
    "Conv2d_groups_same": (
        lambda: nn.Conv2d(4, 8, (3, 1), padding="same", groups=2, padding_mode="circular"),
        _img,
    ),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), _img),
    "Linear_no_bias": (lambda: nn.Linear(8, 3, bias=False), _seq),
    "Embedding_padding": (lambda: nn.Embedding(7, 3, padding_idx=0), lambda: torch.tensor([[1, 0, 6]])),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(5, eps=1e-3, momentum=0.2), _seq),
    "BatchNorm2d_no_affine": (lambda: nn.BatchNorm2d(4, affine=False), _img),
    "LayerNorm_no_bias": (lambda: nn.LayerNorm((5, 8), eps=1e-3, bias=False), _seq),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4, eps=1e-3), _img),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True), _img),
    "RMSNorm": (lambda: nn.RMSNorm(8, eps=1e-4), _seq),
    "PReLU": (lambda: nn.PReLU(4, init=0.1), _img),
    "GELU_tanh": (lambda: nn.GELU(approximate="tanh"), _img),
    "Softplus": (lambda: nn.Softplus(beta=2.0, threshold=5.0), _img),
    "Softmax": (lambda: nn.Softmax(dim=1), _img),
    "GLU": (lambda: nn.GLU(dim=1), _img),
    "MaxPool2d_ceil": (lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), _img),
    "AvgPool2d_divisor": (
        lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False, divisor_override=2),
        _img,
    ),
    "AdaptiveAvgPool2d_none": (lambda: nn.AdaptiveAvgPool2d((2, None)), _img),
    "PixelShuffle": (lambda: nn.PixelShuffle(2), _img),
    "ChannelShuffle": (lambda: nn.ChannelShuffle(2), _img),
    "Unfold": (lambda: nn.Unfold(2, padding=1, stride=2), _img),
    "MultiheadAttention": (
        lambda: First(nn.MultiheadAttention(8, 2, batch_first=True), attention=True),
        _seq,
    ),
}
RECURRENT = {
    "LSTM": (lambda: First(nn.LSTM(8, 6, num_layers=2, batch_first=True, bidirectional=True)), _seq),
    "GRU": (lambda: First(nn.GRU(8, 6, batch_first=True)), _seq),
    "RNN": (lambda: First(nn.RNN(8, 6, nonlinearity="relu", batch_first=True)), _seq),
}


def _layer_round_trip(
    tmp_path: Path, make_layer: Callable[[], nn.Module], make_input: Callable[[], Any]
) -> None:
    torch.manual_seed(0)
    model, x = make_layer().eval(), make_input()
    dag = convert(model, x)
    loaded = td.load(td.save(dag, tmp_path / "model.dag"))
    with torch.no_grad():
        assert bitwise_equal(dag(x), loaded(x))
        assert bitwise_equal(model(x), loaded(x))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_round_trip(tmp_path, name):
    _layer_round_trip(tmp_path, *LAYERS[name])


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_recurrent_layer_round_trip(tmp_path, name):
    _layer_round_trip(tmp_path, *RECURRENT[name])


class IndexNet(nn.Module):
    """An integer buffer used for indexing, and a free parameter."""

    def __init__(self):
        super().__init__()
        self.register_buffer("order", torch.tensor([2, 0, 1]))
        self.gain = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x[:, self.order] * self.gain


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.gain


DTYPE_CASES = {
    "int64_buffer": lambda: (IndexNet(), torch.randn(2, 3)),
    "float64": lambda: (
        nn.Sequential(nn.Linear(3, 4), Gain()).double(),
        torch.randn(2, 3, dtype=torch.float64),
    ),
    "bfloat16": lambda: (nn.Sequential(nn.Linear(3, 4), Gain()).bfloat16(), torch.randn(2, 3).bfloat16()),
}


@pytest.mark.parametrize("case", sorted(DTYPE_CASES))
def test_round_trip_keeps_dtypes(tmp_path, case):
    model, x = DTYPE_CASES[case]()
    dag = convert(model, x)
    loaded = td.load(td.save(dag, tmp_path / "model.dag"))
    assert bitwise_equal(dag(x), loaded(x))


# --- sharing, ties, frozen parameters ----------------------------------------------------------------


def test_module_called_twice_stays_one_module(tmp_path):
    model = SharedLinearNet().eval()
    x = torch.randn(3, 8)
    dag = convert(model, x)
    loaded = td.load(td.save(dag, tmp_path / "model.dag"))

    linears = [v for v in loaded if v.op == "Linear"]
    assert len(linears) == 2
    assert linears[0].module is linears[1].module
    assert loaded.vertex_modules[linears[0].name] is loaded.vertex_modules[linears[1].name]
    assert len(list(loaded.parameters())) == len(list(model.parameters())) == 2
    assert bitwise_equal(dag(x), loaded(x))


def test_tied_weights_stay_one_parameter_and_frozen_stay_frozen(tmp_path):
    model = TiedNet().eval()
    idx = torch.randint(0, 10, (2, 5))
    dag = convert(model, idx)
    loaded = td.load(td.save(dag, tmp_path / "model.dag"))

    users = [
        v for v in loaded if getattr(v.module, "weight", None) is not None and v.op in ("Embedding", "Linear")
    ]
    tied = {id(v.module.weight) for v in users if v.module.weight.shape == (10, 6)}
    assert sum(v.module.weight.shape == (10, 6) for v in users) == 3  # emb, head, F.linear
    assert len(tied) == 1
    assert len(list(loaded.parameters())) == len(list(model.parameters()))

    requires_grad = {name: p.requires_grad for name, p in loaded.named_parameters(remove_duplicate=False)}
    assert requires_grad == {
        name: p.requires_grad for name, p in dag.named_parameters(remove_duplicate=False)
    }
    assert sorted(n for n, flag in requires_grad.items() if not flag) == sorted(
        n for n, p in dag.named_parameters() if not p.requires_grad
    )
    assert sum(not flag for flag in requires_grad.values()) == 2  # proj.weight and gamma
    assert bitwise_equal(dag(idx), loaded(idx))

    # a gradient step through both uses lands on the one tied parameter
    loss = sum(out.sum() for out in loaded(idx))
    loss.backward()
    (weight,) = {v.module.weight for v in users if v.module.weight.shape == (10, 6)}
    assert weight.grad is not None
    assert all(p.grad is None for p in loaded.parameters() if not p.requires_grad)


# --- loading without timm, in a fresh process --------------------------------------------------------

FRESH_PROCESS = """
import sys
sys.modules["timm"] = None
try:
    import timm
except ImportError:
    pass
else:
    sys.exit("timm is importable")
import safetensors.torch
import torch
import torch_dag as td
from torch_dag.core.compare import bitwise_equal

dag = td.load(sys.argv[1])
reference = safetensors.torch.load_file(sys.argv[2])
with torch.no_grad():
    out = dag(reference["input"])
if not bitwise_equal(out, reference["output"]):
    sys.exit("outputs differ from the saved reference")
if any(sys.modules.get(m) is not None for m in sys.modules if m.split(".")[0] == "timm"):
    sys.exit("timm was imported")
"""


@pytest.mark.slow
def test_timm_dag_loads_in_a_process_without_timm(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    dag = convert(model, x)
    with torch.no_grad():
        out = dag(x)
    td.save(dag, tmp_path / "model.dag")
    safetensors.torch.save_file({"input": x, "output": out}, str(tmp_path / "reference.safetensors"))

    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, "model.dag", "reference.safetensors"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


# --- loaded tensors own aligned memory ---------------------------------------------------------------


def test_loaded_tensors_are_aligned(tmp_path):
    """Tensors at the file's offsets would be misaligned; kernels then take other paths and the outputs
    are no longer bitwise equal to the saved DAG's (seen with timm's test_vit at 160x160)."""
    # bias (3 floats = 12 bytes) is stored right before weight, so at most one of the two sits 16-aligned
    dag = convert(nn.Sequential(nn.Linear(3, 3)), torch.randn(1, 3))
    loaded = td.load(td.save(dag, tmp_path / "model.dag"))
    assert all(t.data_ptr() % 64 == 0 for t in loaded.state_dict().values())


def test_loaded_weights_do_not_change_with_the_file(tmp_path):
    """The loaded model does not keep a mapping of the file: rewriting the file leaves it alone."""
    dag = convert(nn.Sequential(nn.Linear(256, 256)), torch.randn(1, 256))
    path = td.save(dag, tmp_path / "model.dag")
    loaded = td.load(path)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    size = path.stat().st_size
    with path.open("r+b") as f:  # rewrite the weight bytes in place, as another writer could
        f.seek(size - 200 * 1024)
        f.write(b"\x7f" * (150 * 1024))
    assert bitwise_equal(before, dict(loaded.state_dict()))


# --- saving: atomic, replacing, permissions ----------------------------------------------------------


def test_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    dag, x = small_dag()
    path = td.save(dag, tmp_path / "model.dag")
    good = path.read_bytes()

    def fail(fd):  # the temporary file is written; the crash comes before it is renamed into place
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    other = convert(RoundTripNet().eval(), x)
    assert not bitwise_equal(dag(x), other(x))
    with pytest.raises(OSError, match="disk full"):
        td.save(other, path)
    monkeypatch.undo()

    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.dag"]
    assert bitwise_equal(dag(x), td.load(path)(x))


def test_save_replaces_an_existing_file(tmp_path):
    dag, x = small_dag()
    path = td.save(dag, tmp_path / "model.dag")
    torch.manual_seed(1)
    other = td.build_from_unstructured_module(RoundTripNet().eval(), x)
    assert not bitwise_equal(dag(x), other(x))
    assert td.save(other, path) == path
    assert bitwise_equal(other(x), td.load(path)(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.dag"]


def test_save_creates_missing_directories(tmp_path):
    dag, x = small_dag()
    path = td.save(dag, tmp_path / "a" / "b" / "model.dag")
    assert bitwise_equal(dag(x), td.load(path)(x))


def test_saved_file_mode_follows_umask(tmp_path):
    dag, _ = small_dag()
    old = os.umask(0o022)
    try:
        path = td.save(dag, tmp_path / "model.dag")
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644


def test_saving_does_not_change_the_dag(tmp_path):
    dag, _ = small_dag()
    before = {k: v.clone() for k, v in dag.state_dict().items()}
    td.save(dag, tmp_path / "model.dag")
    assert bitwise_equal(before, dict(dag.state_dict()))
    assert dag.training is False


def test_save_rejects_a_plain_module(tmp_path):
    with pytest.raises(TypeError, match="DagModule"):
        td.save(nn.Linear(2, 2), tmp_path / "model.dag")
    assert not list(tmp_path.iterdir())


# --- malformed and hostile files ---------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert_load_error(tmp_path / "absent.dag", "no such file")
    assert_load_error(tmp_path, "no such file")  # a directory


def test_empty_file(tmp_path):
    path = tmp_path / "empty.dag"
    path.write_bytes(b"")
    assert_load_error(path, "truncated")


@pytest.mark.parametrize("where", ["prefix", "length", "header", "header_end", "data", "last_byte"])
def test_truncated_file(tmp_path, saved, where):
    (length,) = struct.unpack("<Q", saved[:8])
    cut = {
        "prefix": 5,
        "length": 8,
        "header": 8 + length // 2,
        "header_end": 8 + length,
        "data": 8 + length + (len(saved) - 8 - length) // 2,
        "last_byte": len(saved) - 1,
    }[where]
    path = tmp_path / "cut.dag"
    path.write_bytes(saved[:cut])
    assert_load_error(path, "truncated")


def test_header_length_beyond_the_file(tmp_path, saved):
    path = tmp_path / "long.dag"
    path.write_bytes(struct.pack("<Q", len(saved)) + saved[8:])
    assert_load_error(path, "exceeds the file")
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + saved[8:])
    assert_load_error(path, "exceeds the file")


def test_header_not_json(tmp_path, saved):
    (length,) = struct.unpack("<Q", saved[:8])
    path = tmp_path / "garbage.dag"
    path.write_bytes(saved[:8] + b"\xff" * length + saved[8 + length :])
    assert_load_error(path, "not valid JSON")


def test_plain_safetensors_file(tmp_path):
    path = tmp_path / "plain.dag"
    safetensors.torch.save_file({"weight": torch.ones(2, 2)}, str(path))
    assert_load_error(path, "not a torch_dag file")
    safetensors.torch.save_file({"weight": torch.ones(2, 2)}, str(path), metadata={"format": "pt"})
    assert_load_error(path, "not a torch_dag file")


def test_checksum_catches_a_flipped_byte(tmp_path, saved):
    data = bytearray(saved)
    data[-3] ^= 0x01
    path = tmp_path / "flipped.dag"
    path.write_bytes(bytes(data))
    assert_load_error(path, "checksum mismatch")


def test_checksum_of_a_large_model_checks_every_piece(tmp_path):
    """Weights are hashed in 4 MiB pieces, several at once: a byte flipped in any piece is caught."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1200, 1200),
        nn.ReLU(),
        nn.Linear(1200, 1200),
        nn.ReLU(),
        nn.Linear(1200, 1200),
        nn.ReLU(),
        nn.Linear(1200, 10),
    )  # three 5.8 MB weights: six pieces, hashed in parallel
    x = torch.randn(2, 1200)
    path = td.save(td.build_from_unstructured_module(model, (x,)), tmp_path / "large.dag")
    assert torch.equal(td.load(path)(x), model(x))
    data = path.read_bytes()
    for at in (len(data) - 50, len(data) - 3 * (1 << 22) - 5, len(data) - 6 * 1200 * 1200 + 7):
        broken = bytearray(data)
        broken[at] ^= 0x10
        assert_load_error(write(tmp_path / "broken.dag", bytes(broken)), "checksum mismatch")


def test_files_with_the_older_single_digest_still_load_and_are_checked(tmp_path, saved):
    """Files saved before the weights were hashed in pieces hold one SHA-256 of all their bytes."""
    old = tmp_path / "old.dag"
    write(old, saved)
    _, graph, _ = split_file(old.read_bytes())
    tensors = safetensors.torch.load_file(str(old))
    graph["checksum"] = _whole_checksum(tensors)
    graph["schema_version"] = 1  # those files had no graph checksum
    assert len(graph["checksum"]) == 64
    safetensors.torch.save_file(tensors, str(old), metadata={"torch_dag": json.dumps(graph)})
    dag, x = small_dag()
    assert bitwise_equal(td.load(old)(x), dag(x))
    data = bytearray(old.read_bytes())
    data[-3] ^= 0x01
    assert_load_error(write(tmp_path / "old_flipped.dag", bytes(data)), "checksum mismatch")


def set_key(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda graph: graph.__setitem__(key, value)


def set_in(name: str, path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(graph: dict[str, Any]) -> None:
        target = vertex(graph, name)
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def add_vertex(entry: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda graph: graph["vertices"].append(entry)


def nest(depth: int) -> Callable[[dict[str, Any]], None]:
    def edit(graph: dict[str, Any]) -> None:
        inner = {"inputs": ["a"], "vertices": [], "output": {"$ref": "a"}}
        for _ in range(depth):
            inner = {
                "inputs": ["a"],
                "output": {"$ref": "n"},
                "vertices": [{"name": "n", "op": "DagModule", "config": inner, "args": [{"$ref": "a"}]}],
            }
        graph["vertices"].append(
            {"name": "nested", "op": "DagModule", "config": inner, "args": [{"$ref": "x"}]}
        )

    return edit


# (id, edit of the graph JSON, fragments the LoadError message must contain)
GRAPH_EDITS = [
    ("schema_version_3", set_key("schema_version", 3), ["schema version 3"]),
    ("schema_version_str", set_key("schema_version", "1"), ["schema version '1'"]),
    ("schema_version_missing", lambda g: g.pop("schema_version"), ["schema version None"]),
    ("format", set_key("format", "onnx"), ["not a torch_dag file"]),
    ("graph_empty", lambda g: g.clear(), ["not a torch_dag file"]),
    ("unknown_module_op", set_in("conv", ("op",), "EvilConv2d"), ["EvilConv2d", "unknown module op"]),
    ("unknown_function_op", set_in("add", ("op",), "os.system"), ["os.system", "unknown module op"]),
    ("op_not_string", set_in("conv", ("op",), ["Conv2d"]), ["has no op name"]),
    (
        "config_class_key",
        set_in("conv", ("config", "__class__"), "subprocess.Popen"),
        ["unknown config keys ['__class__']", "Conv2d"],
    ),
    (
        "config_extra_key",
        set_in("conv", ("config", "weights_path"), "/etc/passwd"),
        ["unknown config keys ['weights_path']"],
    ),
    ("config_not_object", set_in("conv", ("config",), [3, 8]), ["config must be an object"]),
    ("config_on_function", set_in("add", ("config",), {"x": 1}), ["function op takes no config"]),
    ("config_rejected", set_in("conv", ("config", "groups"), 2), ["vertex 'conv'", "cannot build"]),
    (
        "weight_shape",
        set_in("conv", ("config", "out_channels"), 4),
        ["vertex_modules.conv.weight is stored as (8, 3, 3, 3)", "needs (4, 3, 3, 3)"],
    ),
    (
        "parameter_shape",
        set_in("cls_token", ("config", "shape"), {"$tuple": [1, 9]}),
        ["cls_token.weight is stored as (1, 8)", "needs (1, 9)"],
    ),
    ("reads_missing_vertex", set_in("relu", ("args",), [{"$ref": "ghost"}]), ["ghost"]),
    ("reads_later_vertex", set_in("conv", ("args",), [{"$ref": "relu"}]), ["relu"]),
    ("output_missing_vertex", set_key("output", {"$ref": "ghost"}), ["ghost"]),
    (
        "too_many_args",
        set_in("relu", ("args",), [{"$ref": "bn"}, {"$ref": "bn"}]),
        ["vertex 'relu'", "arguments do not fit"],
    ),
    (
        "template_tag",
        set_in("mean", ("args", 1), {"$eval": "__import__('os')"}),
        ["malformed template value"],
    ),
    ("dtype_name", set_in("mean", ("kwargs", "dtype"), {"$dtype": "os"}), ["unknown dtype 'os'"]),
    ("ref_not_string", set_in("relu", ("args",), [{"$ref": 3}]), ["$ref must name a vertex"]),
    (
        "template_too_deep",
        set_in("mean", ("args", 1), json.loads("[" * 70 + "]" * 70)),
        ["nested more than"],
    ),
    ("dunder_name", set_in("relu", ("name",), "__class__"), ["invalid name"]),
    ("keyword_name", set_in("relu", ("name",), "lambda"), ["invalid name"]),
    ("dotted_name", set_in("relu", ("name",), "os.path"), ["invalid name"]),
    ("duplicate_name", set_in("relu", ("name",), "conv"), ["'conv' is used twice"]),
    ("name_is_input", set_in("relu", ("name",), "x"), ["'x' is used twice"]),
    (
        "bad_input_name",
        set_key("inputs", ["x; import os"]),
        ["inputs must be a list of distinct identifiers"],
    ),
    ("kwargs_key", set_in("add", ("kwargs",), {"not an identifier": 1}), ["kwargs must map identifiers"]),
    ("keyword_kwarg", set_in("add", ("kwargs",), {"lambda": 1}), ["'lambda' is not an identifier"]),
    ("meta_not_object", set_in("relu", ("meta",), [1]), ["meta must be an object"]),
    ("input_meta", set_key("input_meta", {"x": [2, 3]}), ["input_meta"]),
    ("vertices_not_list", set_key("vertices", {"conv": {}}), ["vertices must be a list"]),
    ("vertex_not_object", add_vertex(["conv"]), ["must be an object"]),
    (
        "same_module_as_missing",
        set_in("fc_1", ("same_module_as",), "ghost"),
        ["same_module_as names no earlier"],
    ),
    ("same_module_as_other_op", set_in("fc_1", ("same_module_as",), "conv"), ["whose op is Conv2d"]),
    ("weights_tied_to_nothing", set_key("tied", {"vertex_modules.conv.weight": "ghost"}), ["'tied'"]),
    ("frozen_not_list", set_key("frozen", "vertex_modules.conv.weight"), ["bad 'frozen'"]),
    ("nested_too_deep", nest(20), ["nested more than 16 levels"]),
    ("checksum", set_key("checksum", "0" * 64), ["checksum mismatch"]),
]


@pytest.mark.parametrize(("edit", "fragments"), [g[1:] for g in GRAPH_EDITS], ids=[g[0] for g in GRAPH_EDITS])
def test_hostile_graph(tmp_path, saved, edit, fragments):
    path = tmp_path / "hostile.dag"
    path.write_bytes(edit_graph(saved, edit))
    assert_load_error(path, *fragments)


def test_unedited_rewrite_still_loads(tmp_path, saved):
    """The rewriting helper itself produces loadable files, so the failures above come from the edits."""
    path = tmp_path / "same.dag"
    path.write_bytes(edit_graph(saved, lambda graph: None))
    assert isinstance(td.load(path), td.DagModule)


def test_weights_missing(tmp_path, saved):
    path = tmp_path / "missing.dag"
    path.write_bytes(saved)
    rewrite_tensors(path, lambda tensors, graph: tensors.pop("vertex_modules.conv2.weight"))
    assert_load_error(path, "weights missing", "vertex_modules.conv2.weight")


def test_unexpected_weights(tmp_path, saved):
    path = tmp_path / "extra.dag"
    path.write_bytes(saved)
    rewrite_tensors(
        path, lambda tensors, graph: tensors.__setitem__("vertex_modules.evil.weight", torch.ones(1))
    )
    assert_load_error(path, "unexpected weights", "vertex_modules.evil.weight")


def test_weight_dtype_mismatch(tmp_path, saved):
    path = tmp_path / "dtype.dag"
    path.write_bytes(saved)
    key = "vertex_modules.fc.weight"
    rewrite_tensors(path, lambda tensors, graph: tensors.__setitem__(key, tensors[key].double()))
    assert_load_error(path, key, "torch.float64", "needs (8, 8) torch.float32")


def test_unchecked_checksum_still_validates_weights(tmp_path, saved):
    _, graph, _ = split_file(saved)
    path = tmp_path / "no_checksum.dag"
    tensors = safetensors.torch.load_file(str(write(tmp_path / "good.dag", saved)))
    del tensors["vertex_modules.conv2.bias"]
    safetensors.torch.save_file(tensors, str(path), metadata=signed_metadata(graph))
    with pytest.raises(td.LoadError, match="checksum"):
        td.load(path)
    with pytest.raises(td.LoadError, match=r"weights missing for \['vertex_modules.conv2.bias'\]"):
        td.load(path, strict_checksum=False)


def test_malformed_tensor_entries(tmp_path, saved):
    header, graph, tensor_bytes = split_file(saved)
    key = "vertex_modules.conv.weight"
    for entry, fragment in [
        ({**header[key], "dtype": "PICKLE"}, "malformed entry"),
        ({**header[key], "shape": [-1]}, "malformed entry"),
        ({**header[key], "data_offsets": [0]}, "malformed entry"),
        ({**header[key], "data_offsets": [0, 10**12]}, "outside the file"),
        ({**header[key], "shape": [8, 3, 3, 4]}, "wrong size"),
        (
            {
                **header[key],
                "data_offsets": header["vertex_modules.conv2.weight"]["data_offsets"],
                "shape": header["vertex_modules.conv2.weight"]["shape"],
            },
            "overlap",
        ),
    ]:
        path = write(tmp_path / "entry.dag", join_file({**header, key: entry}, graph, tensor_bytes))
        assert_load_error(path, fragment)


def test_duplicate_input_names(tmp_path, saved):
    path = write(tmp_path / "dup.dag", edit_graph(saved, set_key("inputs", ["x", "x"])))
    assert_load_error(path, "'x'")


@pytest.mark.parametrize(
    ("key", "source"),
    [
        ("vertex_modules.bn.running_mean", "vertex_modules.bn.weight"),
        ("vertex_modules.bn.weight", "vertex_modules.bn.running_mean"),
    ],
)
def test_tie_between_parameter_and_buffer(tmp_path, saved, key, source):
    def tie(tensors, graph):
        del tensors[key]
        graph["tied"][key] = source

    path = write(tmp_path / "tie.dag", saved)
    rewrite_tensors(path, tie)
    try:
        loaded = td.load(path)
    except td.LoadError:
        return
    assert not [k for k, t in loaded.state_dict(keep_vars=True).items() if t.device.type == "meta"]


# --- fuzzing -----------------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def load_or_load_error(path: Path) -> td.DagModule | None:
    """Load `path`; a `LoadError` is an acceptable answer, any other exception fails the test."""
    try:
        loaded = td.load(path)
    except td.LoadError as e:
        reason = re.sub(r"\d+", "N", str(e).removeprefix(f"{path}: "))[:40]
        event(f"LoadError: {reason}")  # see --hypothesis-show-statistics
        return None
    event("loaded")
    assert isinstance(loaded, td.DagModule)
    return loaded


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        # favour the length prefix and the header, where the parser does its work
        where = draw(st.one_of(st.integers(0, 7), st.integers(8, 8 + length), st.integers(0, len(out) - 1)))
        where = min(where, len(out) - 1)
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if kind == "flip":
            out[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            out[where] = draw(st.sampled_from(b'\x00\xff"{}[],:0123456789-eE.\\ntfa'))
        elif kind == "truncate":
            del out[where:]
        elif kind == "insert":
            out[where:where] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[where : where + draw(st.integers(1, 16))]
    return bytes(out)


@FUZZ
@given(data=st.data())
def test_fuzz_bytes(tmp_path, saved, data):
    path = write(tmp_path / "fuzz.dag", data.draw(byte_mutations(saved)))
    load_or_load_error(path)


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += json_paths(item, (*prefix, index))
    return paths


# template tags and op names the loader dispatches on
LOADER_WORDS = ("$ref", "$tuple", "$dict", "$slice", "$dtype", "$float", "$device", "$ellipsis")
LOADER_WORDS += ("DagModule", "Conv2d", "Parameter", "add", "nan", "inf")


def json_values(names: list[str]) -> st.SearchStrategy[Any]:
    """Random JSON, seeded with the names and tags the loader looks for, so mutations reach deep checks."""
    words = st.sampled_from([*names, *LOADER_WORDS])
    leaves = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8) | words
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | words, inner, max_size=4)
        ),
        max_leaves=12,
    )


@FUZZ
@given(data=st.data())
def test_fuzz_graph(tmp_path, saved, data):
    header, graph, tensor_bytes = split_file(saved)
    names = [v["name"] for v in graph["vertices"]] + sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3))):
        paths = json_paths(graph)[:0:-1]  # deepest last vertex first; not the root (a trivial case)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = graph
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values(names))
    file = write(tmp_path / "fuzz.dag", join_file(header, graph, tensor_bytes))
    load_or_load_error(file)


# --- moving a model in place to an edited graph ---------------------------------------------------


def _narrowed(dag: td.DagModule, width: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The graph and tensors of `dag` (Linear 4 -> 8, ReLU, Linear 8 -> 3) with the hidden width cut."""
    graph, tensors = graph_and_tensors(dag)
    first, _, second = graph["vertices"]
    first["config"]["out_features"] = width
    second["config"]["in_features"] = width
    for key in list(tensors):
        if first["name"] in key:
            tensors[key] = tensors[key][:width].clone()
        elif second["name"] in key and key.endswith("weight"):
            tensors[key] = tensors[key][:, :width].clone()
    return graph, tensors


def _mlp_dag() -> tuple[td.DagModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    return td.build_from_unstructured_module(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), (x,)
    ), x


def test_update_in_place_keeps_the_forward_and_equals_a_fresh_build():
    dag, x = _mlp_dag()
    graph, tensors = _narrowed(dag, 5)
    code, first, relu = dag.code, dag.vertices[0], dag.vertices[1]
    update_in_place(dag, graph, {first.name, dag.vertices[2].name}, tensors, "test")
    assert dag.code is code and dag.vertices[1] is relu and dag.vertices[0] is not first
    assert (
        dag.vertices[0].module.out_features == 5 and dag.vertex_modules[first.name] is dag.vertices[0].module
    )
    fresh = build(graph, tensors, "test")
    assert bitwise_equal(dag(x), fresh(x)) and graph_and_tensors(dag)[0] == graph_and_tensors(fresh)[0]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_update_in_place_gives_new_vertices_their_saved_modes_and_keeps_the_others(training):
    dag, _ = _mlp_dag()
    dag.train(training)
    first, relu, last = dag.vertices
    last.module.train(not training)  # saved in the other mode, like a frozen batchnorm
    relu.module.train(not training)  # not rebuilt: keeps whatever mode it has
    graph, tensors = _narrowed(dag, 5)
    update_in_place(dag, graph, {first.name, last.name}, tensors, "test")
    assert dag.training is training and dag.vertices[1].module is relu.module
    assert [v.module.training for v in dag] == [training, not training, not training]


def test_update_in_place_leaves_the_model_as_it_was_on_an_error():
    dag, x = _mlp_dag()
    before = dag(x)
    graph, tensors = _narrowed(dag, 5)
    tensors[next(k for k in tensors if k.endswith("bias"))] = torch.zeros(7)
    with pytest.raises(td.LoadError, match="is stored as \\(7,\\)"):
        update_in_place(dag, graph, {v.name for v in dag}, tensors, "test")
    assert dag.vertices[0].module.out_features == 8 and bitwise_equal(dag(x), before)


def test_update_in_place_rebuilds_when_the_edit_rewires_a_vertex():
    dag, x = _mlp_dag()
    graph, tensors = graph_and_tensors(dag)
    graph["vertices"][1]["args"] = [graph["vertices"][0]["args"][0]]  # the ReLU now reads the input
    graph["vertices"][2]["config"]["in_features"] = 4
    weight = next(k for k in tensors if graph["vertices"][2]["name"] in k and k.endswith("weight"))
    tensors[weight] = tensors[weight][:, :4].clone()
    update_in_place(dag, graph, {v["name"] for v in graph["vertices"][1:]}, tensors, "test")
    assert bitwise_equal(dag(x), build(graph, tensors, "test")(x))
    assert dag.vertices[1].predecessors == dag.input_names
