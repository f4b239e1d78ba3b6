"""Name tensors by pattern: which tensors a merge leaves out or takes from one
model, and which an analysis excludes.

A pattern is one string, in one of four forms:

``classifier``
    No wildcard: a substring of the name, as mergekit's ``filter`` matches
    (``classifier`` matches ``classifier.weight`` and ``classifier.bias``).
``*.pooler.*``
    With ``*``, ``?`` or ``[``: a shell-style glob over the whole name.
``role:lm_head``
    Every tensor of a role of :func:`curvlens.roles.param_role`
    (``embed, q, k, v, qkv, o, gate, up, down, norm, lm_head, other``).
``name:bert.pooler.dense.weight``
    Exactly that name.

Real fine-tunes need this: each task's classifier head and an unused pooler are
not part of the shared model, yet merged like any tensor they dominate every
model-level number (the predicted loss of a merge above all).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from curvlens.errors import CurvlensError
from curvlens.roles import ROLES, param_role

_GLOB = set("*?[")


def _check_pattern(p: object) -> str:
    if not isinstance(p, str) or not p.strip():
        raise CurvlensError(f"a tensor pattern must be a non-empty string; got {p!r}")
    if p.startswith("role:") and p[5:] not in ROLES:
        raise CurvlensError(f"pattern {p!r}: unknown role {p[5:]!r}; roles are {list(ROLES)}")
    if p.startswith("name:") and not p[5:]:
        raise CurvlensError(f"pattern {p!r}: 'name:' needs a tensor name")
    return p


def matches(pattern: str, name: str) -> bool:
    """Whether tensor ``name`` matches one ``pattern`` (the forms of this module).

    Examples
    --------
    >>> matches("classifier", "classifier.weight"), matches("*.pooler.*", "bert.pooler.dense.bias")
    (True, True)
    >>> matches("role:q", "bert.encoder.layer.0.attention.self.query.weight")
    True
    >>> matches("name:classifier.weight", "classifier.weight.extra")
    False
    """
    if pattern.startswith("role:"):
        return param_role(name)[1] == pattern[5:]
    if pattern.startswith("name:"):
        return name == pattern[5:]
    if _GLOB & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


@dataclass(frozen=True)
class TensorFilter:
    """A set of patterns; a name is matched when any pattern matches it.

    Parameters
    ----------
    patterns : tuple of str
        Patterns in the forms of :mod:`curvlens.tensor_filter`.

    Examples
    --------
    >>> f = TensorFilter.of(["classifier", "role:embed"])
    >>> [n for n in ["classifier.bias", "bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight"] if f(n)]
    ['classifier.bias', 'bert.embeddings.word_embeddings.weight']
    >>> bool(TensorFilter.of(None))
    False
    """

    patterns: tuple[str, ...] = ()
    names: frozenset = frozenset()  # exact names, matched in O(1) (a merge's own bookkeeping)
    rules: tuple[tuple[str, str], ...] = ()  # matched where the first matching rule's action is not "merge"

    @classmethod
    def of(cls, patterns: TensorFilter | str | Iterable[str] | None) -> TensorFilter:
        """A filter from a filter, one pattern, a list of patterns or None (matches nothing)."""
        if isinstance(patterns, TensorFilter):
            return patterns
        if patterns is None:
            return cls()
        if isinstance(patterns, str):
            patterns = [patterns]
        try:
            items = list(patterns)
        except TypeError:
            raise CurvlensError(f"tensor patterns must be a string or a list of strings; got {patterns!r}") from None
        return cls(tuple(dict.fromkeys(_check_pattern(p) for p in items)))

    @classmethod
    def exact(cls, names: Iterable[str]) -> TensorFilter:
        """A filter matching exactly these names."""
        return cls((), frozenset(names))

    @classmethod
    def not_merged(cls, rules) -> TensorFilter:
        """The tensors a merge's ``tensors`` rules (:func:`tensor_actions`) do not
        merge: they need not line up across the models.

        Examples
        --------
        >>> f = TensorFilter.not_merged([("classifier.bias", "merge"), ("classifier", "drop")])
        >>> f("classifier.bias"), f("classifier.weight"), f("body.weight")
        (False, True, False)
        """
        pairs = tuple((_check_pattern(p), a) for p, a in _rule_pairs(rules))
        return cls(rules=pairs)

    def __call__(self, name: str) -> bool:
        if name in self.names or any(matches(p, name) for p in self.patterns):
            return True
        action = next((a for p, a in self.rules if matches(p, name)), "merge")
        return action != "merge"

    def __bool__(self) -> bool:
        return bool(self.patterns) or bool(self.names) or any(a != "merge" for _, a in self.rules)

    def __or__(self, other: TensorFilter) -> TensorFilter:
        other = TensorFilter.of(other)
        return TensorFilter(tuple(dict.fromkeys(self.patterns + other.patterns)), self.names | other.names,
                            self.rules + other.rules)

    def select(self, names: Iterable[str]) -> list[str]:
        """The names this filter matches, in order."""
        return [n for n in names if self(n)]

    def unused(self, names: Iterable[str]) -> list[str]:
        """Patterns that match none of ``names`` (a typo the caller should hear of)."""
        names = list(names)
        known = set(names)
        return [p for p in self.patterns + tuple(p for p, _ in self.rules)
                if not any(matches(p, n) for n in names)] + sorted(f"name:{n}" for n in self.names - known)


def _rule_pairs(rules) -> list:
    return list(rules.items()) if hasattr(rules, "items") else list(rules or [])


def tensor_actions(rules, names: Iterable[str], sources: Iterable[str]) -> dict[str, str]:
    """What a merge does with each tensor: ``"merge"``, ``"drop"`` or the model it
    is taken from unchanged (``"base"`` or an expert's name).

    Parameters
    ----------
    rules : mapping or list of (pattern, action), optional
        Ordered; the first pattern that matches a name decides. Actions:
        ``"merge"``, ``"drop"`` (left out of the merged model), ``"base"``, or an
        expert name (the tensor is copied from that model).
    names : iterable of str
        Every tensor name.
    sources : iterable of str
        The valid copy sources (``"base"`` when there is one, the expert names).

    Examples
    --------
    >>> tensor_actions({"classifier": "drop", "role:embed": "base"},
    ...                ["classifier.weight", "embed_tokens.weight", "layers.0.q_proj.weight"], ["base", "a"])
    {'classifier.weight': 'drop', 'embed_tokens.weight': 'base', 'layers.0.q_proj.weight': 'merge'}
    """
    pairs = _rule_pairs(rules)
    valid = {"merge", "drop", *sources}
    checked = []
    for item in pairs:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise CurvlensError(f"tensors: each rule is (pattern, action); got {item!r}")
        pattern, action = _check_pattern(item[0]), item[1]
        if action not in valid:
            raise CurvlensError(f"tensors: rule {pattern!r} -> {action!r}: the action must be 'merge', "
                                f"'drop' or a model to take the tensor from, one of {sorted(valid - {'merge', 'drop'})}")
        checked.append((pattern, action))
    names = list(names)
    unused = [p for p, _ in checked if not any(matches(p, n) for n in names)]
    if unused:
        raise CurvlensError(f"tensors: pattern(s) {unused} match no tensor of the models")
    out = {}
    for n in names:
        out[n] = next((a for p, a in checked if matches(p, n)), "merge")
    return out
