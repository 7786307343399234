"""`factorize`: replace Linear and Conv2d vertices by low-rank pairs where that cuts multiply-adds.

Each layer's weight W (out x d, with d = in x kh x kw for a conv) becomes M = U_r U_r^T W, where U_r
holds the top r left singular vectors of W L and L L^T = C is the second moment of the layer's inputs:

- without data C = I, and M is the truncated SVD of W: the best rank-r approximation of the weight;
- with calibration batches C = X^T X over the layer's real inputs (a conv's k x k patches), recorded
  in one pass over the DAG, and M is the exact minimiser of ||W X - M X||_F over rank-r matrices: the
  least-squares solution in closed form, so no alternating refinement is needed to reach it.

U_r are the top eigenvectors of W C W^T, the second moment of the layer's outputs (bias removed), so
where out <= d that moment is what calibration records (from the layer's own outputs: no extra
matmul); where d < out it records C and works on the d x d side (C regularized by 1e-6 of its trace,
exactly accounted for in the reported errors). The factors are U_r (out x r) and U_r^T W (r x d),
rebalanced to equal norms. The eigenvalues give every rank's error at once, so a global FLOPs (or
params) target is met by a Lagrangian allocation: each layer takes the rank minimising error + mu *
cost, with mu bisected until the target holds (least total error, not one uniform ratio), then any
slack goes back as rank where it removes the most error. A layer is factorized only below its
break-even rank, where the pair has fewer multiply-adds than the layer it replaces.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..analysis import count_flops
from ..core.dag import DagModule, evaluating
from ..core.errors import DagError
from ..core.lowrank import LowRankConv2d, LowRankLinear
from ..core.ops import is_dag_module
from ..core.template import Ref
from .editor import Editor
from .hierarchy import flatten

FACTORIZABLE = frozenset({"Linear", "Conv2d", "LowRankLinear", "LowRankConv2d"})
_JITTER = 1e-6  # input moments (d < out) get this fraction of their trace on the diagonal


@dataclass
class LayerReport:
    """What happened to one factorizable layer (a module; `vertices` lists every vertex calling it)."""

    vertices: list[str]
    op: str
    shape: tuple[int, int]  # (out, d): the weight as a matrix
    full_rank: int
    max_rank: int  # the largest rank that still reduces multiply-adds (0: none does)
    flops: int
    rank: int | None = None  # None: left as it is
    flops_after: int | None = None
    error: float | None = None  # normalized output error on the calibration data (or weight error)
    reason: str = ""

    @property
    def name(self) -> str:
        return self.vertices[0]


@dataclass
class FactorizationReport:
    """Per-layer ranks, errors and skip reasons of one `factorize` run, and the model's totals."""

    method: str  # "data-aware" | "svd"
    allocation: str  # "error" | "uniform"
    layers: list[LayerReport]
    flops_before: int = 0
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    error_kind: str = field(default="weight")

    @property
    def factorized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.rank is not None]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.rank is None]

    def table(self, top: int | None = None) -> str:
        ratio = self.flops_after / max(1, self.flops_before)
        lines = [
            f"factorize ({self.method}, {self.allocation} allocation): {len(self.factorized)} of "
            f"{len(self.layers)} layers factorized in {self.seconds:.2f} s",
            f"FLOPs {self.flops_before / 1e9:.3f} G -> {self.flops_after / 1e9:.3f} G ({ratio:.1%}), "
            f"params {self.params_before / 1e6:.3f} M -> {self.params_after / 1e6:.3f} M",
            f"  {'vertex':40s} {'op':14s} {'out x d':>11s} {'rank':>11s} {'FLOPs kept':>10s} "
            f"{self.error_kind + ' err':>10s}  note",
        ]
        layers = sorted(self.layers, key=lambda layer: -layer.flops)[:top]
        for layer in layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            rank = f"{layer.rank}/{layer.full_rank}" if layer.rank is not None else f"-/{layer.full_rank}"
            kept = f"{layer.flops_after / max(1, layer.flops):.1%}" if layer.flops_after is not None else "100%"
            error = f"{layer.error:.4f}" if layer.error is not None else "-"
            lines.append(f"  {layer.name[:40]:40s} {layer.op[:14]:14s} {shape:>11s} {rank:>11s} {kept:>10s} "
                         f"{error:>10s}  {layer.reason}")
        return "\n".join(lines)


