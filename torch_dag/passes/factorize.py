"""`factorize`: replace Linear and Conv2d vertices by low-rank pairs where that cuts multiply-adds.

Each layer's weight W (out x d, with d = in x kh x kw for a conv) becomes M = U_r U_r^T W, where U_r
holds the top r left singular vectors of W L and L L^T = C is a second moment of the layer's inputs:

- without data C = I, and M is the truncated SVD of W: the best rank-r approximation of the weight;
- with calibration batches, C is fitted on part of them (`prepare.split_calibration`: every 4th batch,
  or a quarter of one batch, is held out): the mean X^T X of the layer's real inputs (a conv's k x k
  patches), shrunk towards the identity by d / (d + rows) (both scaled to the same output energy), so
  that a moment of few rows, exact on them and arbitrary elsewhere, leans on the weights. Unshrunk, M
  would be the exact minimiser of ||W X - M X||_F over rank-r matrices on the fitting rows.

Every rank's error is then measured on the held-out rows (the energy of W X_held outside span U_r), for
this solution and for the truncated SVD, and each rank takes the one with less: the errors that drive
the allocation, and the report's, are held-out errors, and the data-aware result is never worse than the
SVD on them. A layer with fewer fitting rows than `MIN_ROWS_PER_INPUT` x d gets the SVD, with a warning
saying how many batches would do. Layers producing the model's outputs are protected by default.

U_r are the top eigenvectors of W C W^T, the second moment of the layer's outputs (bias removed), so
where out <= d that moment is what calibration records (from the layer's own outputs: no extra
matmul); where d < out it records C and works on the d x d side through C's Cholesky factor. The factors
are U_r (out x r) and U_r^T W (r x d), rebalanced to equal norms. The error curves give every rank's
error at once, so a global FLOPs (or params) target is met by a Lagrangian allocation: each layer takes
the rank minimising error + mu * cost, with mu bisected until the target holds (least total error, not
one uniform ratio), then any slack goes back as rank where it removes the most error. A layer is
factorized only below its break-even rank, where the pair has fewer multiply-adds than the layer it
replaces.

Fewer multiply-adds need not mean less time (two kernels and the memory between them cost too: on a CPU
a k x k conv's pair often runs no faster). With `latency=`, each layer and its pair are timed alone on
the layer's real input shape (`LatencyCheck`): layers whose pair at half their multiply-adds is not
faster are left out of the allocation, and an allocated rank whose pair is not faster is undone, the
report saying that the target is missed.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal, cast, overload

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..analysis import FlopReport, count_flops
from ..analysis.activations import conv_geometry
from ..analysis.latency import as_dtype
from ..core.dag import DagModule, evaluating
from ..core.editor import Editor
from ..core.errors import DagError
from ..core.lowrank import LowRankConv2d, LowRankLinear
from ..core.options import check_option, choices
from ..core.progress import show_progress
from ..core.template import Ref, iter_refs
from ..core.traits import Trait, traits_of
from .factorize_ranks import LatencyCheck, at_ratio, error_allocation, uniform_allocation
from .factorize_report import Allocation, FactorizationReport, LayerReport
from .factorize_solve import (
    MIN_ROWS_PER_INPUT,
    Factorizable,
    Layer,
    Moment,
    factorized_module,
    moment_key,
    record_moments,
    weight_matrix,
    weight_of,
)
from .prepare import HOLD_OUT_EVERY, CalibrationSplit, Prepared, prepare, split_calibration

FACTORIZABLE = frozenset({"Linear", "Conv2d", "LowRankLinear", "LowRankConv2d"})
TARGETS = ("flops_ratio", "params_ratio", "rank_ratio")
EMPTY_CALIBRATION = "calibration is empty: give at least one batch, or None for the SVD solution"


@overload
def factorize(
    dag: DagModule,
    flops_ratio: float | None = None,
    *,
    params_ratio: float | None = None,
    rank_ratio: float | None = None,
    calibration: Iterable | None = None,
    example_inputs: tuple | torch.Tensor | None = None,
    allocation: Allocation = "error",
    protected: Iterable[str] = (),
    protect_outputs: bool = True,
    progress: bool = False,
    latency: bool | object = False,
    return_report: Literal[False] = False,
) -> DagModule: ...


@overload
def factorize(
    dag: DagModule,
    flops_ratio: float | None = None,
    *,
    params_ratio: float | None = None,
    rank_ratio: float | None = None,
    calibration: Iterable | None = None,
    example_inputs: tuple | torch.Tensor | None = None,
    allocation: Allocation = "error",
    protected: Iterable[str] = (),
    protect_outputs: bool = True,
    progress: bool = False,
    latency: bool | object = False,
    return_report: Literal[True],
) -> tuple[DagModule, FactorizationReport]: ...


def factorize(
    dag: DagModule,
    flops_ratio: float | None = None,
    *,
    params_ratio: float | None = None,
    rank_ratio: float | None = None,
    calibration: Iterable | None = None,
    example_inputs: tuple | torch.Tensor | None = None,
    allocation: Allocation = "error",
    protected: Iterable[str] = (),
    protect_outputs: bool = True,
    progress: bool = False,
    latency: bool | object = False,
    return_report: bool = False,
) -> DagModule | tuple[DagModule, FactorizationReport]:
    """A DAG whose Linear / Conv2d vertices (and earlier low-rank ones) are low-rank pairs.

    Give exactly one target: `flops_ratio` or `params_ratio` (of the whole model, fvcore FLOPs on
    `example_inputs`), or `rank_ratio` (every layer at that fraction of its full rank). `calibration`
    (an iterable of input tuples or tensors) makes the solution data-aware, fitted on part of the batches
    and judged on the rest (see the module docstring); without it the weights' truncated SVD is used.
    The layers producing the model's outputs are left whole unless `protect_outputs=False` (as pruning
    does; their errors reach the outputs unattenuated). `allocation="uniform"` gives every layer the same rank fraction, found to
    meet the target, instead of the least-error allocation. Vertices in `protected`, grouped convs
    and layers with no rank below break-even are left alone, with the reason in the report
    (`return_report=True` returns `(dag, FactorizationReport)`). The input DAG is untouched; a DAG
    with nested DagModules is flattened first.

    `latency=True` keeps only factorizations that pay in measured time on the CPU at the example inputs'
    batch; a `LatencyTable` (or any object with `device_type`, `dtype` and `batch_size`) on its device,
    dtype and batch. Each layer is timed alone against its low-rank pair at half its multiply-adds; one
    not faster is left whole and the target is allocated over the rest; each allocated rank is then
    timed too, and one not faster is left whole, the report's note saying the target is missed. The
    timings are in each layer's report.
    """
    start = time.perf_counter()
    targets = dict(zip(TARGETS, (flops_ratio, params_ratio, rank_ratio)))
    check_option("allocation", allocation, choices(Allocation), what="rank allocation")
    prep = prepare(
        dag,
        example_inputs,
        calibration,
        targets=targets,
        fractions=TARGETS,
        inputs_from_calibration=True,
        empty_calibration=EMPTY_CALIBRATION,
    )
    before = count_flops(prep.dag, *prep.example_inputs)
    outputs = output_layers(prep.dag) if protect_outputs else {}
    find = partial(_find_layers, prep.dag, before.flops, set(protected), outputs)
    check = _latency_check(latency, prep, progress)
    allocate = partial(_allocate, prep=prep, allocation=allocation, before=before, check=check)
    result, reports, note = _factorized(prep, find, allocate, progress)
    summary = _summary(prep, allocation, reports, before, result, time.perf_counter() - start, note)
    if check is not None:
        summary.note = "; ".join(filter(None, [summary.note, check.note(reports, _reached(prep, summary))]))
    return (result, summary) if return_report else result


def _latency_check(latency: bool | object, prep: Prepared, progress: bool) -> LatencyCheck | None:
    """The timing `latency=` asks for: None (False), the CPU at the example inputs' batch (True), or a
    latency table's device, dtype, batch and threads."""
    if latency is False:
        return None
    if latency is True:
        return LatencyCheck(prep.dag, prep.example_inputs, torch.device("cpu"), None, None, progress=progress)
    missing = [name for name in ("device_type", "dtype", "batch_size") if not hasattr(latency, name)]
    if missing:
        raise DagError(
            f"factorize(latency=...) takes True, False or a LatencyTable (an object with device_type, "
            f"dtype and batch_size); got a {type(latency).__name__} without {', '.join(missing)}"
        )
    table = cast(Any, latency)  # duck-typed: passes sit below torch_dag.latency
    return LatencyCheck(
        prep.dag,
        prep.example_inputs,
        torch.device(table.device_type),
        as_dtype(table.dtype),
        table.batch_size,
        getattr(table, "threads", None),
        progress,
    )


