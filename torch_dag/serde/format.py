"""Saving and loading DAGs: one `.dag` file, a safetensors file whose metadata holds the graph JSON.

Layout (documented in README.md):
- the safetensors header's `__metadata__["torch_dag"]` is the graph: schema version, inputs, vertices
  (name, op, config, args, kwargs, meta), output, tied tensors, frozen parameters and a checksum
  (`_checksum`: SHA-256 over the tensors' 4 MiB pieces' SHA-256s; older files' single digest still reads);
- the tensors are the DAG's state dict, each shared tensor stored once.

Loading rebuilds modules only from the registered vocabulary, validates the JSON before building,
never unpickles and never imports or runs anything named in the file. Saving writes a temporary
file beside the target and renames it into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import struct
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..core.dag import DagModule, Vertex, is_valid_vertex_name
from ..core.errors import DagError, LoadError, UnknownOpError, VerifyError
from ..core.functions import FUNCTIONS
from ..core.ops import CUSTOM_OPS, FunctionOp, clone_module, is_dag_module, module_op_spec, op_name
from ..core.template import DTYPES, from_json, to_json
from ..core.verify import arity_problem, verify

SCHEMA_VERSION = 1

# DagModule subclasses with extra graph data (flexible DAGs): graph key -> (class, its JSON, a builder
# from that JSON and the inputs, vertices, output and input meta)
EXTENSION_DAGS: dict[str, tuple[type, Callable[[Any], Any], Callable[..., DagModule]]] = {}
_FORMAT = "torch_dag"
_MAX_HEADER = 100 * 1024 * 1024
_MAX_DEPTH = 16


# --- save -----------------------------------------------------------------------------------------


def save(dag: DagModule, path: str | os.PathLike) -> Path:
    """Write `dag` to `path` (a single `.dag` file) atomically; return the path."""
    path = Path(path)
    data = dumps(dag)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path


def dumps(dag: DagModule) -> bytes:
    """The bytes of a `.dag` file for `dag`."""
    graph, tensors = graph_and_tensors(dag)
    graph["checksum"] = _checksum(tensors)
    metadata = {_FORMAT: json.dumps(graph, separators=(",", ":"), allow_nan=False)}
    return safetensors.torch.save(tensors, metadata=metadata)


def graph_and_tensors(dag: DagModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The graph JSON of `dag` (without checksum) and its tensors, each shared tensor once."""
    if not is_dag_module(dag):
        raise TypeError(f"td.save expects a DagModule, got {type(dag).__name__}")
    verify(dag)
    tensors, tied, frozen = _unique_tensors(dag)
    graph = {
        "format": _FORMAT,
        "schema_version": SCHEMA_VERSION,
        **_graph_json(dag),
        "training": dag.training,
        "tied": tied,
        "frozen": frozen,
    }
    return graph, tensors


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a crash never leaves it half-written: a temporary file, synced, renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; a saved model is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _graph_json(dag: DagModule) -> dict[str, Any]:
    first_user: dict[int, str] = {}
    vertices = []
    for vertex in dag:
        entry: dict[str, Any] = {"name": vertex.name, "op": vertex.op}
        shared = first_user.setdefault(id(vertex.module), vertex.name)
        if shared != vertex.name:
            entry["same_module_as"] = shared
        elif is_dag_module(vertex.module):
            entry["config"] = _graph_json(vertex.module)
        elif vertex.op in CUSTOM_OPS:
            entry["config"] = CUSTOM_OPS[vertex.op].to_config(vertex.module)
        elif not isinstance(vertex.module, FunctionOp):
            spec = module_op_spec(vertex.op)
            config = spec.config(vertex.module)
            entry["config"] = {k: to_json(v) for k, v in config.items()}
            dtypes = _dtypes_differing(spec.build(config), vertex.module)
            if dtypes:
                entry["dtypes"] = dtypes
        entry["args"] = to_json(list(vertex.args))
        entry["kwargs"] = {k: to_json(v) for k, v in vertex.kwargs.items()}
        if vertex.module.training != dag.training:
            entry["training"] = vertex.module.training
        if vertex.meta:
            entry["meta"] = _json_safe(vertex.meta)
        vertices.append(entry)
    graph = {
        "inputs": list(dag.input_names),
        "input_meta": _json_safe(dag.input_meta),
        "vertices": vertices,
        "output": to_json(dag.output),
    }
    for key, (cls, to_json_, _) in EXTENSION_DAGS.items():
        if isinstance(dag, cls):
            graph[key] = to_json_(dag)
    return graph


