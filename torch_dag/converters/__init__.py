"""Into and out of the DAG: torch.fx conversion of any nn.Module."""

from .fx import build_from_unstructured_module

__all__ = ["build_from_unstructured_module"]
