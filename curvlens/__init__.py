"""curvlens: see why a model merge works, then run it, using the experts' curvature.

The public surface is small; everything else lives in layered modules:
``curvlens.io`` (read/write), ``curvlens.math`` (pure tensor functions),
``curvlens.streams`` (model-wide passes), ``curvlens.zoo`` (the embedded demo experts).
"""
from curvlens.errors import CurvlensError
from curvlens.io import Checkpoint, Moments, export_moments, write_model
from curvlens.roles import ROLES, param_role
from curvlens.streams import Expert, Experts

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CurvlensError", "Expert", "Experts", "Moments", "ROLES",
    "export_moments", "param_role", "write_model", "__version__",
]