def _dtypes_differing(fresh: nn.Module, module: nn.Module) -> dict[str, str]:
    """Tensors whose dtype differs from a freshly built module's (a float64 or bf16 layer)."""
    built = fresh.state_dict(keep_vars=True)
    return {
        key: str(t.dtype).removeprefix("torch.")
        for key, t in module.state_dict(keep_vars=True).items()
        if key in built and built[key].dtype != t.dtype
    }


def _json_safe(meta: dict[str, Any]) -> dict[str, Any]:
    """Keep the JSON-able part of vertex meta (information only; never interpreted on load)."""
    out = {}
    for key, value in meta.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def _unique_tensors(dag: DagModule) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """The state dict with each tensor stored once; other names for it are recorded as ties."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    frozen: list[str] = []
    first_key: dict[int, str] = {}
    storages: set[tuple[int, int]] = set()
    for key, tensor in dag.state_dict(keep_vars=True).items():
        if id(tensor) in first_key:
            tied[key] = first_key[id(tensor)]
            continue
        first_key[id(tensor)] = key
        if isinstance(tensor, nn.Parameter) and not tensor.requires_grad:
            frozen.append(key)
        data = tensor.detach().cpu().contiguous()
        if tensor.device.type == "meta":
            raise DagError(f"cannot save {key!r}: it is on the meta device (no data)")
        where = (data.untyped_storage().data_ptr(), data.untyped_storage().nbytes())
        if where in storages or data.data_ptr() == 0:
            data = data.clone()
        storages.add(where)
        tensors[key] = data
    return tensors, tied, frozen


_PIECE = 1 << 22  # bytes per separately hashed piece of a tensor
_PIECED = "sha256/4MiB:"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The weights' checksum as `save` writes it: SHA-256 over the tensors sorted by name, of each one's
    name, dtype and shape, then of the SHA-256 of each 4 MiB piece of its bytes; the pieces are hashed on
    a thread pool (hashlib lets go of the GIL), so a large model checks at several cores' speed."""
    entries = [(key, tensors[key], _bytes_of(tensors[key])) for key in sorted(tensors)]
    pieces = [piece for _, _, data in entries for piece in split_bytes(data, _PIECE)]
    workers = min(8, os.cpu_count() or 1, len(pieces))
    if workers > 1 and sum(len(data) for _, _, data in entries) > 4 * _PIECE:
        with ThreadPoolExecutor(workers) as pool:
            digests = iter(list(pool.map(_sha256, pieces)))
    else:
        digests = map(_sha256, pieces)
    digest = hashlib.sha256()
    for key, tensor, data in entries:
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        for _ in range(0, len(data), _PIECE):
            digest.update(next(digests))
    return _PIECED + digest.hexdigest()


def _whole_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The checksum of files saved before `_checksum`'s pieces: one SHA-256 over every name, dtype, shape
    and byte (still checked on load)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(f"{key}|{tensors[key].dtype}|{tuple(tensors[key].shape)}|".encode())
        digest.update(_bytes_of(tensors[key]))
    return digest.hexdigest()


