"""FLOPs, params and kmapp per vertex and in total."""

from .flops import FlopReport, count_flops

__all__ = ["FlopReport", "count_flops"]
