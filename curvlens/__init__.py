"""curvlens: see why a model merge works, then run it, using the experts' curvature.

The public surface is small; everything else lives in layered modules:
``curvlens.io`` (read/write), ``curvlens.math`` (pure tensor functions),
``curvlens.streams`` (model-wide passes), ``curvlens.views`` (figures),
``curvlens.zoo`` (the embedded demo experts).
"""
from curvlens.errors import CurvlensError
from curvlens.io import Checkpoint, Moments, export_moments, write_model
from curvlens.math.methods import list_methods
from curvlens.roles import ROLES, param_role
from curvlens.streams import Expert, Experts
from curvlens.streams.merge import MergeResult, merge
from curvlens.streams.merge_config import load_merge_config

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CurvlensError", "Expert", "Experts", "MergeResult", "Moments", "ROLES",
    "export_moments", "list_methods", "load_merge_config", "merge", "param_role", "write_model",
    "__version__",
]
