"""Layer 1, I/O: lazy readers of weights and second moments, and an atomic writer."""
from curvlens.io.checkpoint import Checkpoint
from curvlens.io.export import export_moments
from curvlens.io.moments import Moments
from curvlens.io.writer import ModelWriter, write_model

__all__ = ["Checkpoint", "Moments", "export_moments", "ModelWriter", "write_model"]