def split_bytes(data: bytes | memoryview, size: int) -> list[memoryview]:
    """`data` in pieces of `size` bytes (the last one shorter), as views."""
    view = memoryview(data)
    return [view[i : i + size] for i in range(0, len(view), size)]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _sha256(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


# --- load -----------------------------------------------------------------------------------------


def load(path: str | os.PathLike, *, strict_checksum: bool = True) -> DagModule:
    """Rebuild a DagModule saved by `save`. Any malformed input raises `LoadError` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    with path.open("rb") as f:
        start = f.read(8)
        if len(start) == 8:
            start += f.read(min(struct.unpack("<Q", start)[0], _MAX_HEADER))
    header = _read_header(start, path.stat().st_size, str(path))
    graph = _read_graph(str(path), header)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            # clone: fresh, allocator-aligned memory, so kernels take the same paths as before saving
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors reports what it could not read with its own error type
        raise LoadError(f"{path}: weights are unreadable ({type(e).__name__}: {e})") from None
    return _checked_build(graph, tensors, str(path), strict_checksum)


def loads(
    data: bytes | bytearray | memoryview, *, where: str = "<bytes>", strict_checksum: bool = True
) -> DagModule:
    """`load` from the bytes of a `.dag` file."""
    header, views = tensor_views(bytearray(data) if isinstance(data, bytes) else data, where)
    graph = _read_graph(where, header)
    return _checked_build(graph, {key: t.clone() for key, t in views.items()}, where, strict_checksum)


def _checked_build(
    graph: dict[str, Any], tensors: dict[str, torch.Tensor], where: str, strict_checksum: bool
) -> DagModule:
    expected = graph.get("checksum")
    check = _checksum if not isinstance(expected, str) or expected.startswith(_PIECED) else _whole_checksum
    if strict_checksum and check(tensors) != expected:
        raise LoadError(f"{where}: weight checksum mismatch: the file is corrupted or was modified")
    return build(graph, tensors, where)


def build(graph: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> DagModule:
    """A DagModule from a checked graph JSON and its tensors (as `graph_and_tensors` gives them)."""
    return _finish(_build_dag(graph, depth=0), graph, tensors, where)


def _finish(dag: DagModule, graph: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> DagModule:
    """Give a freshly built DAG its tensors and train/eval flags, and check it."""
    _load_weights(dag, tensors, graph, where)
    _restore_training_flags(dag, graph)
    try:
        verify(dag)
    except VerifyError as e:
        raise LoadError(f"{where}: {e}") from None
    return dag


def rebuild(
    dag: DagModule, graph: dict[str, Any], changed: set[str], tensors: dict[str, torch.Tensor], where: str
) -> DagModule:
    """A DagModule for `graph` (the JSON of `dag` with the entries of the vertices `changed` edited) and
    its `tensors`, built like `build` but reusing `dag`'s other modules (copies of them, so `dag` is
    untouched): the cheap way to move between graphs that differ in a few vertices."""
    _expect(type(dag) is DagModule, f"{where}: rebuild takes a plain DagModule")
    entries = _vertex_entries(graph, dag, where)
    vertices: list[Vertex] = []
    by_name: dict[str, Vertex] = {}
    for index, (entry, old) in enumerate(zip(entries, dag)):
        if entry["name"] in changed or "same_module_as" in entry:
            vertex = _build_vertex(entry, index, by_name, depth=0)
        else:
            vertex = Vertex(old.name, _shallow_copy(old.module), old.args, dict(old.kwargs), dict(old.meta))
        by_name[vertex.name] = vertex
        vertices.append(vertex)
    try:
        moved = DagModule(dag.input_names, vertices, dag.output, dag.input_meta)
    except DagError as e:
        raise LoadError(f"{where}: {e}") from None
    return _finish(moved, graph, tensors, where)


def update_in_place(
    dag: DagModule, graph: dict[str, Any], changed: set[str], tensors: dict[str, torch.Tensor], where: str
) -> None:
    """Move `dag` itself to `graph` (its JSON with the entries of the vertices `changed` edited) and
    `tensors`. When the edits keep every vertex's op and inputs (new widths, say) and touch no shared or
    nested module, only the changed vertices are rebuilt; otherwise `dag` takes over a `rebuild`.
    Everything is built and checked before `dag` is touched: on an error it stays as it was."""
    _expect(type(dag) is DagModule, f"{where}: update_in_place takes a plain DagModule")
    entries = _vertex_entries(graph, dag, where)
    vertices: dict[str, Vertex] = {}
    for index, (entry, old) in enumerate(zip(entries, dag)):
        if entry["name"] not in changed and "same_module_as" not in entry:
            continue
        vertex = None if "same_module_as" in entry else _build_vertex(entry, index, {}, depth=0)
        if (
            vertex is None
            or is_dag_module(vertex.module)
            or is_dag_module(old.module)
            or vertex.op != old.op
            or vertex.predecessors != old.predecessors
        ):
            moved = rebuild(dag, graph, changed, tensors, where)
            dag.__dict__.clear()
            dag.__dict__.update(moved.__dict__)
            return
        problem = arity_problem(vertex)
        _expect(problem is None, f"{where}: vertex {vertex.name!r} (op {vertex.op}): {problem}")
        vertices[vertex.name] = vertex
    expected = {
        f"vertex_modules.{v.name}.{key}": value
        for v in dag
        for key, value in vertices.get(v.name, v).module.state_dict(keep_vars=True).items()
    }
    weights = _weights(expected, tensors, graph, where)
    dag.replace_vertices(list(vertices.values()))
    for key, tensor in weights.items():
        _assign(dag, key, tensor)
    training = graph.get("training") is True
    if dag.training != training:
        _restore_training_flags(dag, graph)
        return
    flags = {entry["name"]: entry.get("training") for entry in entries if entry["name"] in vertices}
    for name, vertex in vertices.items():  # the others keep their modes
        flag = flags[name]
        vertex.module.train(flag if isinstance(flag, bool) else training)


def _vertex_entries(graph: dict[str, Any], dag: DagModule, where: str) -> list[dict[str, Any]]:
    """The graph's vertex entries, checked to be objects naming `dag`'s vertices in order."""
    entries = graph.get("vertices")
    if not (
        isinstance(entries, list)
        and [e.get("name") if isinstance(e, dict) else None for e in entries] == [v.name for v in dag]
    ):
        raise LoadError(f"{where}: the graph must have the model's vertices, in order")
    return entries


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose tensors can be reassigned without touching the original's (a nested
    DagModule, whose vertices name its modules, is copied whole)."""
    return copy.deepcopy(module) if is_dag_module(module) else clone_module(module)


_ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def tensor_views(data: bytearray | memoryview, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked header of safetensors bytes and its tensors as views into `data` (no copy: the caller
    keeps `data` alive and clones what it keeps)."""
    header = _read_header(data, len(data), where)
    start = 8 + struct.unpack("<Q", data[:8])[0]
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise LoadError(f"{where}: tensor {key!r} has a dtype torch_dag does not read ({info['dtype']})")
        begin, end = info["data_offsets"]
        flat = (
            torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=start + begin)
            if end > begin
            else torch.empty(0, dtype=torch.uint8)
        )
        tensors[key] = (
            flat.view(dtype).reshape(info["shape"])
            if flat.numel()
            else torch.empty(info["shape"], dtype=dtype)
        )
    return header, tensors


def _read_header(start: bytes | bytearray | memoryview, size: int, where: str) -> dict[str, Any]:
    """Read and check the safetensors header ourselves (from the file's first bytes, `start`, and its
    `size`), so no malformed file reaches the parser."""
    if len(start) < 8:
        raise LoadError(f"{where}: file is truncated ({size} bytes)")
    (header_len,) = struct.unpack("<Q", start[:8])
    if header_len > min(_MAX_HEADER, size - 8):
        raise LoadError(f"{where}: header length {header_len} exceeds the file; truncated or not a DAG")
    raw = bytes(start[8 : 8 + header_len])
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise LoadError(f"{where}: header is not valid JSON ({type(e).__name__})") from None
    _expect(isinstance(header, dict), f"{where}: header must be a JSON object")
    data_size = size - 8 - header_len
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in _ITEM_SIZES
            and isinstance(info.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(type(o) is int for o in info["data_offsets"])
        )
        _expect(ok, f"{where}: malformed entry for tensor {key!r} in the header")
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        _expect(
            0 <= begin <= end <= data_size and end - begin == numel * _ITEM_SIZES[info["dtype"]],
            f"{where}: tensor {key!r} lies outside the file or has the wrong size; the file is truncated",
        )
        spans.append((begin, end))
    spans.sort()
    _expect(all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), f"{where}: tensors overlap in the file")
    return header


def _read_graph(where: str, header: dict[str, Any]) -> dict[str, Any]:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get(_FORMAT), str):
        raise LoadError(f"{where}: not a torch_dag file (no graph in the safetensors metadata)")
    try:
        graph = json.loads(metadata[_FORMAT])
    except (ValueError, RecursionError) as e:
        raise LoadError(f"{where}: graph metadata is not valid JSON ({type(e).__name__})") from None
    if not isinstance(graph, dict) or graph.get("format") != _FORMAT:
        raise LoadError(f"{where}: not a torch_dag file")
    version = graph.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LoadError(
            f"{where}: schema version {version!r} is not supported (this torch_dag reads "
            f"{SCHEMA_VERSION}); upgrade torch_dag or re-save the model"
        )
    return graph


def _restore_training_flags(dag: DagModule, graph: dict[str, Any]) -> None:
    """Train/eval as saved: the DAG's flag, then vertices saved in the other mode (a frozen BN, say)."""
    dag.train(graph.get("training") is True)
    entries = {e.get("name"): e for e in graph.get("vertices", []) if isinstance(e, dict)}
    for vertex in dag:
        flag = entries.get(vertex.name, {}).get("training")
        if isinstance(flag, bool):
            vertex.module.train(flag)
        if is_dag_module(vertex.module) and isinstance(entries.get(vertex.name, {}).get("config"), dict):
            _restore_training_flags(
                vertex.module, {"training": vertex.module.training, **entries[vertex.name]["config"]}
            )


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise LoadError(message)


def _build_dag(graph: Any, depth: int) -> DagModule:
    _expect(depth <= _MAX_DEPTH, f"DAGs nested more than {_MAX_DEPTH} levels deep")
    _expect(isinstance(graph, dict), "graph must be an object")
    inputs, entries = graph.get("inputs"), graph.get("vertices")
    _expect(
        isinstance(inputs, list)
        and all(is_valid_vertex_name(n) for n in inputs)
        and len(set(inputs)) == len(inputs),
        f"inputs must be a list of distinct identifiers, got {str(inputs)[:80]}",
    )
    _expect(isinstance(entries, list), "vertices must be a list")
    vertices: list[Vertex] = []
    by_name: dict[str, Vertex] = {}
    for index, entry in enumerate(entries):
        vertex = _build_vertex(entry, index, by_name, depth)
        _expect(
            vertex.name not in by_name and vertex.name not in inputs,
            f"vertex name {vertex.name!r} is used twice",
        )
        by_name[vertex.name] = vertex
        vertices.append(vertex)
    output = from_json(graph.get("output"))
    input_meta = graph.get("input_meta", {})
    _expect(
        isinstance(input_meta, dict) and all(isinstance(v, dict) for v in input_meta.values()),
        "input_meta must map input names to objects",
    )
    try:
        for key, (_, _, build_) in EXTENSION_DAGS.items():
            if key in graph:
                return build_(graph[key], inputs, vertices, output, input_meta)
        return DagModule(inputs, vertices, output, input_meta)
    except DagError as e:
        raise LoadError(str(e)) from None


def _build_vertex(entry: Any, index: int, by_name: dict[str, Vertex], depth: int) -> Vertex:
    _expect(isinstance(entry, dict), f"vertex #{index} must be an object")
    name, op = entry.get("name"), entry.get("op")
    _expect(is_valid_vertex_name(name), f"vertex #{index} has an invalid name {str(name)[:40]!r}")
    _expect(isinstance(op, str), f"vertex {name!r} has no op name")
    where = f"vertex {name!r} (op {op})"
    args, kwargs = from_json(entry.get("args", [])), entry.get("kwargs", {})
    _expect(isinstance(args, list), f"{where}: args must be a list")
    _expect(
        isinstance(kwargs, dict) and all(isinstance(k, str) and k.isidentifier() for k in kwargs),
        f"{where}: kwargs must map identifiers to values",
    )
    kwargs = {k: from_json(v) for k, v in kwargs.items()}
    meta = entry.get("meta", {})
    _expect(isinstance(meta, dict), f"{where}: meta must be an object")
    if "same_module_as" in entry:
        other = by_name.get(entry["same_module_as"]) if isinstance(entry["same_module_as"], str) else None
        if other is None:
            raise LoadError(f"{where}: same_module_as names no earlier vertex")
        _expect(other.op == op, f"{where}: shares the module of {other.name!r}, whose op is {other.op}")
        module = other.module
    else:
        module = _build_module(op, entry.get("config"), where, depth)
        _set_dtypes(module, entry.get("dtypes", {}), where)
    return Vertex(name, module, tuple(args), kwargs, dict(meta))


def _set_dtypes(module: nn.Module, dtypes: Any, where: str) -> None:
    _expect(isinstance(dtypes, dict), f"{where}: dtypes must be an object")
    if not dtypes:
        return
    state = module.state_dict(keep_vars=True)
    for key, name in dtypes.items():
        _expect(key in state, f"{where}: dtypes names {key!r}, which the module does not have")
        dtype = DTYPES.get(name) if isinstance(name, str) else None
        _expect(dtype is not None, f"{where}: unknown dtype {name!r}")
        owner_path, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_path)
        tensor = state[key].to(dtype)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        else:
            owner._buffers[attr] = tensor


