"""`measure_latency` / `compare_latency`: the one way the project times a model.

Each model runs in eval mode under `torch.inference_mode()` on its own copy when a device or dtype is
asked for (the caller's model is never moved), after warm-up calls; CUDA is synchronised around every
timed call; the garbage collector is paused while timing (as `timeit` does). Several models are timed
in interleaved rounds (A B C, then C B A, ...) so that drift of the machine hits all alike, and a ratio
is the median of the per-round ratios. Every figure states the batch, dtype, device and threads, and the
page faults per call: memory the allocator gave back to the system and takes again on every call.

That last one matters on Linux: glibc's malloc returns large freed blocks to the kernel, so a CPU model
whose activations are tens of megabytes (a CNN at batch 32) faults every page of them in afresh on every
call. On this project's machine that is half of mobilenetv3_large_100's time at batch 32 (about 200,000
faults, 0.5 s against 0.25 s without), and the part that varies most between runs. `steady_allocator()`
keeps freed memory in the process (as `MALLOC_TRIM_THRESHOLD_` / `MALLOC_MMAP_THRESHOLD_` or a preloaded
jemalloc / tcmalloc do in deployment); timings warn when faults dominate and it is not on.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import gc
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..core.errors import DagError

try:
    import resource
except ImportError:  # not a POSIX system: no page-fault counts
    resource = None  # type: ignore[assignment]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SECONDS = 1.0  # timed seconds per model when `runs` is not given
MIN_RUNS, MAX_RUNS = 5, 200
MANY_FAULTS = 4096  # page faults per call (16 MiB of 4 KiB pages) above which a timing warns
_steady = False  # whether `steady_allocator` took effect in this process


@dataclass(frozen=True)
class Latency:
    """Milliseconds per call of one model: median and quartiles over `runs` timed calls."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int
    batch_size: int | None
    dtype: str
    device: str
    threads: int
    times_ms: tuple[float, ...] = field(repr=False, default=())
    page_faults: int | None = None  # median minor page faults per call (None: not countable here)

    @property
    def spread(self) -> float:
        """The interquartile range over the median: 0.02 means the middle half of the runs lie in 2 %."""
        return (self.p75_ms - self.p25_ms) / self.median_ms if self.median_ms else 0.0

    def __str__(self) -> str:
        batch = "" if self.batch_size is None else f"batch {self.batch_size}, "
        faults = f", {self.page_faults} page faults per call" if self.page_faults else ""
        return (
            f"{self.median_ms:.3f} ms (quartiles {self.p25_ms:.3f}-{self.p75_ms:.3f}, {self.runs} runs, "
            f"{batch}{self.dtype}, {self.device}, {self.threads} threads{faults})"
        )


@dataclass(frozen=True)
class LatencyComparison:
    """Several models timed in the same interleaved rounds."""

    latencies: dict[str, Latency]

    def ratio(self, model: str, reference: str) -> float:
        """Median over rounds of `model`'s time over `reference`'s (the pairs ran side by side)."""
        pairs = zip(self.latencies[model].times_ms, self.latencies[reference].times_ms)
        return statistics.median(a / b for a, b in pairs)

    def table(self, reference: str | None = None) -> str:
        """One line per model; with `reference`, each model's ratio to it."""
        lines = []
        for name, latency in self.latencies.items():
            ratio = f"  x{self.ratio(name, reference):.3f}" if reference and name != reference else ""
            lines.append(f"{name:>24s}  {latency}{ratio}")
        return "\n".join(lines)


def measure_latency(
    model: nn.Module | Callable,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    dtype: str | torch.dtype | None = None,
    runs: int | None = None,
    warmup: int = 3,
    threads: int | None = None,
) -> Latency:
    """Time `model` on `example_inputs` (a DAG's own recorded input shapes when omitted): `warmup`
    untimed calls (0 for a model already warm at these inputs), then `runs` timed calls (by default as
    many as fill about a second, 5 to 200); median and quartiles.
    `batch_size` repeats the inputs' examples along dim 0 to that batch; `dtype` casts the model's
    floating-point weights and inputs (a copy: the model given is never changed); `threads` sets torch's
    CPU threads while timing (the count is stated in the result either way)."""
    return compare_latency(
        {"model": model},
        example_inputs,
        device=device,
        batch_size=batch_size,
        dtype=dtype,
        runs=runs,
        warmup=warmup,
        threads=threads,
    ).latencies["model"]


