"""Writing a `.dag` file: the graph JSON and the state dict (each shared tensor once), written atomically."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..core.dag import DagModule
from ..core.errors import DagError
from ..core.ops import CUSTOM_OPS, FunctionOp, is_dag_module, module_op_spec
from ..core.template import to_json
from ..core.verify import verify
from .checksum import checksum
from .schema import DIGEST, EXTENSION_DAGS, FORMAT, SCHEMA_VERSION, graph_digest


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
    graph["checksum"] = checksum(tensors)
    graph_json = json.dumps(graph, separators=(",", ":"), allow_nan=False)
    metadata = {FORMAT: graph_json, DIGEST: graph_digest(graph_json)}
    return safetensors.torch.save(tensors, metadata=metadata)


def graph_and_tensors(dag: DagModule) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The graph JSON of `dag` (without checksum) and its tensors, each shared tensor once."""
    if not is_dag_module(dag):
        raise TypeError(f"td.save expects a DagModule, got {type(dag).__name__}")
    verify(dag)
    tensors, tied, frozen = _unique_tensors(dag)
    graph = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        **_graph_json(dag),
        "training": dag.training,
        "tied": tied,
        "frozen": frozen,
    }
    return graph, tensors


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a crash never leaves it half-written: a temporary file, synced, renamed. The
    temporary file is `.<name>.torch_dag-tmp-<pid>-<random>`, removed on any error seen here; one left
    by a killed save (its process gone) is removed by the next save to the same path."""
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP}{os.getpid()}-", dir=path.parent)
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
        with contextlib.suppress(FileNotFoundError):  # renamed into place, or removed here on an error
            os.unlink(tmp)


_TMP = ".torch_dag-tmp-"


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of saves to `path` whose process is no longer running (a save killed
    midway); only names of the pattern `write_atomic` uses are touched. Returns what was removed."""
    pattern = re.compile(re.escape(f".{path.name}{_TMP}") + r"(\d+)-[A-Za-z0-9_]+")
    removed: list[Path] = []
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}{_TMP}*"))
    except OSError:
        return removed
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match is None or _alive(int(match.group(1))) or not candidate.is_file():
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # perhaps another thread of ours is saving
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or no way to tell: keep the file
    return True


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