def factorize(dag: DagModule, flops_ratio: float | None = None, *, params_ratio: float | None = None,
              rank_ratio: float | None = None, calibration: Iterable | None = None,
              example_inputs: tuple | torch.Tensor | None = None, allocation: str = "error",
              protected: Iterable[str] = (), progress: bool = False, return_report: bool = False
              ) -> DagModule | tuple[DagModule, FactorizationReport]:
    """A DAG whose Linear / Conv2d vertices (and earlier low-rank ones) are low-rank pairs.

    Give exactly one target: `flops_ratio` or `params_ratio` (of the whole model, fvcore FLOPs on
    `example_inputs`), or `rank_ratio` (every layer at that fraction of its full rank). `calibration`
    (an iterable of input tuples or tensors) makes the solution data-aware; without it the weights'
    truncated SVD is used. `allocation="uniform"` gives every layer the same rank fraction, found to
    meet the target, instead of the least-error allocation. Vertices in `protected`, grouped convs
    and layers with no rank below break-even are left alone, with the reason in the report
    (`return_report=True` returns `(dag, FactorizationReport)`). The input DAG is untouched; a DAG
    with nested DagModules is flattened first.
    """
    start = time.perf_counter()
    targets = {"flops_ratio": flops_ratio, "params_ratio": params_ratio, "rank_ratio": rank_ratio}
    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) != 1:
        raise DagError(f"give exactly one of flops_ratio, params_ratio, rank_ratio (got {sorted(given) or 'none'})")
    (target_name, target), = given.items()
    if not 0 < target <= 1:
        raise DagError(f"{target_name} must be in (0, 1], got {target}")
    if allocation not in ("error", "uniform"):
        raise DagError(f"allocation must be 'error' or 'uniform', got {allocation!r}")
    if any(is_dag_module(v.module) for v in dag):
        dag = flatten(dag)
    batches = [_as_tuple(b) for b in calibration] if calibration is not None else None
    if batches is not None and not batches:
        raise DagError("calibration is empty: give at least one batch, or None for the SVD solution")
    if example_inputs is None:
        example_inputs = batches[0] if batches else dag.example_inputs()
    example_inputs = _as_tuple(example_inputs)

    before = count_flops(dag, *example_inputs)
    layers, reports = _find_layers(dag, before.flops, set(protected))
    moments = _record(dag, layers, batches, progress) if batches is not None else None
    for layer in tqdm(layers, desc="factorize: spectra", unit="layer", disable=not progress):
        layer.solve(moments[layer.key] if moments else None)

    by_params = target_name == "params_ratio"
    if target_name == "rank_ratio":
        ranks, why = _at_ratio(layers, target)
    else:
        total = before.total_params if by_params else before.total_flops
        choose = _uniform_allocation if allocation == "uniform" else _error_allocation
        ranks, why = choose(layers, total * (1 - target), by_params)

    editor = Editor(dag)
    for layer, rank in zip(layers, ranks):
        report = layer.report
        if rank is None:
            report.reason = why
            continue
        module, error = _factorized_module(layer, rank)
        for name in report.vertices:
            editor.set_module(name, module)
        report.rank, report.error = rank, error
        report.flops_after = round(layer.per_rank_flops * rank)
    result = editor.build()

    # the FLOP rules of the low-rank ops are exactly per_rank_flops x rank: no second forward needed
    flops_after = before.total_flops - sum(r.flops - r.flops_after for r in reports if r.rank is not None)
    params_after = sum(p.numel() for p in result.parameters())
    summary = FactorizationReport(
        "data-aware" if batches is not None else "svd",
        "uniform" if target_name == "rank_ratio" or allocation == "uniform" else "error",
        reports, before.total_flops, flops_after, before.total_params, params_after,
        time.perf_counter() - start, "output" if batches is not None else "weight")
    return (result, summary) if return_report else result


