"""What `factorize` did: a report per factorizable layer and the model's totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Allocation = Literal["error", "uniform"]  # least total error, or one rank fraction for every layer


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
    error: float | None = None  # normalized output error on held-out calibration data (or weight error)
    reason: str = ""  # why the layer was left whole ("" where it was factorized)
    solution: str = ""  # factorized: "data-aware", or "svd: " and why the truncated SVD was used

    @property
    def name(self) -> str:
        return self.vertices[0]


@dataclass
class FactorizationReport:
    """Per-layer ranks, errors and skip reasons of one `factorize` run, and the model's totals. With
    calibration the errors are held-out errors: measured on batches the solutions were not fitted on."""

    method: Literal["data-aware", "svd"]
    allocation: Allocation
    layers: list[LayerReport]
    flops_before: int = 0
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    # "held-out": each layer's normalized output error on the held-out calibration batches (never the
    # batches its solution was fitted on); "weight": the weight's relative error (no calibration)
    error_kind: Literal["weight", "held-out"] = field(default="weight")
    note: str = ""  # with calibration: the held-out output errors of both solutions, and which was kept

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
            *([self.note] if self.note else []),
            f"  {'vertex':40s} {'op':14s} {'out x d':>11s} {'rank':>11s} {'FLOPs kept':>10s} "
            f"{self.error_kind + ' err':>10s}  note",
        ]
        layers = sorted(self.layers, key=lambda layer: -layer.flops)[:top]
        for layer in layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            rank = f"{layer.rank}/{layer.full_rank}" if layer.rank is not None else f"-/{layer.full_rank}"
            kept = (
                f"{layer.flops_after / max(1, layer.flops):.1%}" if layer.flops_after is not None else "100%"
            )
            error = f"{layer.error:.4f}" if layer.error is not None else "-"
            lines.append(
                f"  {layer.name[:40]:40s} {layer.op[:14]:14s} {shape:>11s} {rank:>11s} {kept:>10s} "
                f"{error:>10s}  {layer.reason or layer.solution}"
            )
        return "\n".join(lines)
