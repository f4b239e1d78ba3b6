"""Parameter schema of merge methods: :class:`ParamSpec`, the validators that convert
and check one value (naming the parameter when it fails), :func:`check_value_forms`
(every value a setting can take in any of mergekit's forms, checked up front),
and the parameters several methods share (mergekit 0.1.5 names and defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from curvlens.errors import CurvlensError, check_choice

Validator = Callable[[str, Any], Any]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method.

    Attributes
    ----------
    name : str
        Name as written in a merge config.
    default : Any
        Value used when the config does not give one.
    description : str
        One line for humans (shown by :func:`list_methods`).
    per_expert : bool
        May be given per expert, as a list with one value per expert or as one
        value that is broadcast. Resolved to a list of length ``n_experts``.
    choices : tuple or None
        Allowed values, if the parameter is categorical.
    validate : callable or None
        ``validate(label, value) -> value``: converts and checks one value,
        raising :class:`CurvlensError` that names ``label``.
    aliases : tuple of str
        Other accepted names (e.g. the OTA fork's name for the same setting).
    """

    name: str
    default: Any
    description: str
    per_expert: bool = False
    choices: Optional[tuple] = None
    validate: Optional[Validator] = field(default=None, compare=False, repr=False)
    aliases: tuple = ()



def check_value_forms(spec: ParamSpec, label: str, value: Any) -> None:
    """Check every value ``value`` can give a tensor, in any of mergekit's forms.

    A setting is a scalar, a gradient (a list of scalars: each entry, and so
    every value interpolated between two of them, is checked) or a list of
    ``{filter, value}`` conditions (each condition's value, itself a scalar or a
    gradient, is checked whether or not its filter matches a tensor). Each scalar
    goes through the spec's validator and choices, so a bad value fails when the
    config is read, naming where, never half-way through a merge.

    Examples
    --------
    >>> check_value_forms(DENSITY, "density", [{"filter": "mlp", "value": [0.2, 1.5]}, {"value": 0.5}])
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: density[0].value[1] must be <= 1.0; got 1.5
    """

    def one(where: str, x: Any) -> None:
        if spec.validate is not None:
            x = spec.validate(where, x)
        if spec.choices is not None:
            check_choice(where, x, spec.choices)

    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        one(label, value)
        return
    for i, item in enumerate(value):
        if isinstance(item, dict):
            inner = item.get("value")
            if isinstance(inner, list):
                for j, x in enumerate(inner):
                    one(f"{label}[{i}].value[{j}]", x)
            else:
                one(f"{label}[{i}].value", inner)
        else:
            one(f"{label}[{i}]", item)


def per_tensor_keys(tensor_params: Any, names) -> list[str]:
    """The parameters a merge's ``tensor_params`` sets per tensor: its ``keys``
    when it says (a config's resolver), else the keys it returns for the first of
    ``names``; ``[]`` without one.

    Examples
    --------
    >>> per_tensor_keys(lambda name: {"t": 0.5}, ["w"])
    ['t']
    """
    if tensor_params is None:
        return []
    if not callable(tensor_params):
        raise CurvlensError(f"tensor_params must be a callable name -> {{param: value}}; got {tensor_params!r}")
    keys = getattr(tensor_params, "keys", None)
    if keys is None or callable(keys):
        first = next(iter(names), None)
        keys = tensor_params(first) if first is not None else {}
        if not isinstance(keys, dict):
            raise CurvlensError(f"tensor_params({first!r}) returned a {type(keys).__name__}; expected a dict "
                                "param -> value")
    return [k for k in keys if isinstance(k, str)]


# -- validators: each converts one value and names the parameter when it fails


def real(
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    allow_none: bool = False,
) -> Validator:
    """Validator for a finite real number, optionally bounded (``hi`` closed)."""

    def check(label: str, value: Any) -> Any:
        if value is None and allow_none:
            return None
        x = _to_float(label, value, allow_none)
        if lo is not None and (x < lo or (lo_open and x == lo)):
            raise CurvlensError(
                f"{label} must be {'>' if lo_open else '>='} {lo}{_upper(hi)}; got {value!r}"
            )
        if hi is not None and x > hi:
            raise CurvlensError(f"{label} must be <= {hi}; got {value!r}")
        return x

    return check


def _upper(hi: Optional[float]) -> str:
    return "" if hi is None else f" and <= {hi}"


def _to_float(label: str, value: Any, allow_none: bool) -> float:
    # YAML 1.1 loaders (PyYAML) read exponent-only literals such as 1e-26 as
    # strings; mergekit and the OTA fork coerce them, so curvlens does too.
    expected = "a real number" + (" or None" if allow_none else "")
    if isinstance(value, bool):
        raise CurvlensError(f"{label} must be {expected}; got {value!r}")
    if isinstance(value, str):
        try:
            x = float(value.strip())
        except ValueError:
            raise CurvlensError(f"{label} must be {expected}; got {value!r}") from None
    elif isinstance(value, (int, float)):
        x = float(value)
    else:
        raise CurvlensError(f"{label} must be {expected}; got {value!r}")
    if not math.isfinite(x):
        raise CurvlensError(f"{label} must be finite; got {value!r}")
    return x


def boolean(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise CurvlensError(f"{label} must be true or false; got {value!r}")
    return value


def int_at_least(lo: int, *, allow_none: bool = False) -> Validator:
    def check(label: str, value: Any) -> Any:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            extra = " or None" if allow_none else ""
            raise CurvlensError(f"{label} must be an int >= {lo}{extra}; got {value!r}")
        return value

    return check


def lower_str(label: str, value: Any) -> str:
    # The OTA fork lower-cases `normalise`; accept 'Global' as it does.
    if not isinstance(value, str):
        raise CurvlensError(f"{label} must be a string; got {value!r}")
    return value.strip().lower()


def path_or_none(label: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise CurvlensError(f"{label} must be a path string or None; got {value!r}")
    return value


def false_only(label: str, value: Any) -> bool:
    value = boolean(label, value)
    if value:
        raise CurvlensError(
            f"{label}=True (the OTA fork's hybrid-norm rescaling of masked task vectors) "
            "is not implemented in curvlens; expected False"
        )
    return value


# -- parameters several methods share (mergekit 0.1.5 names and defaults)

WEIGHT = ParamSpec(
    "weight", 1.0, "Weight of each expert (mergekit requires it; curvlens defaults to 1).",
    per_expert=True, validate=real(),
)
DENSITY = ParamSpec(
    "density", 1.0, "Fraction of each task vector's entries kept, in (0, 1].",
    per_expert=True, validate=real(lo=0.0, lo_open=True, hi=1.0),
)
LAMBDA = ParamSpec("lambda", 1.0, "Scale of the merged task vector.", validate=real())
INT8_MASK = ParamSpec(
    "int8_mask", False,
    "mergekit's memory option for the sign mask; no numeric effect (curvlens masks are bool).",
    validate=boolean,
)
SEED = ParamSpec(
    "seed", 0, "Seed of the drop masks when no rng is passed (the driver derives one per tensor).",
    validate=int_at_least(0),
)


def normalize_param(default: bool) -> ParamSpec:
    return ParamSpec(
        "normalize", default, "Divide the weighted sum by the sum of the weights.",
        validate=boolean,
    )


def rescale_param(default: bool) -> ParamSpec:
    return ParamSpec(
        "rescale", default,
        "Rescale each sparsified task vector to its original L1 norm (mergekit's rescale).",
        validate=boolean,
    )
