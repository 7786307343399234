"""A resumable sweep over model names: each model runs in its own forked subprocess with a timeout.

The parent imports torch, timm and torch_dag once and forks a child per model (cheap, isolated: a
crash, a hang or memory blow-up in one model cannot take the sweep down). Results are appended to a
CSV as they arrive, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import re
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


class Stage:
    """What a child tells its parent while it runs: `value` (an index into the sweep's stages, so a
    timeout says where it hung) and `report(**fields)` (partial results, kept when the child later
    times out or dies)."""

    def __init__(self, value: Any, conn: Any):
        self._value, self._conn = value, conn

    @property
    def value(self) -> int:
        return self._value.value

    @value.setter
    def value(self, index: int) -> None:
        self._value.value = index

    def report(self, **fields: Any) -> None:
        self._conn.send(("partial", fields))


def _child(
    fn: Callable[[str, Any], dict], name: str, stage: Any, conn: Any, threads: int, quiet: bool
) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if (
        quiet
    ):  # what the model's libraries print (torch.export dumps whole graphs) would bury the progress bar
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    import torch

    torch.set_num_threads(threads)
    try:
        row = fn(name, Stage(stage, conn))
    except BaseException as e:  # the parent records whatever killed the model
        row = {
            "status": "error",
            "error_class": type(e).__name__,
            "error": (str(e) or traceback.format_exc())[:300].replace("\n", " "),
        }
    conn.send(("row", row))
    conn.close()


def _receive(conn: Any, partial: dict) -> dict | None:
    """Drain the child's messages: partial fields go into `partial`; the final row, once sent."""
    while conn.poll():
        try:
            kind, fields = conn.recv()
        except EOFError:
            return None
        if kind == "row":
            return fields
        partial.update(fields)
    return None


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
    quiet: bool = False,
) -> dict[str, dict[str, str]]:
    """Run `fn(name, stage)` for every name not yet in `out` (or whose row `retry` accepts).

    `fn` sets `stage.value` to an index into `stages` as it goes, so a timeout says where it hung, and
    may call `stage.report(**fields)`: fields already measured stay in the row of a model that then
    times out or crashes.
    Names for which `exclusive(name)` holds (very large models) run alone, to bound memory. With
    `quiet`, what a child prints goes nowhere (its error still reaches the row).
    """
    done = read_rows(out)
    if done and list(next(iter(done.values()))) != fields:  # columns added since: rewrite with them (empty)
        _write(out, fields, list(done.values()))
    todo = [n for n in names if n not in done or (retry is not None and retry(done[n]))]
    if retry is not None:  # rewrite the CSV without the rows that will be redone
        kept = [r for n, r in done.items() if n not in set(todo)]
        _write(out, fields, kept)
    ctx = mp.get_context("fork")
    running: list[tuple[str, Any, Any, Any, float, dict]] = []
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
            proc = ctx.Process(target=_child, args=(fn, name, stage, child, threads, quiet), daemon=True)
            proc.start()
            child.close()
            running.append((name, proc, parent, stage, time.monotonic(), {}))
        time.sleep(0.05)
        for entry in list(running):
            row = _outcome(entry, timeout, stages)
            if row is None:
                continue
            running.remove(entry)
            _append(out, fields, row)
            done[row["model"]] = {k: str(v) for k, v in row.items()}
            bar.set_postfix_str(f"{row['model']}: {row['status']}", refresh=False)
            bar.update(1)
    bar.close()
    return done


def _outcome(entry: tuple, timeout: float, stages: list[str] | None) -> dict | None:
    """The row of a model once it has finished, run past `timeout` (then killed) or died; None while it
    still runs. Partial fields it reported stay in the row."""
    name, proc, conn, stage, started, partial = entry
    row = _receive(conn, partial)
    if row is None and proc.is_alive() and time.monotonic() - started < timeout:
        return None
    if row is None and not proc.is_alive():  # it may have sent its row just before exiting
        row = _receive(conn, partial)
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
    return {"model": name, **partial, **row}


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


def attempt(row: dict, part: str, fn: Any) -> Any:
    """Run one stage of a model's row; on failure record `<part>_status` error, its class and message."""
    try:
        return fn()
    except Exception as e:
        message = " ".join(str(e).split())[:500]
        row.update(
            {f"{part}_status": "error", f"{part}_error_class": type(e).__name__, f"{part}_error": message}
        )
        return None


def cause(row: dict, part: str) -> str:
    """A stage's failure cause for grouping: the error class and the message with names and numbers
    blanked, an off-target ratio, or the checks that came out False."""
    status = row.get(f"{part}_status") or f"not run ({row.get('status')}: {row.get('error_class')})"
    if status == "error":
        message = re.sub(r"'[^']*'|\d+", "_", row.get(f"{part}_error", ""))[:90]
        return f"{row.get(f'{part}_error_class', '')}: {message}"
    if status == "off_target":
        return f"off target (flops ratio {row.get('flops_ratio')})"
    if status == "mismatch":
        checks = [k for k in row if k.startswith(f"{part}_") and row[k] in ("False", False)]
        return f"mismatch ({', '.join(checks)})"
    return status
