"""The solver behind `factorize`: each layer's spectrum (with or without calibration moments) and its
low-rank factors at a rank. See `factorize`'s module docstring for the mathematics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeVar, cast

import numpy as np
import torch
from torch import nn

from ..analysis.activations import conv_geometry, input_rows
from ..core.dag import DagModule, evaluating
from ..core.lowrank import LowRankConv2d, LowRankLinear
from ..core.progress import show_progress
from .factorize_report import LayerReport
from .prepare import HOLD_OUT_EVERY, CalibrationSplit, Part

JITTER = (
    1e-6  # an unshrunk input moment (`low_rank`, d < out) gets this fraction of its trace on the diagonal
)
MIN_ROWS_PER_INPUT = 2  # fewer fitting rows than this x the layer's inputs d: the data-free solution
Factorizable = nn.Linear | nn.Conv2d | LowRankLinear | LowRankConv2d  # the modules of FACTORIZABLE ops
Pair = tuple[int, int]
T = TypeVar("T")


def shrinkage(rows: int, d: int) -> float:
    """The weight of the data-free moment in the fitted one: d / (d + rows), so a moment from few rows
    (rank <= rows, exact on them, arbitrary elsewhere) leans on the weights and many rows on the data."""
    return d / (d + rows)


@dataclass(eq=False)
class Spectrum:
    """One solution of a layer: the directions its rank-r weights M = U_r U_r^T W keep, most important
    first. out <= d: `basis` holds U (out x k); d < out: U = W L V / s, kept as V (`right`, d x k) and
    the Cholesky factor L of the input moment (None: the identity, the truncated SVD)."""

    name: str  # "data-aware" or "svd"
    energies: torch.Tensor  # (k,) squared singular values of W L, largest first
    basis: torch.Tensor | None = None
    right: torch.Tensor | None = None
    chol: torch.Tensor | None = None

    def lift(self) -> torch.Tensor:
        """L V / s (d x k, d < out): U = W lift; directions with no energy give zeros."""
        right = _solved(self.right)
        lift = right if self.chol is None else self.chol @ right
        norms = self.energies.sqrt()
        return torch.where(norms > norms[0] * 1e-10, lift / norms, torch.zeros_like(lift))

    def left(self, weight: torch.Tensor) -> torch.Tensor:
        """U: orthonormal, most important first (d < out: W lift orthonormalized in order, so that
        the float32 eigenvectors' small non-orthogonality in C's metric leaks no energy twice)."""
        if self.basis is not None:
            return self.basis
        lift = self.lift()
        used = int((lift.abs().sum(0) > 0).sum())  # the directions with energy come first
        return torch.linalg.qr(weight @ lift[:, :used]).Q

    def factors(self, weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """U_r (out x r) and U_r^T W (r x d)."""
        basis = self.left(weight)[:, :rank]
        if basis.shape[1] < rank:  # W has lower rank than asked: the extra directions carry nothing
            basis = torch.cat([basis, basis.new_zeros(len(basis), rank - basis.shape[1])], 1)
        return basis, basis.T @ weight

    def captured(self, weight: torch.Tensor, wtw: torch.Tensor | None, held: torch.Tensor) -> torch.Tensor:
        """Per direction u_i, the energy it keeps of the held-out outputs: u_i^T (W C W^T) u_i, where
        `held` is W C W^T itself (out <= d) or C (d < out)."""
        basis = self.left(weight)
        if wtw is None:
            return ((held @ basis) * basis).sum(0)
        back = weight.T @ basis
        return ((held @ back) * back).sum(0)


@dataclass(eq=False)
class Layer:
    """One factorizable layer (one module, however many vertices call it): its weight as a matrix, its
    solutions once solved, and what each rank costs and loses."""

    module: Factorizable
    report: LayerReport
    weight: torch.Tensor  # (out, d), float64
    key: tuple  # layers with equal keys share one calibration moment (same inputs read the same way)
    per_rank_flops: float
    per_rank_params: int
    spectra: list[Spectrum] = field(default_factory=list)  # the truncated SVD first
    choice: np.ndarray | None = None  # per rank 0..k, which spectrum has the least error
    curve: np.ndarray | None = None  # per rank 0..k, normalized squared error (held-out with data)
    rows_needed: int = 0  # > 0: too few fitting rows for a data-aware solution, this many would do
    _wtw: torch.Tensor | None = None  # W^T W (d < out)

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

    def solve(self, moment: Moment | None) -> None:
        """The truncated SVD and, with a moment of enough rows, the data-aware solution fitted on its
        fitting rows (shrunk towards the weights, see `shrinkage`); every rank's error is measured on
        the held-out rows (of the weight without data), and each rank takes the solution with less."""
        weight, d = self.weight, self.weight.shape[1]
        if not self.records_outputs:
            self._wtw = weight.T @ weight
        self.spectra = [self._spectrum("svd", None, 1.0)]
        if moment is not None:
            if moment.fit_rows >= MIN_ROWS_PER_INPUT * d or moment.in_sample:
                alpha = 0.0 if moment.in_sample else shrinkage(moment.fit_rows, d)
                self.spectra.append(self._spectrum("data-aware", moment.fit(), alpha))
            else:
                self.rows_needed = MIN_ROWS_PER_INPUT * d
        curves = np.stack([self._errors(s, moment) for s in self.spectra])
        self.choice, self.curve = curves.argmin(0), curves.min(0)

    def _spectrum(self, name: str, fit: torch.Tensor | None, alpha: float) -> Spectrum:
        """The directions for the moment (1 - alpha) C / |W C W^T| + alpha I / |W|^2 (|.|: the trace),
        where `fit` is C, or W C W^T when the layer records outputs; alpha = 1 (or no data): the SVD."""
        weight, wtw, d = self.weight, self._wtw, self.weight.shape[1]
        plain = weight @ weight.T if wtw is None else torch.eye(d, dtype=torch.float64)
        mixed = plain  # the SVD's moment, unscaled: its energies are the weight's
        signal = 0.0 if fit is None else float(fit.trace() if wtw is None else (fit * wtw).sum())
        if fit is not None and alpha < 1 and signal > 0:
            scale = float(plain.trace() if wtw is None else wtw.trace())
            mixed = (1 - alpha) * fit / signal + alpha * plain / max(scale, 1e-300)
        if wtw is None:  # eigenvectors of the output moment (out x out): exact, no inversion
            return Spectrum(name, *eigh(mixed))
        if mixed is plain:
            return self._right_spectrum(name, wtw, None)
        if alpha == 0:  # unshrunk (in-sample): a little jitter keeps the Cholesky factor defined
            mixed = mixed + JITTER * max(float(mixed.trace()), 1e-30) / d * torch.eye(d, dtype=torch.float64)
        chol = torch.linalg.cholesky(mixed)
        return self._right_spectrum(name, chol.T @ wtw @ chol, chol)

    @staticmethod
    def _right_spectrum(name: str, gram: torch.Tensor, chol: torch.Tensor | None) -> Spectrum:
        energies, right = eigh(gram)
        return Spectrum(name, energies, right=right, chol=chol)

    def _errors(self, spectrum: Spectrum, moment: Moment | None) -> np.ndarray:
        """Normalized squared error of ranks 0..k: of the held-out outputs, or of the weight. The
        directions span all of W's outputs, so their energies sum to the whole (up to rounding)."""
        if moment is None:
            energies = spectrum.energies
        else:
            energies = spectrum.captured(self.weight, self._wtw, moment.held())
        # summed from the small end, so that tiny tails keep their precision
        kept = energies.clamp_min(0).numpy()
        tails = np.zeros(self.full_rank + 1)  # directions past those with energy keep nothing
        tails[: len(kept)] = np.cumsum(kept[::-1])[::-1]
        return tails / tails[0] if tails[0] > 0 else tails

    def measure(self, moment: Moment) -> None:
        """Replace the error curve by the held-out errors of the solutions as they are."""
        self.curve = np.stack([self._errors(s, moment) for s in self.spectra]).min(0)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """U_r (out x r) and U_r^T W (r x d) of the solution with the least error at `rank`."""
        return self.spectra[int(_solved(self.choice)[rank])].factors(self.weight, rank)

    def solution(self, rank: int) -> str:
        """Which solution `rank` uses, and why where it is not the data-aware one."""
        name = self.spectra[int(_solved(self.choice)[rank])].name
        if self.rows_needed:
            return f"svd: too few calibration rows (needs {self.rows_needed})"
        return name if len(self.spectra) == 1 or name != "svd" else "svd: less held-out error"

    def error(self, rank: int) -> float:
        """Normalized (not squared) error at `rank`: on held-out calibration rows, else of the weight."""
        return math.sqrt(max(float(_solved(self.curve)[rank]), 0.0))

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
        """Normalized squared error of ranks 1..max_rank (held-out with calibration data)."""
        return _solved(self.curve)[1 : self.max_rank + 1]