def low_rank(module: nn.Module, rank: int, inputs: torch.Tensor | None = None) -> tuple[nn.Module, float]:
    """One Linear / Conv2d (or low-rank) module at `rank` (any rank up to the full one; no break-even
    rule here): the LowRankLinear / LowRankConv2d and its normalized error, on `inputs` (a batch of
    the layer's inputs) when given, else of the weight (truncated SVD)."""
    if type(module) not in (nn.Linear, nn.Conv2d, LowRankLinear, LowRankConv2d):
        raise DagError(f"low_rank takes a Linear, Conv2d or low-rank module, not {type(module).__name__}")
    weight = _weight_matrix(module).double()
    out, d = weight.shape
    report = LayerReport([type(module).__name__], type(module).__name__, (out, d), min(out, d), min(out, d), 0)
    reason = _why_not(module, [], set(), report)
    if reason:
        raise DagError(f"cannot factorize this {type(module).__name__}: {reason}")
    if not 1 <= rank <= min(out, d):
        raise DagError(f"rank must be in [1, {min(out, d)}] for a {out}x{d} weight, got {rank}")
    layer = _Layer(module, report, weight, (), 0.0, out + d)
    moment = None
    if inputs is not None:
        moment = _Moment(layer.moment_size)
        with torch.no_grad():
            moment.add(layer.rows(inputs, module(inputs)))
    layer.solve(moment)
    return _factorized_module(layer, rank)