def _build_module(op: str, config: Any, where: str, depth: int) -> nn.Module:
    if op == "DagModule":
        return _build_dag(config, depth + 1)
    if op in CUSTOM_OPS:
        return CUSTOM_OPS[op].from_config(config, where)
    if op in FUNCTIONS:
        _expect(config is None, f"{where}: a function op takes no config")
        return FunctionOp(op)
    try:
        spec = module_op_spec(op)
    except UnknownOpError as e:
        raise LoadError(f"{where}: {e}") from None
    _expect(isinstance(config, dict), f"{where}: config must be an object")
    allowed = spec.param_names
    unknown = sorted(set(config) - allowed)
    _expect(not unknown, f"{where}: unknown config keys {unknown}; {op} takes {sorted(allowed)}")
    values = {k: from_json(v) for k, v in config.items()}
    try:
        module = spec.build(values)
    except Exception as e:  # the constructor rejected the values: say which vertex and why
        raise LoadError(f"{where}: cannot build from config {config}: {type(e).__name__}: {e}") from None
    _expect(op_name(module) == op, f"{where}: config built a {type(module).__name__}")
    return module


def _load_weights(dag: DagModule, tensors: dict[str, torch.Tensor], graph: dict[str, Any], path: str) -> None:
    for key, tensor in _weights(dag.state_dict(keep_vars=True), tensors, graph, path).items():
        _assign(dag, key, tensor)


