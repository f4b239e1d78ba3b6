"""The embedded demo expert zoo: a tiny Llama base, capability experts, evaluation.

``build`` trains (or reuses from the cache) a base model and four experts, math,
code, instruction following and knowledge recall, each saved in the paper's release
layout with its Adam ``exp_avg_sq``; ``evaluate`` scores any model on the zoo's
held-out prompts. See ``docs/zoo.md`` for the task designs and measured scores.

Examples
--------
>>> import curvlens.zoo as zoo                                 # doctest: +SKIP
>>> z = zoo.build("quick")                                      # doctest: +SKIP
>>> zoo.evaluate(z.expert_dirs["math"], zoo=z)                  # doctest: +SKIP
"""
import importlib.util

_missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
if _missing:  # the zoo trains real HF models; the rest of curvlens does not need these
    raise ImportError(
        f"curvlens.zoo needs {' and '.join(_missing)}; install with: pip install 'curvlens[zoo]'"
    )

from curvlens.zoo.build import Zoo, build
from curvlens.zoo.config import EXPERT_CAPABILITIES, PRESETS, ZooConfig
from curvlens.zoo.evaluate import evaluate

__all__ = ["EXPERT_CAPABILITIES", "PRESETS", "Zoo", "ZooConfig", "build", "evaluate"]
