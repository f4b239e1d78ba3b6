"""Checks every config reader applies to a YAML mapping: its keys, its parameter
mappings, its dtypes, its ``tensors`` rules. One wording for every level of a config."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from curvlens.errors import CurvlensError

__all__ = ["check_keys", "parameter_mapping", "config_dtypes", "tensor_rules"]


def check_keys(value: Mapping, allowed: Iterable[str], where: str, *,
               refused: Mapping[str, str] | None = None, optional: bool = False) -> None:
    """Refuse the keys of ``value`` that ``refused`` names (with its reason), then
    any key not in ``allowed``.

    Examples
    --------
    >>> check_keys({"model": "a", "weight": 1}, ["model", "parameters"], "models[0]")
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: models[0]: unknown key(s) ['weight']; expected ['model', 'parameters']
    """
    for key, why in (refused or {}).items():
        if key in value:
            raise CurvlensError(f"{where}: {key!r}: {why}")
    extra = sorted(map(str, set(value) - set(allowed)))
    if extra:
        raise CurvlensError(f"{where}: unknown key(s) {extra}; expected {'some of ' if optional else ''}"
                            f"{sorted(allowed)}")


def parameter_mapping(value: Any, where: str) -> dict:
    """A ``parameters`` section as a dict of name -> value (empty when absent)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CurvlensError(f"{where} must be a mapping of parameter name -> value; got {value!r}")
    return dict(value)


def config_dtypes(cfg: Mapping, where: str) -> tuple[str | None, str | None]:
    """(written dtype, input dtype): mergekit reads inputs in ``dtype`` and writes
    ``out_dtype`` (default ``dtype``)."""
    for key in ("dtype", "out_dtype"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str):
            raise CurvlensError(f"{where}: dtype/out_dtype must be a string such as 'bfloat16'; got {v!r}")
    out_dtype = cfg.get("out_dtype") if cfg.get("out_dtype") is not None else cfg.get("dtype")
    return out_dtype, cfg.get("dtype")


def tensor_rules(value: Any, where: str, base, names_by_dir: dict, local) -> tuple[tuple[str, str], ...]:
    """The ``tensors`` section as (pattern, action) pairs, a model given by path
    turned into its expert name (or ``base``)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CurvlensError(f"{where}: 'tensors' must be a list of {{filter: PATTERN, action: ACTION}}")
    rules = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"filter", "action"}:
            raise CurvlensError(f"{where}: tensors[{i}] must be {{filter: PATTERN, action: merge | drop | base "
                                f"| a model}}; got {item!r}")
        action = item["action"]
        if not isinstance(action, str):
            raise CurvlensError(f"{where}: tensors[{i}].action must be a string; got {action!r}")
        if action not in ("merge", "drop", "base") and action not in names_by_dir.values():
            d = local(action, f"tensors[{i}].action")
            if base is not None and d == base:
                action = "base"
            elif d in names_by_dir:
                action = names_by_dir[d]
            else:
                raise CurvlensError(f"{where}: tensors[{i}].action {item['action']!r} is not the base or "
                                    "one of the models")
        rules.append((str(item["filter"]), action))
    return tuple(rules)
