"""Layer 3, streams: drive the tensor math over whole models, one name at a time."""
from curvlens.passes.experts import Expert, Experts, TensorGroup, resolve_device

__all__ = ["Expert", "Experts", "TensorGroup", "resolve_device"]
