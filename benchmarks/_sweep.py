"""A resumable sweep over model names: each model runs in its own forked subprocess with a timeout.

The parent imports torch, timm and torch_dag once and forks a child per model (cheap, isolated: a
crash, a hang or memory blow-up in one model cannot take the sweep down). Results are appended to a
CSV as they arrive, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def _child(fn: Callable[[str, Any], dict], name: str, stage: Any, conn: Any, threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        row = fn(name, stage)
    except BaseException as e:  # the parent records whatever killed the model
        row = {
            "status": "error",
            "error_class": type(e).__name__,
            "error": (str(e) or traceback.format_exc())[:300].replace("\n", " "),
        }
    conn.send(row)
    conn.close()


def sweep(
    names: Iterable[str],
    fn: Callable[[str, Any], dict],
    out: Path,
    fields: list[str],
    *,
    workers: int = 2,
    timeout: float = 300.0,
    retry: Callable[[dict], bool] | None = None,
    stages: list[str] | None = None,
    exclusive: Callable[[str], bool] = lambda name: False,
) -> dict[str, dict[str, str]]:
    """Run `fn(name, stage)` for every name not yet in `out` (or whose row `retry` accepts).

    `fn` sets `stage.value` to an index into `stages` as it goes, so a timeout says where it hung.
    Names for which `exclusive(name)` holds (very large models) run alone, to bound memory.
    """
    done = read_rows(out)
    if done and list(next(iter(done.values()))) != fields:  # columns added since: rewrite with them (empty)
        _write(out, fields, list(done.values()))
    todo = [n for n in names if n not in done or (retry is not None and retry(done[n]))]
    if retry is not None:  # rewrite the CSV without the rows that will be redone
        kept = [r for n, r in done.items() if n not in set(todo)]
        _write(out, fields, kept)
    ctx = mp.get_context("fork")
    running: list[tuple[str, Any, Any, Any, float]] = []
    queue = list(todo)
    bar = tqdm(total=len(todo), desc=out.stem, unit="model", dynamic_ncols=True)
    while queue or running:
        while queue and len(running) < workers:
            if running and (exclusive(queue[0]) or any(exclusive(r[0]) for r in running)):
                break
            name = queue.pop(0)
            stage = ctx.Value("i", 0)
            parent, child = ctx.Pipe(duplex=False)
            threads = workers if exclusive(name) else 1  # a model running alone gets every worker's core
            proc = ctx.Process(target=_child, args=(fn, name, stage, child, threads), daemon=True)
            proc.start()
            child.close()
            running.append((name, proc, parent, stage, time.monotonic()))
        time.sleep(0.05)
        for entry in list(running):
            name, proc, conn, stage, started = entry
            elapsed = time.monotonic() - started
            row = None
            if conn.poll():
                try:
                    row = conn.recv()
                except EOFError:
                    row = None
            if row is None and proc.is_alive() and elapsed < timeout:
                continue
            if row is None:
                where = stages[stage.value] if stages else str(stage.value)
                if proc.is_alive():
                    proc.kill()
                    row = {
                        "status": "timeout",
                        "error_class": "Timeout",
                        "error": f"over {timeout:.0f}s in stage {where}",
                    }
                else:
                    row = {
                        "status": "crashed",
                        "error_class": f"exit {proc.exitcode}",
                        "error": f"process died in stage {where} (likely out of memory)",
                    }
                row["stage"] = where
            proc.join(timeout=5)
            running.remove(entry)
            row = {"model": name, **row}
            _append(out, fields, row)
            done[name] = {k: str(v) for k, v in row.items()}
            bar.set_postfix_str(f"{name}: {row['status']}", refresh=False)
            bar.update(1)
    bar.close()
    return done


def _append(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _write(path: Path, fields: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