def compare_latency(
    models: Mapping[str, nn.Module | Callable],
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    dtype: str | torch.dtype | None = None,
    runs: int | None = None,
    warmup: int = 3,
    threads: int | None = None,
) -> LatencyComparison:
    """Time several models in interleaved rounds on the same inputs (see `measure_latency`);
    `.ratio(a, b)` is the median of the per-round ratios, `.table(reference)` prints them."""
    if not models:
        raise DagError("compare_latency needs at least one model")
    device = torch.device(device)
    cast_to = as_dtype(dtype)
    inputs = prepared_inputs(next(iter(models.values())), example_inputs, batch_size, device, cast_to)
    with _threads(threads), contextlib.ExitStack() as stack:
        calls = {name: _ready(m, device, cast_to, stack) for name, m in models.items()}
        sync = synchronizer(device)
        for call in calls.values():
            _warm(call, inputs, sync, warmup)
        count = runs or _runs_to_fill(calls, inputs, sync)
        times, faults = _interleaved(calls, inputs, sync, count)
        context = dict(
            batch_size=batch_size,
            dtype=str(cast_to or _model_dtype(next(iter(models.values())))).removeprefix("torch."),
            device=device_name(device),
            threads=torch.get_num_threads(),
        )
    latencies = {name: _summary(ns, faults[name], **context) for name, ns in times.items()}
    warn_about_faults(max((lat.page_faults or 0) for lat in latencies.values()))
    return LatencyComparison(latencies)


def steady_allocator() -> bool:
    """Keep freed memory in this process instead of returning it to the system, so that a model's
    activations are not faulted in afresh on every call: glibc's `mallopt` with the trim and mmap
    thresholds at 2 GiB, the effect of `MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_MMAP_THRESHOLD_=2147483647`
    in the environment. For the rest of the process, for every allocation (it cannot be undone: glibc's
    adaptive thresholds stay off); memory once used by the largest call stays held. True when it took
    effect, False where the C library is not glibc (use jemalloc or tcmalloc there, or nothing: macOS
    and Windows allocators keep memory already)."""
    global _steady
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None or platform.libc_ver()[0] != "glibc":
        return False
    most = ctypes.c_int(2**31 - 1)
    _steady = bool(mallopt(-1, most)) and bool(mallopt(-3, most))  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
    return _steady


def steady_allocator_on() -> bool:
    """Whether `steady_allocator` took effect in this process."""
    return _steady


def warn_about_faults(faults_per_call: int | None) -> None:
    """Warn when calls fault in more than `MANY_FAULTS` pages each and `steady_allocator` is not on."""
    if faults_per_call is None or faults_per_call < MANY_FAULTS or _steady:
        return
    warnings.warn(
        f"each call faulted {faults_per_call} memory pages in afresh (about {faults_per_call * 4 >> 10} "
        "MiB): the memory allocator returns freed activations to the system between calls, which can be "
        "half of a CPU model's time and varies from run to run. For steadier (and deployment-like) "
        "timings call torch_dag.steady_allocator() first, or set MALLOC_TRIM_THRESHOLD_=2147483647 "
        "MALLOC_MMAP_THRESHOLD_=2147483647 in the environment, or preload jemalloc / tcmalloc",
        stacklevel=3,
    )


def page_faults() -> int | None:
    """Minor page faults of this process so far (None where they cannot be counted)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DagError(f"unknown dtype {dtype!r}: give one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@cache
def device_name(device: torch.device) -> str:
    """A readable name of the device: the GPU's, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu: " + line.split(":", 1)[1].strip()
        return "cpu: " + (platform.processor() or platform.machine())
    return str(device)


