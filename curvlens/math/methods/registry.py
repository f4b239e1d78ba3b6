"""The registry of merge methods: what a method is (:class:`MergeMethod`), how it is
added (:func:`register`), found (:func:`get_method`, :func:`list_methods`) and how
its parameters are completed and checked (:func:`resolve_params`).

Every method is a pure function of one tensor name::

    method(base, experts, moments, *, rng=None, counts=None, **params) -> Tensor

``base`` is the base model's tensor (``None`` where the method allows it),
``experts`` the experts' tensors, ``moments`` their Adam second moments (or
``None``), ``rng`` a ``torch.Generator`` for methods that draw random masks,
``counts`` a :class:`MaskCounts` that masking methods add their kept entries to.
The registry does the part every method shares (input checks, parameter
resolution, the generator) once; a method's own kernel is only its math.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from curvlens.errors import CurvlensError, check_choice
from curvlens.math.methods.inputs import check_arity, check_inputs, generator
from curvlens.math.methods.params import ParamSpec

Tensor = torch.Tensor


@dataclass(frozen=True)
class ModelWideSelection:
    """A method parameter that asks for a share of each expert's entries over the
    *whole model* (e.g. OTA's ``ffg_density``).

    A per-tensor function cannot see the whole model, so the streaming driver
    makes the selection first (:func:`curvlens.passes.thresholds.model_selections`)
    and hands every tensor its part: the k-th largest score in ``threshold`` and
    that tensor's share of the entries tied with it in ``ties``. The driver reads
    only this declaration, never a method's name.

    Attributes
    ----------
    density, threshold, ties : str
        Names of the per-expert parameters: the model-wide density asked for, the
        score threshold and the per-tensor tie quota the driver fills in.
    criterion : str
        The score (``"fisher"``: ``v * tau**2``; ``"magnitude"``: ``|tau|``).
    rank1, rank : str or None
        Parameters that compress the moments the scores use (one value for all
        experts when a model-wide density is used).
    """

    density: str
    threshold: str
    ties: str
    criterion: str = "fisher"
    rank1: Optional[str] = None
    rank: Optional[str] = None


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its kernel and parameter schema.

    Calling it, ``method(base, experts, moments=None, *, rng=None, counts=None,
    **params)``, runs the prologue every method shares (input checks, parameter
    resolution, the random generator) and then the kernel; an empty tensor
    (a zero-size dim) gives an empty fp32 tensor without reaching the kernel.

    Attributes
    ----------
    kernel : callable
        ``kernel(base, experts, moments, p, *, rng, counts) -> Tensor`` on checked
        inputs in their stored dtypes and resolved parameters ``p``.
    needs_base : bool
        True: the method requires a base tensor. False: base is optional
        (``ota``) or ignored (``linear``, ``fisher``).
    needs_moments : bool
        True: the method requires the experts' second moments.
    uses_rng : bool
        True: the method draws random masks (from ``rng``, else from its ``seed``).
    model_wide : ModelWideSelection or None
        A parameter the driver turns into a model-wide selection first.
    min_experts, max_experts : int, int or None
        How many experts the method takes (None: no upper bound), e.g. ``slerp``
        exactly 1 (besides its base), ``nuslerp`` exactly 2.
    allows_base : bool
        False: the method refuses a base tensor (``passthrough``).
    name_param : str or None
        A parameter the driver sets to each tensor's name (for rules that depend
        on what a tensor is, such as the OTA fork's treatment of embeddings).
    base_role : str
        What a config's ``base_model`` is to the method: ``"reference"`` (the
        point task vectors start from; a base listed under ``models`` is left
        out, as mergekit and the OTA fork do), ``"input"`` (one more model
        averaged, as mergekit's ``linear`` includes it) or ``"ignored"``.
    """

    name: str
    kernel: Callable[..., Tensor]
    params: tuple
    description: str
    needs_base: bool
    needs_moments: bool = False
    uses_rng: bool = False
    model_wide: Optional[ModelWideSelection] = None
    min_experts: int = 1
    max_experts: Optional[int] = None
    allows_base: bool = True
    name_param: Optional[str] = None
    base_role: str = "reference"

    def __call__(self, base, experts, moments=None, *, rng=None, counts=None, **params) -> Tensor:
        b, xs, vs = check_inputs(self.name, base, experts, moments, needs_base=self.needs_base,
                                 needs_moments=self.needs_moments)
        p = resolve_params(self, params, len(xs))
        check_arity(self, b is not None, len(xs))
        if xs[0].numel() == 0:  # nothing to merge: every method's answer is the empty tensor
            return torch.empty(xs[0].shape, dtype=torch.float32, device=xs[0].device)
        if self.uses_rng:
            rng = generator(rng, p["seed"], xs[0].device)
        return self.kernel(b, xs, vs, p, rng=rng, counts=counts)

    @property
    def fn(self) -> "MergeMethod":
        """The checked per-tensor function (the method itself)."""
        return self

    def param(self, name: str) -> ParamSpec:
        """Return the :class:`ParamSpec` called ``name``."""
        for spec in self.params:
            if spec.name == name:
                return spec
        raise CurvlensError(
            f"method {self.name!r} has no parameter {name!r}; "
            f"expected one of {', '.join(repr(p.name) for p in self.params)}"
        )


class MaskCounts:
    """Kept-entry counts of the masks a method applied to one tensor.

    Pass one as ``counts=`` to a method that masks task vectors (``ties``,
    ``dare_*``, ``ota``); it adds, per expert, how many entries it kept and how
    many entries some expert kept. ``used`` stays False when no mask was applied.
    The streaming driver reports these, so it never recomputes a mask.

    Examples
    --------
    >>> c = MaskCounts(2)
    >>> _ = get_method("ties").fn(torch.zeros(4), [torch.tensor([1.0, 2, 3, 4]), torch.ones(4)],
    ...                           None, density=0.5, counts=c)
    >>> c.kept, c.any_kept, c.used
    ([2, 2], 4, True)
    """

    def __init__(self, n_experts: int, tie_budget: bool = False):
        self.kept = [0] * n_experts
        self.any_kept = 0
        self.used = False
        #: Set by the driver of a one-read selection: its tie quotas are what is left
        #: model-wide, so a method keeps tied entries up to one and records what it
        #: left in ``ties_left``, instead of refusing a tensor with fewer ties.
        self.tie_budget = bool(tie_budget)
        self.ties_left: list[Optional[int]] = [None] * n_experts

    def add(self, masks: Sequence[Optional[Tensor]]) -> None:
        """Count one block's fp32 0/1 masks (None: that expert kept everything)."""
        if all(m is None for m in masks):
            return
        self.used = True
        length = next(m.numel() for m in masks if m is not None)
        if any(m is None for m in masks):
            self.any_kept += length
        else:  # float sums of 0/1 are exact for a block (< 2**24 entries)
            self.any_kept += int(torch.clamp_max(sum(masks), 1.0).sum())
        for i, m in enumerate(masks):
            self.kept[i] += length if m is None else int(m.sum())

    def add_totals(self, kept: Sequence[int], any_kept: int) -> None:
        """Count a whole tensor's masks from totals a kernel counted (per expert
        kept, and entries some expert kept)."""
        self.used = True
        self.any_kept += int(any_kept)
        for i, k in enumerate(kept):
            self.kept[i] += int(k)


_REGISTRY: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    params: Sequence[ParamSpec],
    description: str,
    needs_base: bool,
    needs_moments: bool = False,
    uses_rng: bool = False,
    model_wide: Optional[ModelWideSelection] = None,
    min_experts: int = 1,
    max_experts: Optional[int] = None,
    allows_base: bool = True,
    name_param: Optional[str] = None,
    base_role: str = "reference",
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator registering a kernel under ``name``; returns the kernel unchanged.

    The kernel, ``kernel(base, experts, moments, p, *, rng, counts)``, gets checked
    inputs and resolved parameters; callers use the :class:`MergeMethod` that
    :func:`get_method` returns, which runs the shared prologue first.

    Raises
    ------
    CurvlensError
        If ``name`` is already registered, two parameters share a name, or a
        ``uses_rng`` method has no ``seed`` parameter.
    """
    params = tuple(params)
    names = [p.name for p in params] + [a for p in params for a in p.aliases]
    if len(set(names)) != len(names):
        raise CurvlensError(f"method {name!r} declares a parameter name twice: {names}")
    if uses_rng and "seed" not in names:
        raise CurvlensError(f"method {name!r} draws random masks but has no 'seed' parameter")
    if name_param is not None and name_param not in names:
        raise CurvlensError(f"method {name!r}: name_param {name_param!r} is not one of its parameters")
    check_choice(f"method {name!r} base_role", base_role, ("reference", "input", "ignored"))

    def decorate(kernel: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in _REGISTRY:
            raise CurvlensError(f"merge method {name!r} is already registered")
        _REGISTRY[name] = MergeMethod(name=name, kernel=kernel, params=params, description=description,
                                      needs_base=needs_base, needs_moments=needs_moments, uses_rng=uses_rng,
                                      model_wide=model_wide, min_experts=min_experts,
                                      max_experts=max_experts, allows_base=allows_base,
                                      name_param=name_param, base_role=base_role)
        return kernel

    return decorate


def get_method(name: str) -> MergeMethod:
    """Return the registered method called ``name``.

    Raises
    ------
    CurvlensError
        If no method has that name; the message lists the known ones.

    Examples
    --------
    >>> get_method("ota").needs_moments
    True
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise CurvlensError(
            f"unknown merge method {name!r}; expected one of "
            f"{', '.join(repr(n) for n in sorted(_REGISTRY))}"
        ) from None


def list_methods():
    """Every registered merge method, one row each, with one line on what it does.

    Returns
    -------
    pandas.DataFrame
        ``method, description, needs_base, needs_moments, random, params`` (the
        parameter names, comma-separated; :func:`method_params` has them in full).

    Examples
    --------
    >>> df = list_methods()
    >>> list(df.columns)
    ['method', 'description', 'needs_base', 'needs_moments', 'random', 'params']
    >>> bool(df.set_index("method").loc["ota", "needs_moments"])
    True
    """
    import pandas as pd  # only needed here; the math itself is pandas-free

    rows = [{"method": m.name, "description": m.description, "needs_base": m.needs_base,
             "needs_moments": m.needs_moments, "random": m.uses_rng,
             "params": ", ".join(p.name for p in m.params)} for m in _REGISTRY.values()]
    return pd.DataFrame(rows, columns=["method", "description", "needs_base", "needs_moments", "random", "params"])


def method_params(method: Optional[str] = None):
    """Tidy table of the methods' parameters.

    Parameters
    ----------
    method : str, optional
        One method (default: all).

    Returns
    -------
    pandas.DataFrame
        One row per (method, parameter) with columns ``method, param, default,
        per_expert, description``.

    Examples
    --------
    >>> df = method_params()
    >>> list(df.columns)
    ['method', 'param', 'default', 'per_expert', 'description']
    >>> bool(((df.method == "ties") & (df.param == "density")).any())
    True
    """
    import pandas as pd

    methods = [get_method(method)] if method is not None else list(_REGISTRY.values())
    rows = [
        {
            "method": m.name,
            "param": p.name,
            "default": p.default,
            "per_expert": p.per_expert,
            "description": p.description,
        }
        for m in methods
        for p in m.params
    ]
    return pd.DataFrame(rows, columns=["method", "param", "default", "per_expert", "description"])


def resolve_params(
    method: Union[str, MergeMethod], params: Optional[Mapping[str, Any]], n_experts: int,
    *, per_tensor: Sequence[str] = (),
) -> dict:
    """Complete, check and broadcast a method's parameters.

    Parameters
    ----------
    method : str or MergeMethod
    params : mapping or None
        Parameters as given (a config's method parameters). Not modified.
    n_experts : int
        Number of experts being merged (the base is not an expert).
    per_tensor : sequence of str
        Parameters (names or aliases) whose value comes per tensor (a gradient or
        filter list, resolved for each tensor name): a value given here is still
        checked, but a missing one is not an error yet (each tensor's resolution
        checks it); they stand at their default in the result.

    Returns
    -------
    dict
        Every parameter of the method, defaults filled in, values converted
        (e.g. ``'1e-26'`` -> ``1e-26``), per-expert parameters as lists of
        length ``n_experts``. Aliases are replaced by canonical names.

    Raises
    ------
    CurvlensError
        For an unknown method or parameter (listing the valid ones), a value of
        the wrong type or out of range, a bad choice, a per-expert list of the
        wrong length, or a list given for a parameter that is not per expert.

    Examples
    --------
    >>> resolve_params("ties", {"density": 0.5}, 2)["density"]
    [0.5, 0.5]
    >>> resolve_params("ties", {"densty": 0.5}, 2)
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: unknown parameter 'densty' for merge method 'ties'; expected one of 'weight', 'density', 'normalize', 'lambda', 'rescale', 'int8_mask'
    """
    m = method if isinstance(method, MergeMethod) else get_method(method)
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise CurvlensError(f"n_experts must be an int >= 1; got {n_experts!r}")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise CurvlensError(
            f"params for merge method {m.name!r} must be a mapping; got {type(params).__name__}"
        )
    given = _canonical_names(m, params)
    later = set(_canonical_names(m, dict.fromkeys(per_tensor)))
    out = {}
    for spec in m.params:
        if spec.name in later and spec.name not in given:
            out[spec.name] = [spec.default] * n_experts if spec.per_expert else spec.default
            continue
        value = given.get(spec.name, spec.default)
        if spec.per_expert:
            out[spec.name] = _resolve_per_expert(m, spec, value, n_experts)
        else:
            if isinstance(value, (list, tuple)):
                raise CurvlensError(
                    f"{spec.name} of merge method {m.name!r} takes one value for all "
                    f"experts, not a list; got {value!r}"
                )
            out[spec.name] = _resolve_one(spec, spec.name, value)
    return out


def _canonical_names(m: MergeMethod, params: Mapping[str, Any]) -> dict:
    """Map given names (or aliases) to canonical names; reject unknown ones."""
    by_name = {}
    for spec in m.params:
        by_name[spec.name] = spec.name
        for alias in spec.aliases:
            by_name[alias] = spec.name
    given = {}
    for key, value in params.items():
        if key not in by_name:
            raise CurvlensError(
                f"unknown parameter {key!r} for merge method {m.name!r}; expected one of "
                f"{', '.join(repr(p.name) for p in m.params)}"
            )
        canonical = by_name[key]
        if canonical in given:
            raise CurvlensError(
                f"parameter {canonical!r} of merge method {m.name!r} is given twice "
                f"(under {canonical!r} and an alias); give it once"
            )
        given[canonical] = value
    return given


def _resolve_per_expert(m: MergeMethod, spec: ParamSpec, value: Any, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise CurvlensError(
                f"{spec.name} of merge method {m.name!r} needs one value per expert: "
                f"expected a list of length {n}, got length {len(value)}"
            )
        values = list(value)
    else:
        values = [value] * n
    return [_resolve_one(spec, f"{spec.name}[{i}]", v) for i, v in enumerate(values)]


def _resolve_one(spec: ParamSpec, label: str, value: Any) -> Any:
    if spec.validate is not None:
        value = spec.validate(label, value)
    if spec.choices is not None:
        check_choice(label, value, spec.choices)
    return value