def _reached(prep: Prepared, summary: FactorizationReport) -> str:
    """What the result reached of its target, for the note of a latency check that missed it."""
    target, value = prep.goal
    if target == "rank_ratio":
        return f"rank_ratio={value:g}: those layers keep their full rank"
    before, after = (
        (summary.params_before, summary.params_after)
        if target == "params_ratio"
        else (summary.flops_before, summary.flops_after)
    )
    return f"{target}={value:g} asked, {after / max(1, before):.4f} reached"


def _factorized(
    prep: Prepared, find: Callable, allocate: Callable, progress: bool
) -> tuple[DagModule, list[LayerReport], str]:
    """The factorized DAG, its layers' reports and a note. With calibration, the data-aware result
    and the data-free one (truncated SVD, ranks by weight error) are both built, and the one with the
    lesser output error on the held-out batches is kept: errors of single layers on their own inputs
    do not see what the rest of the model makes of them."""
    layers, reports = find()
    for layer in layers if prep.calibration is None else ():
        layer.solve(None)
    if prep.calibration is None:
        return _replace_layers(prep.dag, layers, *allocate(layers)), reports, ""
    split = split_calibration(prep.calibration)
    moments = record_moments(prep.dag, layers, split, progress)
    for layer in show_progress(layers, desc="factorize: spectra", unit="layer", disable=not progress):
        layer.solve(moments[layer.key])
    _warn_short(layers, split, moments)
    aware = _replace_layers(prep.dag, layers, *allocate(layers))
    svd_layers, svd_reports = find()
    for layer in svd_layers:
        layer.solve(None)
    svd = _replace_layers(prep.dag, svd_layers, *allocate(svd_layers))
    for layer in svd_layers:  # the SVD's errors on the held-out rows too
        if layer.report.rank is not None:
            layer.measure(moments[moment_key(layer)])
            layer.report.error = layer.error(layer.report.rank)
    judged = split.held or split.fit  # one sample: the model-level comparison can only use it
    errors = [_output_error(prep.dag, candidate, judged) for candidate in (aware, svd)]
    note = f"output error on held-out calibration: data-aware {errors[0]:.4g}, svd {errors[1]:.4g}"
    if errors[1] < errors[0]:
        for report in svd_reports:
            report.solution = report.solution and "svd: less held-out output error than data-aware"
        return svd, svd_reports, note + " (svd kept)"
    return aware, reports, note


