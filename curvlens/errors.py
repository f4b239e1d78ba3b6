"""The one exception type curvlens raises for bad input, and a validation helper."""
from __future__ import annotations

from typing import Any, Iterable


class CurvlensError(Exception):
    """Bad input to curvlens: the message says which file, tensor or expert and
    what was expected versus what was found."""


def check_choice(param: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise a CurvlensError
    naming the parameter, the allowed values and the value received.

    Examples
    --------
    >>> check_choice("normalise", "none", ["none", "global"])
    'none'
    """
    allowed = list(allowed)
    if value not in allowed:
        raise CurvlensError(
            f"{param}={value!r} is not valid; expected one of {', '.join(map(repr, allowed))}"
        )
    return value
