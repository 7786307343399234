"""Flexible models and level deltas: sizes, `move_to` times against full loads, params/FLOPs per level.

    python benchmarks/flex_deltas.py                         # vit_base_patch16_224 and resnet50
    python benchmarks/flex_deltas.py --models resnet50 --repeats 3

Each model: timm, pretrained=False, default input size; `td.make_flexible(dag, levels)` (L2 ranking,
widths rounded to multiples of 8). Written to a temporary folder: the flexible model (`td.save`), each
level's plain model (`td.save` of `make_base_copy()`) and the delta file (starting level 0).

For every ordered pair of levels (a, b), median over repeats, files in the page cache:
  - move: a `file_delta_manager` at level a, the time of `move_to(b)` (reads, checks and applies every
    delta on the way, returns the plain model of level b);
  - read+copy: reading the same segments' bytes from the file and copying their tensors into tensors
    allocated beforehand (the floor for any file-based move);
  - full load: `td.load` of level b's plain `.dag` (which checks the SHA-256 of all its tensors), and
    the same load with `strict_checksum=False` (the checksum not computed).
Rows go to benchmarks/results/flex_levels.csv (per level) and flex_moves.csv (per pair).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import safetensors.torch
import timm
import torch

import torch_dag as td
from torch_dag import flex as tf

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["vit_base_patch16_224", "resnet50"]


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def read_and_copy(path: Path, names: list[str]) -> float:
    """Seconds to read the named segments of a delta file and copy their tensors into place."""
    with tf.file_delta_manager(path) as manager:
        entries = [manager.index["by_name"][n] for n in names]
        start = manager._data_start
    with open(path, "rb") as f:  # destinations first: only the read and the copy are timed
        places = []
        for entry in entries:
            f.seek(start + entry["offset"])
            places.append(
                {k: torch.empty_like(v) for k, v in safetensors.torch.load(f.read(entry["length"])).items()}
            )
        t0 = time.perf_counter()
        for entry, place in zip(entries, places):
            f.seek(start + entry["offset"])
            for key, tensor in safetensors.torch.load(f.read(entry["length"])).items():
                place[key].copy_(tensor)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--levels", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    level_rows, move_rows = [], []
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, *model.pretrained_cfg["input_size"])
        dag = td.build_from_unstructured_module(model, (x,))
        del model
        t0 = time.perf_counter()
        flex = tf.make_flexible(dag, args.levels, (x,))
        make_s = time.perf_counter() - t0
        full = td.count_flops(dag, x)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            td.save(flex, folder / "flex.dag")
            flex_bytes = tensor_bytes(flex)
            t0 = time.perf_counter()
            deltas = tf.FileDeltaManager.make_delta_file(folder / "levels.delta", flex, starting_level=0)
            delta_s = time.perf_counter() - t0
            file_bytes = deltas.stat().st_size
            for level in range(flex.max_level() + 1):
                flex.set_level_use(level)
                plain = flex.make_base_copy()
                td.save(plain, folder / f"level{level}.dag")
                count = td.count_flops(plain, x)
                level_rows.append(
                    {
                        "model": name,
                        "level": level,
                        "width": args.levels[level],
                        "params_m": round(count.total_params / 1e6, 3),
                        "gflops": round(count.total_flops / 1e9, 3),
                        "flops_ratio": round(count.total_flops / full.total_flops, 4),
                        "plain_mb": round(tensor_bytes(plain) / 1e6, 2),
                        "plain_file_mb": round((folder / f"level{level}.dag").stat().st_size / 1e6, 2),
                        "flex_weights_mb": round(flex_bytes / 1e6, 2),
                        "flex_file_mb": round((folder / "flex.dag").stat().st_size / 1e6, 2),
                        "delta_file_mb": round(file_bytes / 1e6, 2),
                        "overhead_pct": round(100 * (file_bytes / flex_bytes - 1), 3),
                        "make_flexible_s": round(make_s, 2),
                        "make_delta_file_s": round(delta_s, 2),
                    }
                )
            del plain
            levels = range(flex.max_level() + 1)
            for a in levels:
                for b in levels:
                    if a == b:
                        continue
                    moves, read = [], 0
                    for _ in range(args.repeats):
                        with tf.file_delta_manager(deltas) as manager:
                            manager.move_to(a)
                            before = manager.bytes_read
                            t0 = time.perf_counter()
                            manager.move_to(b)
                            moves.append(time.perf_counter() - t0)
                            read = manager.bytes_read - before
                    step = 1 if b > a else -1
                    names = [f"{'up' if step > 0 else 'down'}/{t}" for t in range(a + step, b + step, step)]
                    copies = [read_and_copy(deltas, names) for _ in range(args.repeats)]
                    loads, unchecked = [], []
                    for _ in range(args.repeats):
                        for strict, times in ((True, loads), (False, unchecked)):
                            t0 = time.perf_counter()
                            td.load(folder / f"level{b}.dag", strict_checksum=strict)
                            times.append(time.perf_counter() - t0)
                    move, copy, load, load_unchecked = (
                        statistics.median(v) for v in (moves, copies, loads, unchecked)
                    )
                    move_rows.append(
                        {
                            "model": name,
                            "source": a,
                            "target": b,
                            "neighbours": abs(a - b) == 1,
                            "read_mb": round(read / 1e6, 2),
                            "move_s": round(move, 4),
                            "read_copy_s": round(copy, 4),
                            "full_load_s": round(load, 4),
                            "unchecked_load_s": round(load_unchecked, 4),
                            "move_over_read_copy": round(move / copy, 2),
                            "load_over_move": round(load / move, 2),
                            "unchecked_load_over_move": round(load_unchecked / move, 2),
                            "repeats": args.repeats,
                            "threads": torch.get_num_threads(),
                        }
                    )
                    print(" ".join(f"{k}={v}" for k, v in move_rows[-1].items()), flush=True)
        del flex, dag
    RESULTS.mkdir(exist_ok=True)
    for rows, file in ((level_rows, "flex_levels.csv"), (move_rows, "flex_moves.csv")):
        with open(RESULTS / file, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(
        f"\n{'model':22s} {'level':>5s} {'params M':>9s} {'GFLOPs':>7s} {'ratio':>6s} {'plain MB':>9s} "
        f"{'flex MB':>8s} {'delta file MB':>14s} {'overhead':>9s}"
    )
    for r in level_rows:
        print(
            f"{r['model']:22s} {r['level']:5d} {r['params_m']:9.2f} {r['gflops']:7.2f} {r['flops_ratio']:6.3f} "
            f"{r['plain_mb']:9.2f} {r['flex_weights_mb']:8.2f} {r['delta_file_mb']:14.2f} "
            f"{r['overhead_pct']:8.3f}%"
        )
    print(
        f"\n{'model':22s} {'move':>6s} {'read MB':>8s} {'move s':>7s} {'read+copy s':>12s} {'load s':>7s} "
        f"{'unchecked':>10s} {'move/rc':>8s} {'load/move':>10s} {'unchecked/move':>15s}"
    )
    for r in move_rows:
        print(
            f"{r['model']:22s} {r['source']:>2d}->{r['target']:<2d} {r['read_mb']:8.2f} {r['move_s']:7.3f} "
            f"{r['read_copy_s']:12.3f} {r['full_load_s']:7.3f} {r['unchecked_load_s']:10.3f} "
            f"{r['move_over_read_copy']:8.2f} {r['load_over_move']:10.2f} {r['unchecked_load_over_move']:15.2f}"
        )
    print(f"\nwritten: {RESULTS / 'flex_levels.csv'}, {RESULTS / 'flex_moves.csv'}")


if __name__ == "__main__":
    main()
