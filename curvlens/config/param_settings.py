"""mergekit's forms of a parameter value, resolved per tensor name.

A value in a merge config's ``parameters`` (top level or per model) is one of:

* a scalar: ``density: 0.5``;
* a *gradient*, a list of scalars: ``weight: [0, 0.3, 0.7, 1]``. A tensor in
  layer ``i`` of ``L`` layers sits at ``t = i / (L - 1)`` (``t = 1`` when
  ``L == 1``); tensors outside the layers (embeddings, final norm, LM head) sit
  at ``t = 0``. Numbers are interpolated linearly between the two neighbouring
  entries of the list; a list of booleans or strings takes entry
  ``int(t * (len - 1))``;
* conditions, ``[{filter: mlp, value: 0.5}, {value: 0}]`` (or one such
  mapping): the first whose ``filter`` is a substring of the tensor name (no
  ``filter``, or ``"*"``, matches every tensor) gives the value, itself a
  scalar or a gradient. When none matches, the value is left to the next scope.

Per-model values take precedence over top-level ones, which take precedence
over the method's default; a scope whose conditions match nothing falls
through. This is mergekit 0.1.5's ``evaluate_setting`` and
``resolve_parameter`` (``mergekit/config.py``, ``mergekit/parameter_resolver.py``)
and its planner's ``t`` (``mergekit/plan.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from curvlens.errors import CurvlensError
from curvlens.roles import param_role

_SCALARS = (bool, int, float, str)
_CONDITION_KEYS = {"filter", "value"}


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()  # "no value here": the next scope decides


def check_setting(where: str, key: str, value: Any) -> Any:
    """Check one config value has a form mergekit accepts; returns it unchanged.

    Raises :class:`CurvlensError` naming ``where`` and ``key`` otherwise (a
    condition with other keys than ``filter``/``value``, an empty gradient, a
    nested list)."""
    if value is None or isinstance(value, _SCALARS):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise CurvlensError(f"{where}: parameter {key!r} must be a value, a list of values (a gradient) "
                            f"or a list of {{filter: ..., value: ...}}; got {value!r}")
    if all(isinstance(v, _SCALARS) for v in value):
        return value
    if not any(isinstance(v, dict) for v in value):  # a gradient with an entry that is no value
        i, v = next((i, v) for i, v in enumerate(value) if not isinstance(v, _SCALARS))
        raise CurvlensError(f"{where}: parameter {key!r}[{i}]: a gradient's entries are values; got {v!r}")
    for i, cond in enumerate(value):
        if not isinstance(cond, dict):
            raise CurvlensError(f"{where}: parameter {key!r}[{i}]: mix of values and conditions; "
                                f"got {cond!r}")
        extra = sorted(set(cond) - _CONDITION_KEYS)
        if extra or "value" not in cond:
            raise CurvlensError(f"{where}: parameter {key!r}[{i}] must be {{filter: SUBSTRING, value: ...}} "
                                f"(filter optional); got keys {sorted(cond)}")
        f = cond.get("filter")
        if f is not None and not isinstance(f, str):
            raise CurvlensError(f"{where}: parameter {key!r}[{i}].filter must be a string; got {f!r}")
        inner = cond["value"]
        if isinstance(inner, (dict,)):
            raise CurvlensError(f"{where}: parameter {key!r}[{i}].value must be a value or a gradient; "
                                f"got {inner!r}")
        if isinstance(inner, list) and not all(isinstance(v, _SCALARS) for v in inner):
            j, v = next((j, v) for j, v in enumerate(inner) if not isinstance(v, _SCALARS))
            raise CurvlensError(f"{where}: parameter {key!r}[{i}].value[{j}]: a gradient's entries are values; "
                                f"got {v!r}")
        if isinstance(inner, list) and not inner:
            raise CurvlensError(f"{where}: parameter {key!r}[{i}].value is an empty list")
    return value


def is_constant(value: Any) -> bool:
    """True for a plain scalar (the same for every tensor)."""
    return value is None or isinstance(value, _SCALARS)


def setting_value(value: Any, name: str, t: float, convert: Callable[[Any], Any] = lambda x: x) -> Any:
    """The value of one setting for tensor ``name`` at layer fraction ``t``.

    ``convert`` turns one scalar into the parameter's type (a numeric string
    from YAML into a float); numbers are interpolated after it, other types
    picked. Returns :data:`UNSET` where conditions match nothing.

    Examples
    --------
    >>> setting_value([0, 0.3, 0.7, 1], "model.layers.1.mlp.up_proj.weight", 0.5)
    0.5
    >>> setting_value([{"filter": "mlp", "value": 0.5}, {"value": 0}], "model.layers.0.self_attn.q_proj.weight", 0.0)
    0
    """
    if value is None or isinstance(value, _SCALARS):
        return convert(value) if value is not None else UNSET
    if isinstance(value, dict):
        value = [value]
    if all(isinstance(v, _SCALARS) for v in value):
        values = [convert(v) for v in value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        if frac == 0 or values[i0] == values[i1]:
            return values[i0]  # an entry itself, its type kept (an int parameter stays an int)
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in value:
        f = cond.get("filter")
        if f is None or f == "*" or (name and f in name):
            return setting_value(cond["value"], name, t, convert)
    return UNSET


def layer_fraction(name: str, n_layers: int) -> float:
    """mergekit's ``t`` of a tensor: ``i / (L - 1)`` in layer ``i`` of ``L``
    (1 for a single layer), 0 outside the layers."""
    layer = param_role(name)[0]
    if layer is None:
        return 0.0
    if n_layers <= 1:
        return 1.0
    return layer / (n_layers - 1)


@dataclass(frozen=True)
class VaryingParams:
    """A merge config's parameters that vary by tensor, resolved per name.

    Calling it with a tensor name returns ``{param: value}`` for the varying
    parameters (a list per expert for per-expert ones), ready for
    :func:`curvlens.math.methods.resolve_params` beside the constant ones.

    Attributes
    ----------
    top : mapping
        Top-level settings of the varying parameters.
    per_model : sequence of mapping
        Each expert's settings of the varying parameters.
    per_expert : frozenset
        The parameters that take one value per expert.
    defaults : mapping
        The method's default of each varying parameter.
    n_layers : int
        Layers of the model (``t`` of :func:`layer_fraction`).
    convert : mapping
        Per parameter, a function turning a config scalar into its value.
    """

    top: Mapping[str, Any]
    per_model: Sequence[Mapping[str, Any]]
    per_expert: frozenset
    defaults: Mapping[str, Any]
    n_layers: int
    convert: Mapping[str, Callable[[Any], Any]]

    @property
    def keys(self) -> set:
        return set(self.top) | {k for mp in self.per_model for k in mp}

    def __call__(self, name: str) -> dict:
        t = layer_fraction(name, self.n_layers)
        out = {}
        for k in self.keys:
            conv = self.convert.get(k, lambda x: x)
            shared = setting_value(self.top.get(k), name, t, conv)
            if k in self.per_expert:
                values = []
                for mp in self.per_model:
                    v = setting_value(mp.get(k), name, t, conv)
                    values.append(self._or_default(k, shared if v is UNSET else v))
                out[k] = values
            else:
                out[k] = self._or_default(k, shared)
        return out

    def _or_default(self, key: str, value: Any) -> Any:
        return self.defaults.get(key) if value is UNSET else value


def number_converter(validate: Optional[Callable[[str, Any], Any]], key: str) -> Callable[[Any], Any]:
    """A converter for :func:`setting_value`: numeric strings become floats (as
    mergekit's validation does before interpolating), other values pass."""
    def convert(x: Any) -> Any:
        if isinstance(x, str) and validate is not None:
            try:
                y = validate(key, x)
            except CurvlensError:
                return x
            return y if isinstance(y, (int, float)) and not isinstance(y, bool) else x
        return x
    return convert