# --- the layers -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Layer:
    module: nn.Module
    report: LayerReport
    weight: torch.Tensor  # (out, d), float64
    key: tuple  # layers with equal keys share one calibration moment (same inputs read the same way)
    per_rank_flops: float
    per_rank_params: int
    energies: torch.Tensor | None = None  # (k,) squared singular values of W L, largest first
    _basis: torch.Tensor | None = None  # out <= d: the left singular vectors of W L (out x out)
    _right: torch.Tensor | None = None  # d < out: the right ones (d x d), lifted to the left on demand
    _chol: torch.Tensor | None = None
    _wtw: torch.Tensor | None = None  # W^T W (d < out)
    jitter: float = 0.0  # added to the input moment's diagonal (d < out), taken out of reported errors
    _errors: np.ndarray | None = None
    _tails: np.ndarray | None = None

    @property
    def records_outputs(self) -> bool:
        """Calibration records W C W^T from the outputs where out <= d, else C from the inputs."""
        out, d = self.report.shape
        return out <= d

    @property
    def moment_size(self) -> int:
        out, d = self.report.shape
        return out if self.records_outputs else d

    def rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What calibration accumulates from one call: output rows (bias removed) or input rows."""
        geometry = conv_geometry(self.module)
        if not self.records_outputs:
            return input_rows(x, geometry)
        bias = self.module.bias
        if geometry is None:
            y = y.reshape(-1, y.shape[-1])
            return y - bias if bias is not None else y
        y = y.unsqueeze(0) if y.dim() == 3 else y
        y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        return y - bias if bias is not None else y

    def solve(self, moment: _Moment | None) -> None:
        """Left singular vectors of W L (most important first) and their squared singular values,
        where L L^T is the input moment (the identity without data). From the smaller Gram matrix with
        `eigh` (see `_eigh`), much faster on the CPU than an SVD."""
        weight, d = self.weight, self.weight.shape[1]
        if self.records_outputs:  # eigenvectors of W C W^T (out x out): exact, no inversion
            gram = weight @ weight.T if moment is None else moment.value()
            self.energies, self._basis = _eigh(gram)
            return
        # d < out: the d x d side, with L the Cholesky factor of C (+ jitter); G = L^T W^T W L
        self._wtw = gram = weight.T @ weight
        if moment is not None:
            covariance = moment.value()
            self.jitter = _JITTER * max(covariance.trace().item(), 1e-30)
            self._chol = torch.linalg.cholesky(covariance + self.jitter * torch.eye(d, dtype=torch.float64))
            gram = self._chol.T @ gram @ self._chol
        self.energies, self._right = _eigh(gram)

    def tails(self) -> np.ndarray:
        """tails[r] = the energy outside the first r directions (summed from the small end, so
        that tiny tails keep their precision)."""
        if self._tails is None:
            energies = self.energies.numpy()
            self._tails = np.concatenate([np.cumsum(energies[::-1])[::-1], [0.0]])
        return self._tails

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """U_r (out x r), the top left singular vectors of W L, and U_r^T W (r x d)."""
        if self._right is None:
            basis = self._basis[:, :rank]
            return basis, basis.T @ self.weight
        # d < out: U_r = W L V_r / s_r, so U_r^T W = (L V_r)^T W^T W / s_r, from the d x d Gram matrix
        lift = self._right[:, :rank] if self._chol is None else self._chol @ self._right[:, :rank]
        norms = self.energies[:rank].sqrt()
        lift = torch.where(norms > norms[0] * 1e-10, lift / norms, torch.zeros_like(lift))
        return self.weight @ lift, lift.T @ self._wtw

    @property
    def max_rank(self) -> int:
        return self.report.max_rank

    @property
    def full_rank(self) -> int:
        return self.report.full_rank

    def cost(self, by_params: bool) -> float:
        """What the layer costs now (FLOPs or params), the budget its low-rank pair must beat."""
        return self.params_now if by_params else self.report.flops

    @property
    def params_now(self) -> int:
        return sum(p.numel() for name, p in self.module.named_parameters() if name != "bias")

    def rank_costs(self, by_params: bool) -> np.ndarray:
        per_rank = self.per_rank_params if by_params else self.per_rank_flops
        return per_rank * np.arange(1, self.max_rank + 1, dtype=np.float64)

    def rank_errors(self) -> np.ndarray:
        """Normalized squared error of ranks 1..max_rank (energy outside the first r directions)."""
        if self._errors is None:
            tails = self.tails()
            self._errors = tails[1: self.max_rank + 1] / tails[0] if tails[0] > 0 else np.zeros(self.max_rank)
        return self._errors


def _find_layers(dag: DagModule, flops: dict[str, int], protected: set[str]
                 ) -> tuple[list[_Layer], list[LayerReport]]:
    """Factorizable layers (one per module, however many vertices call it) and a report for each."""
    calls: dict[int, list] = {}
    for vertex in dag:
        if vertex.op in FACTORIZABLE:
            calls.setdefault(id(vertex.module), []).append(vertex)
    layers, reports = [], []
    for vertices in calls.values():
        module, names = vertices[0].module, [v.name for v in vertices]
        weight = _weight_matrix(module)
        out, d = weight.shape
        macs = _macs_per_position(module, out, d)
        report = LayerReport(names, vertices[0].op, (out, d), min(out, d), (macs - 1) // (out + d),
                             sum(flops.get(n, 0) for n in names))
        reports.append(report)
        report.reason = _why_not(module, names, protected, report)
        if report.reason:
            continue
        geometry = conv_geometry(module)
        inputs = tuple(_first_ref(v) for v in vertices)
        layers.append(_Layer(module, report, weight.double(), (inputs, geometry),
                             report.flops / macs * (out + d), out + d))
    return layers, reports


def _why_not(module: nn.Module, names: list[str], protected: set[str], report: LayerReport) -> str:
    hit = [n for n in names if n in protected]
    if hit:
        return f"protected ({', '.join(hit)})"
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return f"grouped convolution (groups={module.groups}) left alone"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported"
    if not _weight_of(module).is_floating_point():
        return f"weight dtype {_weight_of(module).dtype} is not floating point"
    if report.max_rank < 1:
        return f"no rank reduces its multiply-adds ({report.shape[0]}x{report.shape[1]})"
    return ""


def _weight_of(module: nn.Module) -> torch.Tensor:
    return module.down if isinstance(module, (LowRankLinear, LowRankConv2d)) else module.weight


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        weight = module.merged_weight() if isinstance(module, (LowRankLinear, LowRankConv2d)) else module.weight
        return weight.detach().reshape(weight.shape[0], -1)


def _macs_per_position(module: nn.Module, out: int, d: int) -> int:
    """Multiply-adds per output position (a row of a linear, a pixel of a conv), as it is now."""
    if isinstance(module, (LowRankLinear, LowRankConv2d)):
        return module.rank * (out + d)
    return out * d


def conv_geometry(module: nn.Module) -> tuple | None:
    if isinstance(module, (nn.Conv2d, LowRankConv2d)):
        return (tuple(module.kernel_size), tuple(module.stride), module.padding if isinstance(module.padding, str)
                else tuple(module.padding), tuple(module.dilation))
    return None


def _first_ref(vertex) -> str:
    return next(a.name for a in vertex.args if isinstance(a, Ref))


def _as_tuple(inputs) -> tuple:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, >= 0) and eigenvectors of a symmetric float64 matrix. The vectors
    come from a float32 `eigh` (half the time of float64's); each value is then the vector's Rayleigh
    quotient in float64, so even tiny energies (the tails of exactly low-rank weights) stay exact."""
    _, vectors = torch.linalg.eigh(gram.float())
    vectors = vectors.double()
    energies = ((gram @ vectors) * vectors).sum(0).clamp_min(0)
    order = energies.argsort(descending=True)
    return energies[order], vectors[:, order]


# --- calibration: second moments of each layer's outputs or inputs ---------------------------------