def resized(inputs: tuple, batch_size: int | None) -> tuple:
    """`inputs` with every tensor's examples (dim 0) repeated cyclically to `batch_size`."""
    if batch_size is None:
        return inputs
    if batch_size < 1:
        raise DagError(f"batch_size must be at least 1, got {batch_size}")

    def resize(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        return x[torch.arange(batch_size) % x.shape[0]]

    return pytree.tree_map(resize, inputs)


def prepared_inputs(
    model: Any, example_inputs: Any, batch_size: int | None, device: torch.device, dtype: torch.dtype | None
) -> tuple:
    """The inputs a timing runs on: `example_inputs` (or a DAG's own) at `batch_size`, on `device`, floats
    in `dtype`."""
    if example_inputs is None:
        if not hasattr(model, "example_inputs"):
            raise DagError("give example_inputs: only a DagModule knows its own input shapes")
        example_inputs = model.example_inputs()
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return x.to(device, dtype if dtype is not None and x.is_floating_point() else None)

    return pytree.tree_map(move, resized(inputs, batch_size))


def _ready(
    model: Any, device: torch.device, dtype: torch.dtype | None, stack: contextlib.ExitStack
) -> Callable:
    """The model as it will be timed: on `device` in `dtype` (a copy when either differs), in eval mode
    (restored afterwards)."""
    if not isinstance(model, nn.Module):
        return model
    tensors = [*model.parameters(), *model.buffers()]
    moved = any(t.device != device for t in tensors) or (
        dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors)
    )
    if moved:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    if model.training:
        model.eval()
        stack.callback(model.train)
    return model


def _model_dtype(model: Any) -> torch.dtype:
    floats = (
        [p.dtype for p in model.parameters() if p.is_floating_point()] if isinstance(model, nn.Module) else []
    )
    return floats[0] if floats else torch.get_default_dtype()


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work (nothing on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def _call(model: Callable, inputs: tuple, sync: Callable[[], None]) -> int:
    """Nanoseconds of one call, the device synchronised before and after."""
    sync()
    start = time.perf_counter_ns()
    model(*inputs)
    sync()
    return time.perf_counter_ns() - start


def _warm(model: Callable, inputs: tuple, sync: Callable[[], None], warmup: int) -> None:
    with torch.inference_mode():
        for _ in range(warmup):
            _call(model, inputs, sync)


def _runs_to_fill(calls: dict[str, Callable], inputs: tuple, sync: Callable[[], None]) -> int:
    """Enough rounds that each model is timed for about `DEFAULT_SECONDS`."""
    with torch.inference_mode():
        slowest = max(_call(call, inputs, sync) for call in calls.values()) / 1e9
    return max(MIN_RUNS, min(MAX_RUNS, round(DEFAULT_SECONDS / max(slowest, 1e-6))))


def _interleaved(
    calls: dict[str, Callable], inputs: tuple, sync: Callable[[], None], runs: int
) -> tuple[dict[str, list[int]], dict[str, int | None]]:
    """Nanoseconds of each call in interleaved rounds, and each model's median page faults per call."""
    names, times = list(calls), {name: list[int]() for name in calls}
    faults: dict[str, list[int]] = {name: [] for name in calls}
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for r in range(runs):
                for name in names if r % 2 == 0 else reversed(names):
                    before = page_faults()
                    times[name].append(_call(calls[name], inputs, sync))
                    if before is not None:
                        faults[name].append(page_faults() - before)  # type: ignore[operator]
    finally:
        gc.enable()
    return times, {name: int(statistics.median(f)) if f else None for name, f in faults.items()}


def _summary(ns: list[int], page_faults: int | None, **context: Any) -> Latency:
    ms = [t / 1e6 for t in ns]
    quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return Latency(
        statistics.median(ms),
        quartiles[0],
        quartiles[2],
        len(ms),
        times_ms=tuple(ms),
        page_faults=page_faults,
        **context,
    )


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
