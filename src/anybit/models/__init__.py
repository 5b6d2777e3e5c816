"""Model loading and architecture adapters."""

from .adapters import ADAPTERS, Adapter, get_adapter, supported_model_types
from .loader import BUILTIN, DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["ADAPTERS", "Adapter", "BUILTIN", "DEFAULT_MODEL", "LoadedModel", "get_adapter", "load_model",
           "supported_model_types"]