class _Moment:
    """The running sum of rows^T rows, in float64: float32 sums would floor every tail energy at
    ~1e-7 of the total (a normalized error of ~3e-4 even for an exact low-rank weight)."""

    def __init__(self, size: int):
        self.sum = torch.zeros(size, size, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().double()
        self.sum.addmm_(rows.T, rows)

    def value(self) -> torch.Tensor:
        return (self.sum + self.sum.T) / 2


def _record(dag: DagModule, layers: list[_Layer], batches: list[tuple], progress: bool) -> dict[tuple, _Moment]:
    """Run the calibration batches once through the DAG, accumulating every layer's moment (layers
    that record inputs and read the same tensors the same way share one)."""
    moments: dict[tuple, _Moment] = {}
    hooks = []

    def recorder(layer: _Layer, moment: _Moment):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            moment.add(layer.rows(args[0], output))
        return hook

    try:
        for layer in layers:
            if layer.records_outputs:
                layer.key = ("outputs", id(layer.module))
            if layer.key not in moments:
                moments[layer.key] = _Moment(layer.moment_size)
                hooks.append(layer.module.register_forward_hook(recorder(layer, moments[layer.key])))
        with evaluating(dag), torch.no_grad():
            for batch in tqdm(batches, desc="factorize: calibration", unit="batch", disable=not progress):
                dag(*batch)
    finally:
        for handle in hooks:
            handle.remove()
    return moments


def row_gram(x: torch.Tensor, geometry: tuple | None, constant: bool = True) -> torch.Tensor:
    """The float64 Gram matrix of a layer's input rows (`input_rows`), per row, with a column of ones
    appended when `constant` (for a bias): what least-squares refits of the layer accumulate."""
    rows = input_rows(x, geometry).double()
    if constant:
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
    return rows.T @ rows / len(rows)


def input_rows(x: torch.Tensor, geometry: tuple | None) -> torch.Tensor:
    """The rows a layer multiplies by its weight matrix: features of a linear, patches of a conv."""
    if geometry is None:
        return x.reshape(-1, x.shape[-1])
    kernel, stride, padding, dilation = geometry
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if isinstance(padding, str):
        if padding == "same":
            pads = []
            for k, dil in zip(reversed(kernel), reversed(dilation)):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        padding = (0, 0)
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, d, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


# --- solutions ------------------------------------------------------------------------------------


def _factorized_module(layer: _Layer, rank: int) -> tuple[nn.Module, float]:
    """The low-rank module of `layer` at `rank`, and its normalized error."""
    up, down = layer.factors(rank)
    error = _error(layer, down, rank)
    balance = down.norm(dim=1).clamp_min(1e-30).sqrt()  # equal factor norms: better for finetuning
    up, down = up * balance, down / balance[:, None]
    module, out, d = layer.module, *layer.report.shape
    reference = _weight_of(module)
    bias = module.bias
    if isinstance(module, (nn.Linear, LowRankLinear)):
        new = LowRankLinear(d, out, rank, bias=bias is not None)
        shapes = (rank, d), (out, rank)
    else:
        new = LowRankConv2d(module.in_channels, out, module.kernel_size, rank, module.stride, module.padding,
                            module.dilation, bias=bias is not None)
        shapes = (rank, module.in_channels, *module.kernel_size), (out, rank, 1, 1)
    requires_grad = reference.requires_grad
    like = dict(dtype=reference.dtype, device=reference.device, memory_format=torch.contiguous_format)
    new.down = nn.Parameter(down.reshape(shapes[0]).to(**like), requires_grad=requires_grad)
    new.up = nn.Parameter(up.reshape(shapes[1]).to(**like), requires_grad=requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return new, error


def _error(layer: _Layer, down: torch.Tensor, rank: int) -> float:
    """Normalized error of the rank-r weight: on the calibration inputs, else of the weight itself.
    The jitter's share (jitter x ||(I - P) W||^2 of the error, jitter x ||W||^2 of the signal) is
    taken out, so the figure is on the recorded inputs alone."""
    tails = layer.tails()
    tail, total = float(tails[rank]), float(tails[0])
    if layer.jitter:
        weight_energy = layer.weight.square().sum().item()
        tail -= layer.jitter * (weight_energy - down.square().sum().item())
        total -= layer.jitter * weight_energy
    return math.sqrt(max(tail, 0.0) / total) if total > 0 else 0.0


# --- rank allocation ------------------------------------------------------------------------------


def _at_ratio(layers: list[_Layer], ratio: float) -> tuple[list[int | None], str]:
    """Every layer at `ratio` of its full rank, where that is below its break-even rank."""
    ranks = [max(1, round(ratio * layer.full_rank)) for layer in layers]
    ranks = [rank if rank <= layer.max_rank else None for layer, rank in zip(layers, ranks)]
    return ranks, f"rank ratio {ratio:g} is at or above this layer's break-even rank"


def _savings(layers: list[_Layer], ranks: list[int | None], by_params: bool) -> float:
    return sum(layer.cost(by_params) - layer.rank_costs(by_params)[rank - 1]
               for layer, rank in zip(layers, ranks) if rank is not None)


def _unreachable(layers: list[_Layer], needed: float, by_params: bool) -> DagError:
    best = _savings(layers, [1] * len(layers), by_params)
    what = "params" if by_params else "FLOPs"
    return DagError(f"the target needs {needed:.4g} fewer {what}, but factorizing all {len(layers)} "
                    f"factorizable layers at rank 1 saves only {best:.4g}")


def _error_allocation(layers: list[_Layer], needed: float, by_params: bool) -> tuple[list[int | None], str]:
    """Ranks minimising the total normalized squared error with at least `needed` saved: each layer
    minimises error + mu * cost on its own, mu bisected (in log space) to the smallest that saves enough."""
    why = "kept whole: at this target no rank was worth its error"
    if needed <= 0:
        return [None] * len(layers), "kept whole: the target needs no reduction"
    if _savings(layers, [1] * len(layers), by_params) < needed:
        raise _unreachable(layers, needed, by_params)
    curves = [(layer.rank_errors(), layer.rank_costs(by_params), layer.cost(by_params)) for layer in layers]
    scale = 1.0 / max(cost for _, _, cost in curves)  # mu in units of "error per largest layer's cost"

    def choose(mu: float) -> list[int | None]:
        ranks = []
        for errors, costs, keep in curves:
            objective = errors + mu * scale * costs
            best = int(np.argmin(objective))
            ranks.append(best + 1 if objective[best] < mu * scale * keep else None)
        return ranks

    low, high = 1e-12, 1.0
    while _savings(layers, choose(high), by_params) < needed:
        high *= 4
    for _ in range(200):
        middle = math.sqrt(low * high)
        if _savings(layers, choose(middle), by_params) >= needed:
            high = middle
        else:
            low = middle
        if high / low < 1 + 1e-9:
            break
    return _spend_slack(layers, choose(high), needed, by_params), why


def _spend_slack(layers: list[_Layer], ranks: list[int | None], needed: float, by_params: bool
                 ) -> list[int | None]:
    """The Lagrangian allocation saves a little more than needed (layers switch in whole steps):
    give that slack back as extra rank where it removes the most error per unit of cost."""
    ranks = list(ranks)
    slack = _savings(layers, ranks, by_params) - needed
    heap = []
    for i, (layer, rank) in enumerate(zip(layers, ranks)):
        if rank is not None and rank < layer.max_rank:
            heapq.heappush(heap, (-_gain(layer, rank, by_params), i))
    while heap:
        _, i = heapq.heappop(heap)
        layer, rank = layers[i], ranks[i]
        step = layer.per_rank_params if by_params else layer.per_rank_flops
        if step > slack:
            continue
        ranks[i], slack = rank + 1, slack - step
        if rank + 1 < layer.max_rank:
            heapq.heappush(heap, (-_gain(layer, rank + 1, by_params), i))
    return ranks


def _gain(layer: _Layer, rank: int, by_params: bool) -> float:
    """Error removed per unit of cost by raising `rank` by one."""
    errors = layer.rank_errors()
    step = layer.per_rank_params if by_params else layer.per_rank_flops
    return (errors[rank - 1] - errors[rank]) / step


def _uniform_allocation(layers: list[_Layer], needed: float, by_params: bool) -> tuple[list[int | None], str]:
    """One rank fraction for every layer: the largest (on a fine grid) that saves at least `needed`."""
    if needed <= 0:
        return [None] * len(layers), "kept whole: the target needs no reduction"
    for ratio in np.linspace(1.0, 0.0, 2001)[:-1]:
        ranks, why = _at_ratio(layers, float(ratio))
        if _savings(layers, ranks, by_params) >= needed:
            return ranks, why
    raise _unreachable(layers, needed, by_params)
