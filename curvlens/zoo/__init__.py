"""The embedded demo expert zoo: a tiny Llama base, capability experts, evaluation.

``load`` (or ``build``) trains, or reuses from the cache, a base model and four experts, math,
code, instruction following and knowledge recall, each saved in the paper's release
layout with its Adam ``exp_avg_sq``; ``evaluate`` scores any model on the zoo's
held-out prompts, and ``Zoo.score({label: model})`` makes a merge table (the base's
and experts' scores are evaluated once and stored with the zoo). See ``docs/zoo.md`` for the task designs and measured scores.

Examples
--------
>>> import curvlens as cl                                      # doctest: +SKIP
>>> z = cl.zoo.load("quick")                                    # doctest: +SKIP
>>> z.score({"math expert": z.expert_dirs["math"]})             # doctest: +SKIP
"""
import importlib.util

_missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
if _missing:  # the zoo trains real HF models; the rest of curvlens does not need these
    raise ImportError(
        f"curvlens.zoo needs {' and '.join(_missing)}; install with: pip install 'curvlens[zoo]'"
    )

from curvlens.zoo.build import Zoo, ZooEvaluator, build, evaluate, load
from curvlens.zoo.config import EXPERT_CAPABILITIES, PRESETS, ZooConfig
from curvlens.zoo.fisher_study import fisher_study, training_batches

__all__ = ["EXPERT_CAPABILITIES", "PRESETS", "Zoo", "ZooConfig", "ZooEvaluator", "build", "evaluate", "fisher_study",
           "load", "training_batches"]
