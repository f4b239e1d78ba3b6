"""``chat_template`` as mergekit reads it, without mergekit: ``auto``, a template
name, or a Jinja template.

mergekit 0.1.5 ships five named templates (``alpaca``, ``chatml``, ``exaone``,
``llama3``, ``mistral``). curvlens carries its own text for each of them
(``curvlens/config/templates/NAME.jinja``, written for curvlens, not copied), and
each renders exactly what mergekit's renders under transformers' chat-template
environment (``trim_blocks``, ``lstrip_blocks``), whitespace and errors included:
``tests/config/test_chat_template.py`` compares them on a broad set of
conversations. A name is only ever looked up in that set (a name is letters,
digits, ``_`` and ``-``: no path separator or dot, so nothing outside the package
is read).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from importlib import resources

from curvlens.errors import CurvlensError

#: The template names curvlens carries: those mergekit 0.1.5 ships.
SHIPPED_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def shipped_template(name: str) -> str:
    """The Jinja text of a named template curvlens carries.

    Examples
    --------
    >>> "<|im_start|>" in shipped_template("chatml")
    True
    >>> shipped_template("../secrets")
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: chat_template '../secrets' is not a template name (letters, digits, _, -); the names curvlens carries are alpaca, chatml, exaone, llama3, mistral
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CurvlensError(f"chat_template {name!r} is not a template name (letters, digits, _, -); "
                            f"the names curvlens carries are {', '.join(SHIPPED_TEMPLATES)}")
    if name not in SHIPPED_TEMPLATES:
        raise CurvlensError(f"chat_template {name!r} is not a template curvlens carries; "
                            f"expected one of {', '.join(SHIPPED_TEMPLATES)}, 'auto' or a Jinja template")
    return resources.files("curvlens.config").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


def chat_template_text(value: str, model_templates: Iterable[str] = ()) -> str | None:
    """mergekit's reading of ``chat_template``.

    Parameters
    ----------
    value : str
        ``"auto"``: the template most of the models share (None when none has
        one); a name (short, one line, no ``{``): one of
        :data:`SHIPPED_TEMPLATES`; else a Jinja template (at least 20 characters
        with a ``{``).
    model_templates : iterable of str
        The models' own templates, read only for ``auto``.

    Examples
    --------
    >>> chat_template_text("auto", ["{{ a }}", " {{ b }}", "{{ b }}"])
    '{{ b }}'
    >>> chat_template_text("{% for m in messages %}{{ m.content }}{% endfor %}")[:6]
    '{% for'
    """
    if value == "auto":
        found = [t.strip() for t in model_templates if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        return shipped_template(value)
    if len(value) < 20 or "{" not in value:
        raise CurvlensError(f"chat_template {value[:40]!r} is neither 'auto', a template name "
                            f"({', '.join(SHIPPED_TEMPLATES)}) nor a Jinja template")
    return value
