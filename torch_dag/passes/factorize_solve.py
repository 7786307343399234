"""The solver behind `factorize`: each layer's spectrum (with or without calibration moments) and its
low-rank factors at a rank. See `factorize`'s module docstring for the mathematics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..analysis.activations import conv_geometry, input_rows
from ..core.dag import DagModule, evaluating
from ..core.lowrank import LowRankConv2d, LowRankLinear
from .factorize_report import LayerReport

JITTER = 1e-6  # input moments (d < out) get this fraction of their trace on the diagonal
Factorizable = nn.Linear | nn.Conv2d | LowRankLinear | LowRankConv2d  # the modules of FACTORIZABLE ops
Pair = tuple[int, int]


@dataclass(eq=False)
class Layer:
    """One factorizable layer (one module, however many vertices call it): its weight as a matrix, its
    spectrum once solved, and what each rank costs and loses."""

    module: Factorizable
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

    def solve(self, moment: Moment | None) -> None:
        """Left singular vectors of W L (most important first) and their squared singular values,
        where L L^T is the input moment (the identity without data). From the smaller Gram matrix with
        `eigh` (see `eigh`), much faster on the CPU than an SVD."""
        weight, d = self.weight, self.weight.shape[1]
        if self.records_outputs:  # eigenvectors of W C W^T (out x out): exact, no inversion
            gram = weight @ weight.T if moment is None else moment.value()
            self.energies, self._basis = eigh(gram)
            return
        # d < out: the d x d side, with L the Cholesky factor of C (+ jitter); G = L^T W^T W L
        self._wtw = gram = weight.T @ weight
        if moment is not None:
            covariance = moment.value()
            self.jitter = JITTER * max(covariance.trace().item(), 1e-30)
            self._chol = torch.linalg.cholesky(covariance + self.jitter * torch.eye(d, dtype=torch.float64))
            gram = self._chol.T @ gram @ self._chol
        self.energies, self._right = eigh(gram)

    def tails(self) -> np.ndarray:
        """tails[r] = the energy outside the first r directions (summed from the small end, so
        that tiny tails keep their precision)."""
        if self._tails is None:
            energies = _solved(self.energies).numpy()
            self._tails = np.concatenate([np.cumsum(energies[::-1])[::-1], [0.0]])
        return self._tails

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """U_r (out x r), the top left singular vectors of W L, and U_r^T W (r x d)."""
        if self._right is None:
            basis = _solved(self._basis)[:, :rank]
            return basis, basis.T @ self.weight
        # d < out: U_r = W L V_r / s_r, so U_r^T W = (L V_r)^T W^T W / s_r, from the d x d Gram matrix
        lift = self._right[:, :rank] if self._chol is None else self._chol @ self._right[:, :rank]
        norms = _solved(self.energies)[:rank].sqrt()
        lift = torch.where(norms > norms[0] * 1e-10, lift / norms, torch.zeros_like(lift))
        return self.weight @ lift, lift.T @ _solved(self._wtw)

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
            self._errors = (
                tails[1 : self.max_rank + 1] / tails[0] if tails[0] > 0 else np.zeros(self.max_rank)
            )
        return self._errors


def _solved(value: torch.Tensor | None) -> torch.Tensor:
    """A part of the spectrum that `Layer.solve` sets (None only before it ran)."""
    if value is None:
        raise RuntimeError("the layer's spectrum is read before Layer.solve computed it")
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
    """The running sum of rows^T rows, in float64: float32 sums would floor every tail energy at
    ~1e-7 of the total (a normalized error of ~3e-4 even for an exact low-rank weight)."""

    def __init__(self, size: int):
        self.sum = torch.zeros(size, size, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().double()
        self.sum.addmm_(rows.T, rows)

    def value(self) -> torch.Tensor:
        return (self.sum + self.sum.T) / 2


def record_moments(
    dag: DagModule, layers: list[Layer], batches: Sequence[tuple], progress: bool
) -> dict[tuple, Moment]:
    """Run the calibration batches once through the DAG, accumulating every layer's moment (layers
    that record inputs and read the same tensors the same way share one)."""
    moments: dict[tuple, Moment] = {}
    hooks = []

    def recorder(layer: Layer, moment: Moment):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            moment.add(layer.rows(args[0], output))

        return hook

    try:
        for layer in layers:
            if layer.records_outputs:
                layer.key = ("outputs", id(layer.module))
            if layer.key not in moments:
                moments[layer.key] = Moment(layer.moment_size)
                hooks.append(layer.module.register_forward_hook(recorder(layer, moments[layer.key])))
        with evaluating(dag), torch.no_grad():
            for batch in tqdm(batches, desc="factorize: calibration", unit="batch", disable=not progress):
                dag(*batch)
    finally:
        for handle in hooks:
            handle.remove()
    return moments


# --- solutions ------------------------------------------------------------------------------------


def factorized_module(layer: Layer, rank: int) -> tuple[nn.Module, float]:
    """The low-rank module of `layer` at `rank`, and its normalized error."""
    up, down = layer.factors(rank)
    error = _error(layer, down, rank)
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


def _low_rank_conv(module: nn.Conv2d | LowRankConv2d, out: int, rank: int, bias: bool) -> LowRankConv2d:
    """An empty LowRankConv2d with `module`'s geometry (a 2-d conv: its sizes are pairs)."""
    kernel, stride, dilation = (
        cast(Pair, size) for size in (module.kernel_size, module.stride, module.dilation)
    )
    padding = cast(Pair | str, module.padding)
    return LowRankConv2d(module.in_channels, out, kernel, rank, stride, padding, dilation, bias=bias)


def _error(layer: Layer, down: torch.Tensor, rank: int) -> float:
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
