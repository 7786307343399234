"""Placeholder replaced below."""
from dataclasses import dataclass


@dataclass
class FlopReport:
    total: int = 0


def count_flops(dag, *inputs):
    raise NotImplementedError