def _weights(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], graph: dict[str, Any], path: str
) -> dict[str, torch.Tensor]:
    """The tensor (a Parameter where `expected` has one) for each state key of a model whose state is
    shaped like `expected`, from the stored `tensors` and the graph's ties and frozen keys, all checked."""
    tied, frozen = graph.get("tied", {}), graph.get("frozen", [])
    _expect(
        isinstance(tied, dict) and all(isinstance(v, str) and v in tensors for v in tied.values()),
        f"{path}: 'tied' must map names to stored tensors",
    )
    _expect(isinstance(frozen, list) and all(isinstance(k, str) for k in frozen), f"{path}: bad 'frozen'")
    stored = set(tensors) | set(tied)
    missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
    _expect(not missing, f"{path}: weights missing for {missing[:5]}")
    _expect(not unexpected, f"{path}: unexpected weights {unexpected[:5]}")
    for key, like in expected.items():
        source = tied.get(key, key)
        tensor = tensors[source]
        _expect(
            tensor.shape == like.shape and tensor.dtype == like.dtype,
            f"{path}: {key} is stored as {tuple(tensor.shape)} {tensor.dtype}, "
            f"the graph needs {tuple(like.shape)} {like.dtype}",
        )
        _expect(
            isinstance(like, nn.Parameter) == isinstance(expected.get(source), nn.Parameter),
            f"{path}: {key} is tied to {source!r}, but one is a parameter and the other a buffer",
        )
    objects: dict[str, torch.Tensor] = {}
    for key, like in expected.items():
        source = tied.get(key, key)
        if source not in objects:
            tensor = tensors[source]
            if isinstance(like, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=key not in frozen and like.requires_grad)
            objects[source] = tensor
        objects[key] = objects[source]
    return {key: objects[key] for key in expected}


def _assign(dag: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = key.rpartition(".")
    module = dag.get_submodule(module_path)
    if isinstance(tensor, nn.Parameter):
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor
