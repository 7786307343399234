"""torch-dag: convert any nn.Module to a DAG of atomic ops, save it without source, transform it.

import torch_dag as td
dag = td.build_from_unstructured_module(model)
td.save(dag, "model.dag"); dag = td.load("model.dag")
"""

from . import flex, latency, passes, pruning
from . import nas as nas
from .analysis import FlopReport, count_flops
from .analysis.latency import (
    Latency,
    LatencyComparison,
    compare_latency,
    measure_latency,
    steady_allocator,
)
from .converters import build_from_unstructured_module
from .converters.onnx import OnnxExportError, export_onnx
from .core import (
    ConversionError,
    DagError,
    DagModule,
    LoadError,
    Ref,
    UnknownOpError,
    VerifyError,
    Vertex,
    known_ops,
    register_module_op,
    verify,
)
from .finetuning import FinetuneConfig, FinetuneReport, finetune, recalibrate_batchnorm
from .finetuning.train_prune import TrainPruneConfig, TrainPruneReport, train_prune
from .flex import make_flexible
from .latency import LatencyTable, latency_table
from .passes import factorize
from .pruning import prune
from .serde import SCHEMA_VERSION, load, save

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "ConversionError",
    "DagError",
    "DagModule",
    "FinetuneConfig",
    "FinetuneReport",
    "FlopReport",
    "Latency",
    "LatencyComparison",
    "LatencyTable",
    "LoadError",
    "OnnxExportError",
    "Ref",
    "TrainPruneConfig",
    "TrainPruneReport",
    "UnknownOpError",
    "VerifyError",
    "Vertex",
    "build_from_unstructured_module",
    "compare_latency",
    "count_flops",
    "export_onnx",
    "factorize",
    "finetune",
    "flex",
    "known_ops",
    "latency",
    "latency_table",
    "load",
    "make_flexible",
    "measure_latency",
    "nas",
    "passes",
    "prune",
    "pruning",
    "recalibrate_batchnorm",
    "register_module_op",
    "save",
    "steady_allocator",
    "train_prune",
    "verify",
]