def _solved(value: T | None) -> T:
    """A part of the solution that `Layer.solve` sets (None only before it ran)."""
    if value is None:
        raise RuntimeError("the layer's solution is read before Layer.solve computed it")
    return value


def weight_of(module: Factorizable) -> torch.Tensor:
    """The parameter whose dtype, device and gradient flag the layer's factors take."""
    return module.down if isinstance(module, (LowRankLinear, LowRankConv2d)) else module.weight


def weight_matrix(module: Factorizable) -> torch.Tensor:
    """The weight (a low-rank pair's product) as an (out, d) matrix."""
    with torch.no_grad():
        weight = (
            module.merged_weight() if isinstance(module, (LowRankLinear, LowRankConv2d)) else module.weight
        )
        return weight.detach().reshape(weight.shape[0], -1)


def eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, >= 0) and eigenvectors of a symmetric float64 matrix. The vectors
    come from a float32 `eigh` (half the time of float64's); each value is then the vector's Rayleigh
    quotient in float64, so even tiny energies (the tails of exactly low-rank weights) stay exact."""
    _, vectors = torch.linalg.eigh(gram.float())
    vectors = vectors.double()
    energies = ((gram @ vectors) * vectors).sum(0).clamp_min(0)
    order = energies.argsort(descending=True)
    return energies[order], vectors[:, order]


# --- calibration: second moments of each layer's outputs or inputs ---------------------------------


class Moment:
    """Running sums of rows^T rows, in float64 (float32 sums would floor every tail energy at ~1e-7 of
    the total), one over the fitting rows and one over the held-out rows; `in_sample` (`low_rank`
    given one batch): a single sum, fitted and measured on the same rows."""

    def __init__(self, size: int, in_sample: bool = False):
        self.sums = [torch.zeros(size, size, dtype=torch.float64) for _ in range(1 if in_sample else 2)]
        self.counts = [0] * len(self.sums)
        self.in_sample = in_sample

    def add(self, rows: torch.Tensor, part: Part) -> None:
        """Add `rows` to the fitting sum, the held-out one, or (`split`) the last quarter of them to
        the held-out one and the rest to the fitting one (a single calibration sample)."""
        rows = rows.detach().double()
        if part == "split" and not self.in_sample:
            cut = len(rows) - max(1, len(rows) // HOLD_OUT_EVERY) if len(rows) > 1 else len(rows)
            self.add(rows[:cut], "fit")
            self.add(rows[cut:], "held")
            return
        index = 1 if part == "held" and not self.in_sample else 0
        self.sums[index].addmm_(rows.T, rows)
        self.counts[index] += len(rows)

    @property
    def fit_rows(self) -> int:
        return self.counts[0]

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def fit(self) -> torch.Tensor:
        """The mean of the fitting rows' outer products."""
        return _symmetric(self.sums[0]) / max(1, self.counts[0])

    def held(self) -> torch.Tensor:
        """The mean of the held-out rows' outer products (the fitting ones' in sample)."""
        return _symmetric(self.sums[-1]) / max(1, self.counts[-1])


def _symmetric(value: torch.Tensor) -> torch.Tensor:
    return (value + value.T) / 2


def moment_key(layer: Layer) -> tuple:
    """Layers with equal keys share one moment: those recording outputs have their own."""
    return ("outputs", id(layer.module)) if layer.records_outputs else layer.key


def record_moments(
    dag: DagModule, layers: list[Layer], split: CalibrationSplit, progress: bool
) -> dict[tuple, Moment]:
    """Run the calibration batches once through the DAG, accumulating every layer's moments on the
    fitting and the held-out batches (layers that record inputs and read the same tensors the same way
    share one)."""
    moments: dict[tuple, Moment] = {}
    hooks = []
    part: list[Part] = ["fit"]

    def recorder(layer: Layer, moment: Moment):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            moment.add(layer.rows(args[0], output), part[0])

        return hook

    try:
        for layer in layers:
            layer.key = moment_key(layer)
            if layer.key not in moments:
                moments[layer.key] = Moment(layer.moment_size)
                hooks.append(layer.module.register_forward_hook(recorder(layer, moments[layer.key])))
        with evaluating(dag), torch.no_grad():
            for part[0], batch in show_progress(
                split.parts(), desc="factorize: calibration", unit="batch", disable=not progress
            ):
                dag(*batch)
    finally:
        for handle in hooks:
            handle.remove()
    return moments


# --- solutions ------------------------------------------------------------------------------------


def factorized_module(layer: Layer, rank: int) -> tuple[nn.Module, float]:
    """The low-rank module of `layer` at `rank`, and its normalized error."""
    up, down = layer.factors(rank)
    error = layer.error(rank)
    balance = down.norm(dim=1).clamp_min(1e-30).sqrt()  # equal factor norms: better for finetuning
    up, down = up * balance, down / balance[:, None]
    module, out, d = layer.module, *layer.report.shape
    reference = weight_of(module)
    bias = module.bias
    new: LowRankLinear | LowRankConv2d
    shapes: tuple[tuple[int, ...], tuple[int, ...]]
    if isinstance(module, (nn.Linear, LowRankLinear)):
        new = LowRankLinear(d, out, rank, bias=bias is not None)
        shapes = (rank, d), (out, rank)
    else:
        new = _low_rank_conv(module, out, rank, bias is not None)
        shapes = (rank, module.in_channels, *module.kernel_size), (out, rank, 1, 1)
    requires_grad = reference.requires_grad
    like = dict(dtype=reference.dtype, device=reference.device, memory_format=torch.contiguous_format)
    new.down = nn.Parameter(down.reshape(shapes[0]).to(**like), requires_grad=requires_grad)
    new.up = nn.Parameter(up.reshape(shapes[1]).to(**like), requires_grad=requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return new, error


def pair_like(module: Factorizable, shape: tuple[int, int], rank: int) -> nn.Module:
    """A low-rank pair of `module`'s geometry (`shape`: out x d) at `rank` with random factors, in its
    dtype and on its device: what timing needs (a pair's cost does not depend on its values)."""
    out, d = shape
    bias = module.bias is not None
    reference = weight_of(module)
    new: LowRankLinear | LowRankConv2d
    if isinstance(module, (nn.Linear, LowRankLinear)):
        new = LowRankLinear(d, out, rank, bias=bias)
    else:
        new = _low_rank_conv(module, out, rank, bias)
    with torch.no_grad():
        for parameter in new.parameters():  # never uninitialised memory: denormals would time slowly
            parameter.normal_(0.0, 0.02)
    return new.to(dtype=reference.dtype, device=reference.device).eval()


def _low_rank_conv(module: nn.Conv2d | LowRankConv2d, out: int, rank: int, bias: bool) -> LowRankConv2d:
    """An empty LowRankConv2d with `module`'s geometry (a 2-d conv: its sizes are pairs)."""
    kernel, stride, dilation = (
        cast(Pair, size) for size in (module.kernel_size, module.stride, module.dilation)
    )
    padding = cast(Pair | str, module.padding)
    return LowRankConv2d(module.in_channels, out, kernel, rank, stride, padding, dilation, bias=bias)
