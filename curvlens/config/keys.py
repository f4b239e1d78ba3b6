"""Checks every config reader applies to a YAML mapping: its keys, its parameter
mappings, its dtypes. One wording for every level of a config."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from curvlens.errors import CurvlensError

__all__ = ["check_keys", "parameter_mapping", "config_dtypes"]


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
