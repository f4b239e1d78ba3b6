"""Values for the property tests, drawn from each parameter's own schema."""
from __future__ import annotations

from curvlens import CurvlensError

#: Parameters the merge driver sets itself (never given by a user).
DRIVER_SET = {"ffg_threshold", "ffg_ties", "tensor_name", "preconditioner_path"}
#: Values tried for a parameter: those its validator accepts (and are not its default) are drawn.
POOL = [0.05, 0.3, 0.5, 0.8, 1.0, 1.5, 2, 3, True, False, "none", "global", "precond", "linear", "ties"]
#: Values no parameter of any method accepts (each refused by every validator).
NEVER = [float("nan"), float("inf"), "abc", [1, [2]], {"x": 1}]
#: Values some validators refuse: tried against each spec, kept where refused.
MAYBE_BAD = [-1.0, -0.5, 0.0, 1.5, 2, True, False, 0.5, "none", None]


def _passes(spec, value) -> bool:
    try:
        got = spec.validate(spec.name, value) if spec.validate is not None else value
    except CurvlensError:
        return False
    return spec.choices is None or got in spec.choices


def accepted_values(spec) -> list:
    """Values of :data:`POOL` the spec accepts, other than its default."""
    return [v for v in POOL if _passes(spec, v) and (spec.validate or (lambda _, x: x))(spec.name, v) != spec.default]


def refused_values(spec) -> list:
    """Values the spec refuses: :data:`NEVER`, and those of :data:`MAYBE_BAD` it refuses."""
    return list(NEVER) + [v for v in MAYBE_BAD if not _passes(spec, v)]
