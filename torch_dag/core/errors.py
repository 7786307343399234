"""The error types of torch_dag: every failure the toolkit reports is a `DagError`."""

from __future__ import annotations


class DagError(Exception):
    """Base class of every error torch_dag raises on purpose."""


class ConversionError(DagError):
    """A module could not be turned into a DagModule; the message names the fx node and module path."""


class VerifyError(DagError):
    """A DagModule breaks one of the graph invariants; the message names the vertex and op."""


class LoadError(DagError):
    """A saved DAG is malformed, truncated, tampered with or uses an op outside the vocabulary."""


class UnknownOpError(DagError, KeyError):
    """An op name is not in the registered vocabulary."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])
