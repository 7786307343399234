"""What `factorize` did: a report per factorizable layer and the model's totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Allocation = Literal["error", "uniform"]  # least total error, or one rank fraction for every layer


@dataclass(frozen=True)
class LayerTiming:
    """One measurement of `factorize(..., latency=...)`: the whole layer and its low-rank pair at `rank`,
    each called alone on an input of the layer's real shape, in interleaved rounds; medians in ms."""

    stage: Literal["probe", "chosen"]  # before allocation (at half the multiply-adds), or its rank
    rank: int
    whole_ms: float
    pair_ms: float
    device: str

    @property
    def pays(self) -> bool:
        return self.pair_ms < self.whole_ms

    def __str__(self) -> str:
        verdict = "pays" if self.pays else "does not pay"
        return (
            f"low-rank pair at rank {self.rank} measured {self.pair_ms:.4g} ms vs {self.whole_ms:.4g} ms "
            f"whole on {self.device}: {verdict}"
        )


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
    timings: list[LayerTiming] = field(default_factory=list)  # factorize(..., latency=...): measured

    @property
    def name(self) -> str:
        return self.vertices[0]

    @property
    def slower_at_chosen_rank(self) -> bool:
        """Left whole because its pair at the allocated rank measured no faster (the target is missed)."""
        return self.rank is None and bool(self.timings) and self.timings[-1].stage == "chosen"


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
    note: str = ""  # the held-out output errors of both solutions (calibration); what latency= changed

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
                f"{error:>10s}  {layer.reason or layer.solution}{_timed(layer)}"
            )
        return "\n".join(lines)


def _timed(layer: LayerReport) -> str:
    """A factorized layer's last measurement, where one was made (a skipped one says it in its reason)."""
    if layer.rank is None or not layer.timings:
        return ""
    last = layer.timings[-1]
    return f" ({last.pair_ms:.3g} ms vs {last.whole_ms:.3g} ms whole)"
