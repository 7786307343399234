"""Latency as a cost model: per-vertex tables timed on the user's device, predicting any width assignment
(`latency_table`, `LatencyTable`); timing itself is `analysis.measure_latency`."""

from .build import latency_table
from .table import GroupInfo, LatencyModel, LatencyTable, VertexCost

__all__ = ["GroupInfo", "LatencyModel", "LatencyTable", "VertexCost", "latency_table"]