def _output_error(dag: DagModule, candidate: DagModule, batches: tuple[tuple, ...]) -> float:
    """Relative error of `candidate`'s outputs against `dag`'s over `batches`."""
    error = signal = 0.0
    with evaluating(dag), evaluating(candidate), torch.no_grad():
        for batch in batches:
            for want, got in zip(_leaves(dag(*batch)), _leaves(candidate(*batch))):
                error += float((got.double() - want.double()).square().sum())
                signal += float(want.double().square().sum())
    return math.sqrt(error / signal) if signal > 0 else math.sqrt(error)


def _leaves(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _allocate(
    layers: list[Layer],
    prep: Prepared,
    allocation: Allocation,
    before: FlopReport,
    check: LatencyCheck | None,
) -> tuple[list[int | None], str]:
    """Each layer's rank (None: left whole) for the target, and why a layer left whole was; with a
    latency check, over the layers whose pairs pay, each allocated rank checked in turn."""
    if check is None:
        return _ranks(layers, prep, allocation, before)
    paying = check.paying(layers)
    try:
        chosen, why = _ranks(paying, prep, allocation, before)
    except DagError as error:
        if len(paying) == len(layers):
            raise
        raise DagError(
            f"{error}; {len(layers) - len(paying)} more were left whole because their low-rank pairs "
            f"measured no faster than the whole layers on {check.device_name}: lower the target, or give "
            "latency=False to factorize them anyway"
        ) from None
    ranks = iter(check.checked(paying, chosen))
    kept = {id(layer) for layer in paying}
    return [next(ranks) if id(layer) in kept else None for layer in layers], why


def _ranks(
    layers: list[Layer], prep: Prepared, allocation: Allocation, before: FlopReport
) -> tuple[list[int | None], str]:
    """The ranks of `layers` that meet the target on their own (see `_allocate`)."""
    target, value = prep.goal
    if target == "rank_ratio":
        return at_ratio(layers, value)
    by_params = target == "params_ratio"
    total = before.total_params if by_params else before.total_flops
    choose = uniform_allocation if allocation == "uniform" else error_allocation
    return choose(layers, total * (1 - value), by_params)


def _replace_layers(dag: DagModule, layers: list[Layer], ranks: list[int | None], why: str) -> DagModule:
    """`dag` with each layer given a rank replaced by its low-rank pair; the reports say what happened."""
    editor = Editor(dag)
    for layer, rank in zip(layers, ranks):
        report = layer.report
        if rank is None:
            report.reason = report.reason or why  # a latency check's reason stands
            continue
        module, error = factorized_module(layer, rank)
        for name in report.vertices:
            editor.set_module(name, module)
        report.rank, report.error, report.solution = rank, error, layer.solution(rank)
        report.flops_after = round(layer.per_rank_flops * rank)
    return editor.build()


def _summary(
    prep: Prepared,
    allocation: Allocation,
    reports: list[LayerReport],
    before: FlopReport,
    result: DagModule,
    seconds: float,
    note: str = "",
) -> FactorizationReport:
    # the FLOP rules of the low-rank ops are exactly per_rank_flops x rank: no second forward needed
    flops_after = before.total_flops - sum(
        r.flops - r.flops_after for r in reports if r.flops_after is not None
    )
    params_after = sum(p.numel() for p in result.parameters())
    data_aware = prep.calibration is not None and "(svd kept)" not in note
    return FactorizationReport(
        "data-aware" if data_aware else "svd",
        "uniform" if prep.target == "rank_ratio" or allocation == "uniform" else "error",
        reports,
        before.total_flops,
        flops_after,
        before.total_params,
        params_after,
        seconds,
        "held-out" if prep.calibration is not None else "weight",
        note,
    )


def low_rank(module: nn.Module, rank: int, inputs: torch.Tensor | None = None) -> tuple[nn.Module, float]:
    """One Linear / Conv2d (or low-rank) module at `rank` (any rank up to the full one; no break-even
    rule here): the LowRankLinear / LowRankConv2d and its normalized error, on `inputs` (a batch of
    the layer's inputs) when given, else of the weight (truncated SVD)."""
    if type(module) not in (nn.Linear, nn.Conv2d, LowRankLinear, LowRankConv2d):
        raise DagError(f"low_rank takes a Linear, Conv2d or low-rank module, not {type(module).__name__}")
    module = cast(Factorizable, module)  # its type was just checked
    weight = weight_matrix(module).double()
    out, d = weight.shape
    report = LayerReport(
        [type(module).__name__], type(module).__name__, (out, d), min(out, d), min(out, d), 0
    )
    reason = _why_not(module, [], set(), report)
    if reason:
        raise DagError(f"cannot factorize this {type(module).__name__}: {reason}")
    if not 1 <= rank <= min(out, d):
        raise DagError(f"rank must be in [1, {min(out, d)}] for a {out}x{d} weight, got {rank}")
    layer = Layer(module, report, weight, (), 0.0, out + d)
    moment = None
    if inputs is not None:
        moment = Moment(layer.moment_size, in_sample=True)
        with torch.no_grad():
            moment.add(layer.rows(inputs, module(inputs)), "fit")
    layer.solve(moment)
    return factorized_module(layer, rank)


def output_layers(dag: DagModule) -> dict[str, str]:
    """The factorizable vertices whose results reach the DAG's outputs directly or through views,
    activations, dropouts and element-wise ops of one tensor (a classifier head and what follows it),
    each with the output it produces."""
    through = {Trait.VIEW, Trait.IDENTITY, Trait.ACTIVATION, Trait.DROPOUT, Trait.ELEMENTWISE}
    found: dict[str, str] = {}
    for ref in iter_refs(dag.output):
        name = ref.name
        while name in dag:
            vertex = dag[name]
            if vertex.op in FACTORIZABLE:
                found[name] = ref.name
                break
            refs = list(dict.fromkeys(r.name for r in iter_refs((vertex.args, vertex.kwargs))))
            if len(refs) != 1 or not traits_of(vertex.op) & through:
                break
            name = refs[0]
    return found


def _warn_short(layers: list[Layer], split: CalibrationSplit, moments: dict[tuple, Moment]) -> None:
    """One warning naming the layers given the SVD for want of calibration rows, and what would do."""
    short = [layer for layer in layers if layer.rows_needed]
    if not short:
        return
    needs = [(split.batches_for(layer.rows_needed, moments[layer.key].rows), layer) for layer in short]
    needs.sort(key=lambda pair: -pair[0])
    named = ", ".join(
        f"{layer.report.name} ({moments[layer.key].fit_rows} fitting rows of {layer.rows_needed})"
        for _, layer in needs[:3]
    )
    warnings.warn(
        f"factorize: {len(short)} of {len(layers)} layers have fewer fitting calibration rows than "
        f"{MIN_ROWS_PER_INPUT} x their inputs and use the data-free solution (truncated SVD): {named}"
        f"{', ...' if len(short) > 3 else ''}; {needs[0][0]} calibration batches like these would be "
        f"enough for all (every {HOLD_OUT_EVERY}th is held out)",
        stacklevel=3,
    )


def _find_layers(
    dag: DagModule, flops: dict[str, int], protected: set[str], outputs: dict[str, str]
) -> tuple[list[Layer], list[LayerReport]]:
    """Factorizable layers (one per module, however many vertices call it) and a report for each."""
    calls: dict[int, list] = {}
    for vertex in dag:
        if vertex.op in FACTORIZABLE:
            calls.setdefault(id(vertex.module), []).append(vertex)
    layers, reports = [], []
    for vertices in calls.values():
        module, names = (
            cast(Factorizable, vertices[0].module),
            [v.name for v in vertices],
        )  # a FACTORIZABLE op
        weight = weight_matrix(module)
        out, d = weight.shape
        macs = _macs_per_position(module, out, d)
        report = LayerReport(
            names,
            vertices[0].op,
            (out, d),
            min(out, d),
            (macs - 1) // (out + d),
            sum(flops.get(n, 0) for n in names),
        )
        reports.append(report)
        report.reason = _why_not(module, names, protected, report) or _output_reason(names, outputs)
        if report.reason:
            continue
        geometry = conv_geometry(module)
        inputs = tuple(_first_ref(v) for v in vertices)
        layers.append(
            Layer(
                module, report, weight.double(), (inputs, geometry), report.flops / macs * (out + d), out + d
            )
        )
    return layers, reports


def _output_reason(names: list[str], outputs: dict[str, str]) -> str:
    hit = [n for n in names if n in outputs]
    if not hit:
        return ""
    return f"protected: produces the output {outputs[hit[0]]!r} (factorize(..., protect_outputs=False))"


def _why_not(module: Factorizable, names: list[str], protected: set[str], report: LayerReport) -> str:
    hit = [n for n in names if n in protected]
    if hit:
        return f"protected ({', '.join(hit)})"
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return f"grouped convolution (groups={module.groups}) left alone"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported"
    if not weight_of(module).is_floating_point():
        return f"weight dtype {weight_of(module).dtype} is not floating point"
    if report.max_rank < 1:
        return f"no rank reduces its multiply-adds ({report.shape[0]}x{report.shape[1]})"
    return ""


def _macs_per_position(module: Factorizable, out: int, d: int) -> int:
    """Multiply-adds per output position (a row of a linear, a pixel of a conv), as it is now."""
    if isinstance(module, (LowRankLinear, LowRankConv2d)):
        return module.rank * (out + d)
    return out * d


def _first_ref(vertex) -> str:
    return next(a.name for a in vertex.args if isinstance(a, Ref))
