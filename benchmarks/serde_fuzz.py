"""Fuzz `td.load` and the delta files with random damage; count what must never happen.

    python benchmarks/serde_fuzz.py --mutations 50000 --workers 2

Three kinds of mutation, in turn: random bytes of a small `.dag` (flips, digits, truncations, deletions,
favouring the header), signed edits of its graph JSON (re-signed, as a deliberate editor would: these
may load, as a valid edit), and random bytes of a small delta file. Recorded: silent differences (an
unsigned damage that loads and computes something else, or a delta file that moves to a different
model), exceptions other than `LoadError`, and the longest single load. Target: 0, 0, <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torch_dag as td
from torch_dag import flex as tf
from torch_dag.core.compare import bitwise_equal
from torch_dag.serde.format import dumps, loads
from torch_dag.serde.schema import graph_digest


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x))).mean((2, 3))
        return torch.softmax(self.fc(y) * 2.0, dim=-1)


def _setup(workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    dag = td.build_from_unstructured_module(Small().eval(), (x,))
    flex = tf.make_flexible(dag, [0.5, 1.0], (x,), config=tf.FlexConfig(round_to=1))
    delta = tf.FileDeltaManager.make_delta_file(workdir / "m.delta", flex).read_bytes()
    plains = []
    for level in range(flex.max_level() + 1):
        flex.set_level_use(level)
        plains.append({k: v.clone() for k, v in flex.make_base_copy().state_dict().items()})
    return {"x": x, "dag": dag, "raw": dumps(dag), "delta": delta, "plains": plains}


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    (length,) = struct.unpack("<Q", data[:8])
    for _ in range(rng.randint(1, 3)):
        if len(out) < 2:
            break
        where = rng.randint(8, 8 + length) if rng.random() < 0.7 else rng.randrange(len(out))
        where = min(where, len(out) - 1)
        kind = rng.choice(["flip", "digit", "truncate", "delete", "insert"])
        if kind == "flip":
            out[where] ^= 1 << rng.randrange(8)
        elif kind == "digit":
            out[where] = rng.choice(b'0123456789-.e"{}[],:')
        elif kind == "truncate":
            del out[max(where, 1) :]
        elif kind == "delete":
            del out[where : where + rng.randint(1, 8)]
        else:
            out[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(out)


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    options = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-(2**40), 2**40),
        lambda: rng.choice([0, 1, -1, 2, 10**9, 2**63]),
        lambda: rng.uniform(-1e3, 1e3),
        lambda: rng.choice(["", "x", "relu", "training", "$ref", "float32", "qint8", "Identity", "LSTM"]),
        lambda: {"$ref": rng.choice(["x", "conv", "act", "fc", "ghost"])},
        lambda: [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        lambda: {rng.choice(["a", "$tuple", "$ref", "shape"]): _json_value(rng, depth + 1)},
    ]
    return options[rng.randrange(len(options) if depth < 2 else 7)]()


def _mutate_graph(rng: random.Random, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    graph = json.loads(header["__metadata__"]["torch_dag"])
    for _ in range(rng.randint(1, 3)):
        paths = _paths(graph)[1:]
        path = rng.choice(paths)
        parent = graph
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.3:
            del parent[path[-1]]
        else:
            parent[path[-1]] = _json_value(rng)
    graph_json = json.dumps(graph)
    header["__metadata__"] = {"torch_dag": graph_json, "torch_dag.sha256": graph_digest(graph_json)}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + length :]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, (*prefix, index))
    return out


def _one(kind: str, rng: random.Random, ctx: dict[str, Any], workdir: Path) -> str:
    """'error', 'same', 'valid edit', or 'SILENT'."""
    if kind == "bytes":
        model = loads(_mutate_bytes(rng, ctx["raw"]))
        return "same" if bitwise_equal(model(ctx["x"]), ctx["dag"](ctx["x"])) else "SILENT"
    if kind == "graph":
        loads(_mutate_graph(rng, ctx["raw"]))
        return "valid edit"
    path = workdir / "f.delta"
    path.write_bytes(_mutate_bytes(rng, ctx["delta"]))
    with tf.file_delta_manager(path) as manager:
        for level in (0, 1, 0):
            state = manager.move_to(level).state_dict()
            want = ctx["plains"][level]
            if state.keys() != want.keys() or not all(torch.equal(state[k], v) for k, v in want.items()):
                return "SILENT"
    return "same"


def run_chunk(seed: int, count: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ctx = _setup(workdir)
        tally: dict[str, int] = {}
        others: list[str] = []
        slowest = 0.0
        for i in range(count):
            kind = ("bytes", "graph", "delta")[i % 3]
            rng = random.Random(seed * 1_000_003 + i)
            start = time.perf_counter()
            try:
                outcome = _one(kind, rng, ctx, workdir)
            except td.LoadError:
                outcome = "error"
            except Exception as e:  # what must never happen: recorded with its case
                outcome = "OTHER"
                others.append(f"{kind} seed={seed} i={i}: {type(e).__name__}: {str(e)[:200]}")
                if len(others) <= 3:
                    traceback.print_exc()
            slowest = max(slowest, time.perf_counter() - start)
            tally[f"{kind}:{outcome}"] = tally.get(f"{kind}:{outcome}", 0) + 1
    return {"tally": tally, "others": others, "slowest": slowest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2, choices=[1, 2])
    parser.add_argument("--chunk", type=int, default=2_500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chunks = [
        (args.seed + k, min(args.chunk, args.mutations - k * args.chunk))
        for k in range(0, -(-args.mutations // args.chunk))
    ]
    start = time.perf_counter()
    tally: dict[str, int] = {}
    others: list[str] = []
    slowest = 0.0
    with ProcessPoolExecutor(args.workers) as pool:
        for result in pool.map(run_chunk, *zip(*chunks)):
            for key, n in result["tally"].items():
                tally[key] = tally.get(key, 0) + n
            others += result["others"]
            slowest = max(slowest, result["slowest"])
    silent = sum(n for key, n in tally.items() if key.endswith("SILENT"))
    print(f"mutations: {sum(tally.values())} in {time.perf_counter() - start:.0f} s")
    for key in sorted(tally):
        print(f"  {key}: {tally[key]}")
    print(f"silent differences: {silent}")
    print(f"other exceptions: {len(others)}")
    for line in others[:20]:
        print(f"  {line}")
    print(f"slowest load: {slowest:.3f} s")


if __name__ == "__main__":
    main()
