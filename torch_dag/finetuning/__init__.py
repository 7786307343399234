"""Distillation finetuning of compressed DagModules (`finetune`, `distill.py`) and batchnorm
recalibration (`recalibrate_batchnorm`)."""

from .batchnorm import recalibrate_batchnorm
from .config import FinetuneConfig, FinetuneReport, Optimizer, Schedule
from .distill import finetune

__all__ = ["FinetuneConfig", "FinetuneReport", "Optimizer", "Schedule", "finetune", "recalibrate_batchnorm"]
