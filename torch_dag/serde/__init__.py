"""Save and load DagModules: graph JSON + safetensors weights in one file, no pickle."""

from .format import SCHEMA_VERSION, load, save

__all__ = ["SCHEMA_VERSION", "load", "save"]
