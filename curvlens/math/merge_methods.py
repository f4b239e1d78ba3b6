"""Per-tensor merge methods and the registry that names them.

Every method is a pure function acting on one tensor name::

    fn(base, experts, moments, *, rng=None, **params) -> torch.Tensor

``base`` is the base model's tensor (``None`` where the method allows it),
``experts`` the experts' tensors, ``moments`` their Adam second moments (or
``None``), ``rng`` a ``torch.Generator`` for methods that draw random masks.
All arithmetic is fp32 and the result is an fp32 tensor on the inputs' device;
inputs are never modified. A method checks and completes its own parameters with
:func:`resolve_params`, so it is also correct when called directly; the streaming
driver resolves a config once and passes the resolved dict for every tensor.

Methods register themselves with :func:`register`; :func:`get_method`,
:func:`list_methods` and :func:`resolve_params` are what callers use. The exact
semantics, and where they match mergekit 0.1.5 and the OTA authors' fork, are
written down in ``docs/merge_methods.md``.

Examples
--------
>>> import torch
>>> base = torch.zeros(3)
>>> experts = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([3.0, 1.0, -1.0])]
>>> get_method("ties").fn(base, experts, None)
tensor([ 2., -2.,  3.])
>>> p = resolve_params("linear", {"weight": [1, 3]}, n_experts=2)
>>> p["weight"], p["normalize"]
([1.0, 3.0], True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from curvlens.errors import CurvlensError, check_choice
from curvlens.math.compress import rank1, rank_r
from curvlens.math.blocks import block_size, blocks
from curvlens.math.saliency import TopKKeeper, above, at_least, kth_largest_blocked, saliency

__all__ = [
    "ParamSpec",
    "MergeMethod",
    "register",
    "get_method",
    "list_methods",
    "resolve_params",
    "MaskCounts",
]

Tensor = torch.Tensor
Validator = Callable[[str, Any], Any]


# --------------------------------------------------------------------------
# Schema and registry
# --------------------------------------------------------------------------


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


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function and parameter schema.

    Attributes
    ----------
    needs_base : bool
        True: the method requires a base tensor. False: base is optional
        (``ota``) or ignored (``linear``, ``fisher``).
    needs_moments : bool
        True: the method requires the experts' second moments.
    uses_rng : bool
        True: the method draws random masks from ``rng``.
    counts_masks : bool
        True: the method accepts ``counts=`` (a :class:`MaskCounts`).
    """

    name: str
    fn: Callable[..., Tensor]
    params: tuple
    description: str
    needs_base: bool
    needs_moments: bool = False
    uses_rng: bool = False
    counts_masks: bool = False

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

    def __init__(self, n_experts: int):
        self.kept = [0] * n_experts
        self.any_kept = 0
        self.used = False

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


_REGISTRY: dict = {}


def register(
    name: str,
    *,
    params: Sequence[ParamSpec],
    description: str,
    needs_base: bool,
    needs_moments: bool = False,
    uses_rng: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator recording a per-tensor merge function under ``name``.

    The function is returned unchanged.

    Raises
    ------
    CurvlensError
        If ``name`` is already registered or two parameters share a name.
    """
    params = tuple(params)
    names = [p.name for p in params] + [a for p in params for a in p.aliases]
    if len(set(names)) != len(names):
        raise CurvlensError(f"method {name!r} declares a parameter name twice: {names}")

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        import inspect

        if name in _REGISTRY:
            raise CurvlensError(f"merge method {name!r} is already registered")
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            params=params,
            description=description,
            needs_base=needs_base,
            needs_moments=needs_moments,
            uses_rng=uses_rng,
            counts_masks="counts" in inspect.signature(fn).parameters,
        )
        return fn

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
    """Tidy table of every method's parameters.

    Returns
    -------
    pandas.DataFrame
        One row per (method, parameter) with columns ``method, param, default,
        per_expert, description``.

    Examples
    --------
    >>> df = list_methods()
    >>> list(df.columns)
    ['method', 'param', 'default', 'per_expert', 'description']
    >>> bool(((df.method == "ties") & (df.param == "density")).any())
    True
    """
    import pandas as pd  # only needed here; the math itself is pandas-free

    rows = [
        {
            "method": m.name,
            "param": p.name,
            "default": p.default,
            "per_expert": p.per_expert,
            "description": p.description,
        }
        for m in _REGISTRY.values()
        for p in m.params
    ]
    return pd.DataFrame(rows, columns=["method", "param", "default", "per_expert", "description"])


def resolve_params(
    method: Union[str, MergeMethod], params: Optional[Mapping[str, Any]], n_experts: int
) -> dict:
    """Complete, check and broadcast a method's parameters.

    Parameters
    ----------
    method : str or MergeMethod
    params : mapping or None
        Parameters as given (a config's method parameters). Not modified.
    n_experts : int
        Number of experts being merged (the base is not an expert).

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
    out = {}
    for spec in m.params:
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


# --------------------------------------------------------------------------
# Validators: each converts one value and names the parameter when it fails
# --------------------------------------------------------------------------


def _real(
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


def _boolean(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise CurvlensError(f"{label} must be true or false; got {value!r}")
    return value


def _int_at_least(lo: int, *, allow_none: bool = False) -> Validator:
    def check(label: str, value: Any) -> Any:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            extra = " or None" if allow_none else ""
            raise CurvlensError(f"{label} must be an int >= {lo}{extra}; got {value!r}")
        return value

    return check


def _lower_str(label: str, value: Any) -> str:
    # The OTA fork lower-cases `normalise`; accept 'Global' as it does.
    if not isinstance(value, str):
        raise CurvlensError(f"{label} must be a string; got {value!r}")
    return value.strip().lower()


def _path_or_none(label: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise CurvlensError(f"{label} must be a path string or None; got {value!r}")
    return value


def _false_only(label: str, value: Any) -> bool:
    value = _boolean(label, value)
    if value:
        raise CurvlensError(
            f"{label}=True (the OTA fork's hybrid-norm rescaling of masked task vectors) "
            "is not implemented in curvlens; expected False"
        )
    return value


# --------------------------------------------------------------------------
# Shared parameter specs (mergekit 0.1.5 names and defaults)
# --------------------------------------------------------------------------

_WEIGHT = ParamSpec(
    "weight", 1.0, "Weight of each expert (mergekit requires it; curvlens defaults to 1).",
    per_expert=True, validate=_real(),
)
_DENSITY = ParamSpec(
    "density", 1.0, "Fraction of each task vector's entries kept, in (0, 1].",
    per_expert=True, validate=_real(lo=0.0, lo_open=True, hi=1.0),
)
_LAMBDA = ParamSpec("lambda", 1.0, "Scale of the merged task vector.", validate=_real())
_INT8 = ParamSpec(
    "int8_mask", False,
    "mergekit's memory option for the sign mask; no numeric effect (curvlens masks are bool).",
    validate=_boolean,
)
_SEED = ParamSpec(
    "seed", 0, "Seed of the drop masks when no rng is passed (the driver derives one per tensor).",
    validate=_int_at_least(0),
)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec(
        "normalize", default, "Divide the weighted sum by the sum of the weights.",
        validate=_boolean,
    )


def _rescale(default: bool) -> ParamSpec:
    return ParamSpec(
        "rescale", default,
        "Rescale each sparsified task vector to its original L1 norm (mergekit's rescale).",
        validate=_boolean,
    )


# --------------------------------------------------------------------------
# Input checks and fp32 conversion
# --------------------------------------------------------------------------


def _prepare(
    method: str,
    base: Optional[Tensor],
    experts: Sequence[Tensor],
    moments: Optional[Sequence[Tensor]],
    *,
    needs_base: bool,
    needs_moments: bool,
    fp32: bool = True,
):
    """Check shapes, devices and dtypes; return fp32 versions of the tensors.

    Inputs already in fp32 are returned as they are, so callers must never
    write into what this returns. With ``fp32=False`` base and experts keep their
    dtype (for methods that cast block by block).
    """
    if isinstance(experts, Tensor) or not isinstance(experts, Sequence) or len(experts) == 0:
        raise CurvlensError(
            f"{method}: experts must be a non-empty sequence of tensors; got "
            f"{type(experts).__name__}" + (" of length 0" if isinstance(experts, Sequence) else "")
        )
    ref = experts[0]
    _check_float(method, "experts[0]", ref)
    for i, e in enumerate(experts):
        _check_like(method, f"experts[{i}]", e, ref)
    if base is None:
        if needs_base:
            raise CurvlensError(f"{method}: needs a base tensor; got base=None")
        base32 = None
    else:
        _check_like(method, "base", base, ref)
        base32 = base.float() if fp32 else base
    moments32 = None
    if needs_moments:
        if moments is None or isinstance(moments, Tensor) or not isinstance(moments, Sequence):
            raise CurvlensError(
                f"{method}: needs one second-moment tensor per expert; got {type(moments).__name__}"
            )
        if len(moments) != len(experts):
            raise CurvlensError(
                f"{method}: expected {len(experts)} moment tensors (one per expert); got {len(moments)}"
            )
        for i, v in enumerate(moments):
            _check_like(method, f"moments[{i}]", v, ref)
        if not fp32:  # checked block by block by the caller (_moment_block)
            return base32, list(experts), list(moments)
        moments32 = [v.float() for v in moments]
        for i, v in enumerate(moments32):
            _moment_block(v.reshape(-1), slice(None), i, method)
    return base32, [e.float() if fp32 else e for e in experts], moments32


def _check_float(method: str, label: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise CurvlensError(f"{method}: {label} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise CurvlensError(f"{method}: {label} must be floating point; got dtype {t.dtype}")


def _check_like(method: str, label: str, t: Any, ref: Tensor) -> None:
    _check_float(method, label, t)
    if t.shape != ref.shape:
        raise CurvlensError(
            f"{method}: {label} has shape {tuple(t.shape)}; expected {tuple(ref.shape)} "
            "(the shape of experts[0])"
        )
    if t.device != ref.device:
        raise CurvlensError(f"{method}: {label} is on {t.device}; expected {ref.device}")


def _per_expert_column(values: Sequence[float], like: Tensor) -> Tensor:
    """Values as an fp32 tensor shaped to broadcast against a stack of ``like``."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).reshape(
        (-1,) + (1,) * like.ndim
    )


def _generator(rng: Optional[torch.Generator], seed: int, device: torch.device) -> torch.Generator:
    if rng is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen
    if not isinstance(rng, torch.Generator):
        raise CurvlensError(f"rng must be a torch.Generator or None; got {type(rng).__name__}")
    gdev = torch.device(rng.device)
    if gdev.type != device.type or (
        gdev.index is not None and device.index is not None and gdev.index != device.index
    ):
        raise CurvlensError(f"rng is on {gdev}; expected a generator on the tensors' device {device}")
    return rng


# --------------------------------------------------------------------------
# Shared math
# --------------------------------------------------------------------------


class _Sparsifier:
    """One expert's sparsification of one tensor's task vector, block by block.

    The whole-tensor quantities (top-k threshold, L1 norms for ``rescale``, the
    random stream) are settled when the sparsifier is built, in a first pass
    over the same blocks; :meth:`apply` then masks the blocks, which must come in
    index order, each once.
    ``apply`` returns ``delta * keep``, times ``||delta||_1 / ||delta * keep||_1``
    with ``rescale`` (mergekit's rescale, left out when either norm is below 1e-7).
    """

    factor: Optional[Tensor] = None

    def apply(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        """The masked (and rescaled) block, and the fp32 0/1 mask."""
        keep = self.keep(delta)
        masked = delta * keep
        return (masked if self.factor is None else masked * self.factor), keep

    def keep(self, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def _set_factor(self, before: float, after: float, device) -> None:
        # Per-block fp32 sums added in double: one block (small tensors) gives
        # exactly torch's whole-tensor fp32 sum, which is mergekit's.
        if before >= 1e-7 and after >= 1e-7:
            self.factor = (torch.tensor(before, dtype=torch.float32, device=device)
                           / torch.tensor(after, dtype=torch.float32, device=device))


class _Magnitude(_Sparsifier):
    """Keep the ``k = max(1, int(density * n))`` largest ``|delta|`` (TIES)."""

    def __init__(self, delta_at, n: int, density: float, rescale: bool, size: int, device):
        k = max(1, int(density * n))
        self.keeper = _topk_keeper(lambda ix: delta_at(ix).abs(), n, k, size)
        if rescale:
            before = after = 0.0
            for sl in blocks(n, size):
                d = delta_at(sl)
                before += float(d.abs().sum())
                after += float((d * self.keep(d)).abs().sum())
            self.keeper.reset()
            self._set_factor(before, after, device)

    def keep(self, delta: Tensor) -> Tensor:
        return self.keeper(delta.abs())


#: Bytes of DARE keep-masks held per tensor between the two passes; above it the
#: second pass redraws them from the saved generator state instead.
DARE_MASK_BUDGET = 1 << 28


class _RandomDrop(_Sparsifier):
    """Keep each entry with probability ``density`` (DARE).

    One Bernoulli draw per entry from ``gen`` in index order, so the stream is the
    same as one whole-tensor ``torch.bernoulli`` (mergekit's) whatever the block
    size. The first pass draws (advancing ``gen`` past this expert, as mergekit
    does) and sums the L1 norms; the masks are kept for the second pass within
    ``budget`` bytes, else redrawn from the generator state saved before the first.
    """

    def __init__(self, delta_at, n: int, density: float, rescale: bool, size: int,
                 gen: torch.Generator, budget: int, device):
        self.density, self.size = density, size
        self.start = gen.get_state()
        self.masks: Optional[list] = [] if n <= budget else None
        before = after = 0.0
        for sl in blocks(n, size):
            keep = self._draw(sl.stop - sl.start, gen, device)
            if self.masks is not None:  # uint8: bool -> float casts are ~10x slower
                self.masks.append(keep.to(torch.uint8))
            if rescale:
                d = delta_at(sl)
                before += float(d.abs().sum())
                after += float((d * keep).abs().sum())
        if rescale:
            self._set_factor(before, after, device)
        self.device = device
        self.replay: Optional[torch.Generator] = None
        self.index = 0

    def _draw(self, length: int, gen: torch.Generator, device) -> Tensor:
        return torch.bernoulli(torch.full((length,), self.density, device=device), generator=gen)

    def keep(self, delta: Tensor) -> Tensor:
        if self.masks is not None:
            self.index += 1
            return self.masks[self.index - 1].float()
        if self.replay is None:
            self.replay = torch.Generator(device=self.device)
            self.replay.set_state(self.start)
        return self._draw(delta.numel(), self.replay, self.device)


def _disjoint_mean_parts(weighted: Tensor, weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """TIES combine of the (N, L) weighted deltas: the sum of the entries that
    agree with the elected sign, and the sum of their weights (1 where none agree).

    The elected sign ``e`` of an entry is the sign of its column sum, a zero sum
    electing +; an entry agrees when its sign is ``e`` (zeros never agree). The
    result equals ``(weighted * agree).sum(0)`` and ``(weights * agree).sum(0)``
    in fewer operations, all on floats (on a CPU, ops on bool tensors cost 3-5x):
    ``relu(weighted * e)`` is ``|delta|`` where an entry agrees and 0 elsewhere,
    so its column sum times ``e`` is the agreeing sum (negation is exact in IEEE
    arithmetic, so the bits match). ``weights`` None means all weights are 1.
    """
    s = torch.sign(weighted.sum(dim=0))
    elected = s + (1.0 - s.abs())  # sign, with 0 (and -0.0) electing +
    agreeing = torch.relu(weighted * elected)
    mixed = agreeing.sum(dim=0) * elected
    agree = torch.sign(agreeing)
    divisor = agree.sum(dim=0) if weights is None else (weights * agree).sum(dim=0)
    return mixed, _one_where_zero(divisor)


def _one_where_zero(x: Tensor) -> Tensor:
    """``x`` with exact zeros replaced by 1 (a divisor guard without a bool mask)."""
    return x + (1.0 - torch.sign(x).abs())


def _task_arithmetic_core(
    base: Tensor,
    experts: Sequence[Tensor],
    p: dict,
    *,
    sparsify: Optional[str],
    consensus: bool,
    gen: Optional[torch.Generator] = None,
    counts: Optional[MaskCounts] = None,
) -> Tensor:
    """mergekit's generalized task arithmetic (task_arithmetic, ties, dare_*).

    Inputs may be in any float dtype; they are read and cast to fp32 one block at
    a time (:mod:`curvlens.math.blocks`), so no fp32 copy of a whole tensor is
    made. Sparsification needs whole-tensor quantities, found in a first pass.
    """
    fb = base.reshape(-1)
    flats = [e.reshape(-1) for e in experts]
    n, dev = fb.numel(), base.device
    size = block_size(dev)
    sparsifiers: list[Optional[_Sparsifier]] = []
    budget = DARE_MASK_BUDGET
    for i, fe in enumerate(flats):
        density = p["density"][i] if sparsify else 1.0
        if density >= 1 or n == 0:
            sparsifiers.append(None)  # no draw: later experts see mergekit's random stream
            continue

        def delta_at(ix, fe=fe):
            return fe[ix].float() - fb[ix].float()

        if sparsify == "magnitude":
            sparsifiers.append(_Magnitude(delta_at, n, density, p["rescale"], size, dev))
        else:
            sparsifiers.append(_RandomDrop(delta_at, n, density, p["rescale"], size, gen, budget, dev))
            budget -= n
    weights = _per_expert_column(p["weight"], fb[:1])
    unit = all(w == 1.0 for w in p["weight"])
    total = weights.sum(dim=0)
    # mergekit's guard against dividing by (nearly) zero total weight
    total = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    out = torch.empty(n, dtype=torch.float32, device=dev)
    for sl in blocks(n, size):
        b = fb[sl].float()
        deltas, keeps = [], []
        for fe, sp in zip(flats, sparsifiers):
            d = fe[sl].float() - b
            if sp is not None:
                d, keep = sp.apply(d)
                keeps.append(keep)
            else:
                keeps.append(None)
            deltas.append(d)
        if counts is not None:
            counts.add(keeps)
        # x * 1.0 == x exactly: unit weights (the default) skip the product
        weighted = torch.stack(deltas) if unit else torch.stack(deltas) * weights
        if consensus:
            mixed, divisor = _disjoint_mean_parts(weighted, None if unit else weights)
        else:
            mixed = weighted.sum(dim=0)
            divisor = total
        if p["normalize"]:
            mixed = mixed / divisor
        if p["lambda"] != 1:
            mixed = mixed * p["lambda"]
        out[sl] = b + mixed
    return out.reshape(base.shape)


# --------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------


@register(
    "linear",
    params=(
        _WEIGHT,
        ParamSpec("normalize", True, "Divide by the sum of the weights.", validate=_boolean),
    ),
    description="Weighted average of the experts (model soup); the base is ignored.",
    needs_base=False,
)
def linear(base, experts, moments=None, *, rng=None, **params) -> Tensor:
    """Linear merge ``sum_i w_i theta_i`` (divided by ``sum_i w_i`` if ``normalize``).

    The base tensor is ignored (list the base model as an expert to include it,
    as mergekit does when a config lists it under ``models``).

    Raises
    ------
    CurvlensError
        If ``normalize`` is on and the weights sum to 0 (mergekit would return
        inf/NaN).

    Examples
    --------
    >>> linear(None, [torch.tensor([0.0, 4.0]), torch.tensor([4.0, 0.0])], weight=[1, 3])
    tensor([3., 1.])
    """
    _, thetas, _ = _prepare("linear", base, experts, moments, needs_base=False, needs_moments=False,
                            fp32=False)
    p = resolve_params("linear", params, len(thetas))
    if p["normalize"] and sum(p["weight"]) == 0:
        raise CurvlensError(
            f"linear: weights sum to 0 with normalize=True; got weight={p['weight']}"
        )
    # fp32 weights and a fused multiply-add, in mergekit's order, so both give
    # the same bits on the same inputs.
    weights = torch.tensor(p["weight"], dtype=torch.float32, device=thetas[0].device)
    total = weights.sum()
    flats = [t.reshape(-1) for t in thetas]
    out = torch.empty(flats[0].numel(), dtype=torch.float32, device=thetas[0].device)
    for sl in blocks(out.numel(), block_size(out.device)):
        result = torch.zeros(sl.stop - sl.start, dtype=torch.float32, device=out.device)
        for theta, w in zip(flats, weights):
            result = torch.addcmul(result, theta[sl].float(), w)
        out[sl] = result / total if p["normalize"] else result
    return out.reshape(thetas[0].shape)


@register(
    "task_arithmetic",
    params=(_WEIGHT, _LAMBDA, _normalize(False), _INT8),
    description="base + lambda * sum_i w_i tau_i (divided by sum_i w_i if normalize).",
    needs_base=True,
)
def task_arithmetic(base, experts, moments=None, *, rng=None, counts=None, **params) -> Tensor:
    """Task arithmetic: ``theta0 + lambda * sum_i w_i (theta_i - theta0)``.

    Examples
    --------
    >>> task_arithmetic(torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])])
    tensor([4., 2.])
    """
    b, thetas, _ = _prepare("task_arithmetic", base, experts, moments, needs_base=True, needs_moments=False,
                              fp32=False)
    p = resolve_params("task_arithmetic", params, len(thetas))
    return _task_arithmetic_core(b, thetas, p, sparsify=None, consensus=False, counts=counts)


@register(
    "ties",
    params=(_WEIGHT, _DENSITY, _normalize(True), _LAMBDA, _rescale(False), _INT8),
    description="TIES: keep top-density |tau_i| per tensor, elect signs, average agreeing entries.",
    needs_base=True,
)
def ties(base, experts, moments=None, *, rng=None, counts=None, **params) -> Tensor:
    """TIES merging as in mergekit 0.1.5.

    Each task vector keeps its ``k = max(1, int(density * numel))`` largest
    ``|tau_i|`` entries; the weighted task vectors elect a sign per entry (sign of
    their sum, + on a tie); entries whose sign agrees are summed and divided by
    the sum of the agreeing weights (1 where none agree).

    Examples
    --------
    >>> base = torch.zeros(2)
    >>> ties(base, [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])])
    tensor([ 2., -2.])
    """
    b, thetas, _ = _prepare("ties", base, experts, moments, needs_base=True, needs_moments=False,
                              fp32=False)
    p = resolve_params("ties", params, len(thetas))
    return _task_arithmetic_core(b, thetas, p, sparsify="magnitude", consensus=True, counts=counts)


_DARE_PARAMS = (_WEIGHT, _DENSITY, _normalize(False), _LAMBDA, _rescale(True), _SEED, _INT8)


@register(
    "dare_linear",
    params=_DARE_PARAMS,
    description="DARE: drop task-vector entries at random (keep prob. density), rescale, add.",
    needs_base=True,
    uses_rng=True,
)
def dare_linear(base, experts, moments=None, *, rng=None, counts=None, **params) -> Tensor:
    """DARE with a linear combine, as mergekit 0.1.5's ``dare_linear``.

    Each entry of ``tau_i`` is kept with probability ``density`` (one Bernoulli
    draw per entry from ``rng``, experts in order); with ``rescale`` the kept
    entries are scaled so the task vector keeps its L1 norm (about
    ``1 / density``). ``rng=None`` uses a generator seeded with ``seed``.

    Examples
    --------
    >>> base, e = torch.zeros(4), torch.ones(4)
    >>> torch.equal(dare_linear(base, [e], density=0.5, seed=1),
    ...             dare_linear(base, [e], density=0.5, seed=1))
    True
    """
    b, thetas, _ = _prepare("dare_linear", base, experts, moments, needs_base=True, needs_moments=False,
                              fp32=False)
    p = resolve_params("dare_linear", params, len(thetas))
    gen = _generator(rng, p["seed"], b.device)
    return _task_arithmetic_core(b, thetas, p, sparsify="random", consensus=False, gen=gen,
                                 counts=counts)


@register(
    "dare_ties",
    params=_DARE_PARAMS,
    description="DARE drop-and-rescale, then TIES sign election and disjoint mean.",
    needs_base=True,
    uses_rng=True,
)
def dare_ties(base, experts, moments=None, *, rng=None, counts=None, **params) -> Tensor:
    """DARE sparsification followed by the TIES combine (mergekit's ``dare_ties``).

    Note mergekit's default ``normalize`` is False here, unlike ``ties``.

    Examples
    --------
    >>> base = torch.zeros(2)
    >>> dare_ties(base, [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])])
    tensor([ 4., -2.])
    """
    b, thetas, _ = _prepare("dare_ties", base, experts, moments, needs_base=True, needs_moments=False,
                              fp32=False)
    p = resolve_params("dare_ties", params, len(thetas))
    gen = _generator(rng, p["seed"], b.device)
    return _task_arithmetic_core(b, thetas, p, sparsify="random", consensus=True, gen=gen,
                                 counts=counts)


@register(
    "fisher",
    params=(
        ParamSpec(
            "weight", 1.0, "Weight of each expert's Fisher, >= 0.",
            per_expert=True, validate=_real(lo=0.0),
        ),
        ParamSpec(
            "fisher_floor", 0.0, "Lower bound applied to every Fisher entry, >= 0.",
            validate=_real(lo=0.0),
        ),
    ),
    description="Fisher merging: sum_i w_i F_i theta_i / sum_i w_i F_i with F_i the moments.",
    needs_base=False,
    needs_moments=True,
)
def fisher(base, experts, moments=None, *, rng=None, **params) -> Tensor:
    """Diagonal Fisher merging with the second moments as the Fisher.

    ``F_i = max(moments_i, fisher_floor)``; entries where ``sum_i w_i F_i == 0``
    get the plain weighted mean ``sum_i w_i theta_i / sum_i w_i``. The base is
    ignored.

    Examples
    --------
    >>> thetas = [torch.tensor([1.0, 1.0]), torch.tensor([4.0, 4.0])]
    >>> fisher(None, thetas, [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])])
    tensor([2.0000, 2.5000])
    """
    _, thetas, vs = _prepare("fisher", base, experts, moments, needs_base=False, needs_moments=True,
                             fp32=False)
    p = resolve_params("fisher", params, len(thetas))
    if sum(p["weight"]) == 0:
        raise CurvlensError(f"fisher: weights must not all be 0; got weight={p['weight']}")
    floor = p["fisher_floor"]
    flats, vflats = [t.reshape(-1) for t in thetas], [v.reshape(-1) for v in vs]
    weights = _per_expert_column(p["weight"], flats[0])
    total = sum(p["weight"])
    out = torch.empty(flats[0].numel(), dtype=torch.float32, device=flats[0].device)
    for sl in blocks(out.numel(), block_size(out.device)):
        fis = torch.stack([_moment_block(v, sl, i, "fisher") for i, v in enumerate(vflats)])
        if floor > 0:
            fis = torch.clamp_min(fis, floor)
        stacked = torch.stack([t[sl].float() for t in flats])
        wf = weights * fis
        den = wf.sum(dim=0)  # >= 0: weights and Fisher are
        if den.numel() and float(den.min()) == 0.0:
            merged = (wf * stacked).sum(dim=0) / _one_where_zero(den)
            plain = (weights * stacked).sum(dim=0) / total
            out[sl] = torch.where(den == 0, plain, merged)
        else:
            out[sl] = (wf * stacked).sum(dim=0) / den
    return out.reshape(thetas[0].shape)


def _moment_block(v: Tensor, sl: slice, i: int, method: str) -> Tensor:
    """One block of a flat second-moment tensor in fp32, checked to be nonnegative."""
    block = v[sl].float()
    if block.numel() and float(block.min()) < 0:  # a float reduction: ~10x a bool any()
        raise CurvlensError(
            f"{method}: moments[{i}] must be nonnegative; got minimum {block.min().item():.3g}"
        )
    return block


# ---- OTA ------------------------------------------------------------------

_OTA_PARAMS = (
    ParamSpec("power", 0.5, "Exponent p of the curvature weight v**p, > 0.",
              validate=_real(lo=0.0, lo_open=True)),
    ParamSpec("epsilon", 1e-8, "Added to every weight (and to the global-normalise mean), >= 0.",
              validate=_real(lo=0.0)),
    ParamSpec("normalise", "none",
              "'global': divide each expert's v**p*scaling by its mean over this tensor.",
              choices=("none", "global"), validate=_lower_str),
    ParamSpec("precond_threshold", None,
              "The fork's mask threshold: on v*tau**2 with a base, on v without one.",
              per_expert=True, validate=_real(allow_none=True)),
    ParamSpec("ffg_density", None,
              "FFG density in (0, 1]; the driver turns it into a model-wide ffg_threshold. "
              "Called directly: top-k of v*tau**2 within this tensor.",
              per_expert=True, validate=_real(lo=0.0, lo_open=True, hi=1.0, allow_none=True)),
    ParamSpec("ffg_threshold", None,
              "FFG saliency threshold t_i (mask v*tau**2 >= t_i); set by the driver from ffg_density.",
              per_expert=True, validate=_real(allow_none=True)),
    ParamSpec("ffg_ties", None,
              "With ffg_threshold: keep v*tau**2 > t_i plus the first ffg_ties entries equal to t_i "
              "(set per tensor by the driver so that ffg_density keeps exactly its share).",
              per_expert=True, validate=_int_at_least(0, allow_none=True)),
    ParamSpec("fallback_to_base", False,
              "Entries every expert masked: base if true, else the plain mean of the experts.",
              validate=_boolean),
    ParamSpec("rank1_approx", False, "Replace a 2-D v by its rank-1 (AdaFactor) approximation.",
              per_expert=True, validate=_boolean),
    ParamSpec("rank", None, "Replace a 2-D v by its rank-r truncated SVD, clipped at 0.",
              per_expert=True, validate=_int_at_least(1, allow_none=True)),
    ParamSpec("scaling_factor", 1.0, "Multiplies the expert's v**p, > 0.",
              per_expert=True, validate=_real(lo=0.0, lo_open=True)),
    ParamSpec("combine", "precond",
              "How masked task vectors are combined (with a base): precond | linear | ties.",
              choices=("precond", "linear", "ties"), validate=_lower_str,
              aliases=("masked_task_vector_merge_method",)),
    ParamSpec("preconditioner_path", None,
              "Path of the expert's exp_avg_sq file; read by the driver, ignored here.",
              per_expert=True, validate=_path_or_none),
    ParamSpec("rescale", False, "The fork's hybrid-norm rescaling; only false is supported.",
              validate=_false_only),
    ParamSpec("approximate_norm", False, "Fork option of rescale; no effect since rescale is false.",
              validate=_boolean),
    ParamSpec("rescale_relative_threshold", 1e-6,
              "Fork option of rescale; no effect since rescale is false.",
              validate=_real(lo=0.0)),
)


@register(
    "ota",
    params=_OTA_PARAMS,
    description="OTA: curvature-weighted (v**p) merge of FFG-masked task vectors.",
    needs_base=False,
    needs_moments=True,
)
def ota(base, experts, moments=None, *, rng=None, counts=None, **params) -> Tensor:
    """Optimization-Trajectory-Aware merge, with optional FFG masks.

    Per expert ``i``: ``v_i`` (optionally rank-1 or rank-r compressed) gives the
    weight ``W_i = (normalise(v_i**p * scaling_i) + epsilon) * m_i``, where the
    mask ``m_i`` comes from ``ffg_threshold`` (``v_i tau_i**2 >= t_i``), else
    ``ffg_density`` (per-tensor top-k of ``v_i tau_i**2``), else
    ``precond_threshold`` (the fork's rule), else is all ones.

    * no base: ``sum_i W_i theta_i / sum_i W_i``;
    * base, ``combine='precond'``: ``theta0 + sum_i W_i tau_i / sum_i W_i``;
    * base, ``combine='linear'``: ``theta0 + sum_i m_i tau_i / N``;
    * base, ``combine='ties'``: ``theta0 +`` TIES sign election and disjoint mean
      of the ``m_i tau_i``.

    When any mask is in use, entries with ``sum_i W_i <= 1.1 N epsilon`` (every
    expert masked) become ``theta0`` if ``fallback_to_base`` and there is a base,
    else the plain mean of the experts. Entries with ``sum_i W_i == 0`` and no
    mask (possible only with ``epsilon=0``) get the plain mean too.

    Examples
    --------
    >>> base = torch.zeros(3)
    >>> experts = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 4.0, 5.0])]
    >>> v = [torch.ones(3), torch.ones(3)]
    >>> ota(base, experts, v)  # equal curvature: the plain mean
    tensor([2., 3., 4.])
    >>> ota(base, experts, v, ffg_threshold=[5.0, 10.0], fallback_to_base=True)
    tensor([0., 4., 4.])
    """
    b, thetas, vs = _prepare("ota", base, experts, moments, needs_base=False, needs_moments=True,
                             fp32=False)
    n = len(thetas)
    p = resolve_params("ota", params, n)
    _check_ota_masks(p, has_base=b is not None)
    shape, dev = thetas[0].shape, thetas[0].device
    # Compression needs each v whole (a 2-D factorisation); everything else runs
    # in cache-sized blocks, with whole-tensor quantities found in a first pass.
    vs = [_compressed_moment(v.float(), r1, r) if (r1 or r is not None) else v
          for v, r1, r in zip(vs, p["rank1_approx"], p["rank"])]
    fb = None if b is None else b.reshape(-1)
    flats, vflats = [t.reshape(-1) for t in thetas], [v.reshape(-1) for v in vs]
    numel, size = flats[0].numel(), block_size(dev)
    means = [_ota_weight_mean(vflats[i], p, i, size) if p["normalise"] == "global" else None
             for i in range(n)]
    keepers = [None] * n
    for i, (t, ties) in enumerate(zip(p["ffg_threshold"], p["ffg_ties"])):
        if t is not None and ties is not None:
            keepers[i] = TopKKeeper(torch.tensor(t), ties)
    for i, d in enumerate(p["ffg_density"]):
        if d is not None and p["ffg_threshold"][i] is None and d < 1 and numel > 0:
            k = max(1, int(d * numel))

            def score(ix, i=i):
                return saliency(vflats[i][ix].float(), flats[i][ix].float() - fb[ix].float())

            keepers[i] = _topk_keeper(score, numel, k, size)
    eps = p["epsilon"]
    out = torch.empty(numel, dtype=torch.float32, device=dev)
    for sl in blocks(numel, size):
        stacked = torch.stack([t[sl].float() for t in flats])
        bb = None if fb is None else fb[sl].float()
        taus = None if bb is None else stacked - bb
        W = torch.empty_like(stacked)
        masks = []
        for i in range(n):
            v = _moment_block(vflats[i], sl, i, "ota")
            mask = _ota_mask(v, None if taus is None else taus[i], p, i, keepers[i])
            W[i] = _ota_weight(v, mask, p["power"], p["scaling_factor"][i], means[i], eps)
            masks.append(mask)
        if counts is not None:
            counts.add(masks)
        den = W.sum(dim=0)  # >= 0: every weight is
        any_zero = den.numel() > 0 and float(den.min()) == 0.0
        safe_den = _one_where_zero(den) if any_zero else den
        if taus is None:
            merged = (W * stacked).sum(dim=0) / safe_den
        else:
            merged = bb + _ota_combine(p["combine"], W, safe_den, taus, masks)
        if any(m is not None for m in masks):
            # The fork's test for "every expert masked": only epsilon-sized weight
            # left. lerp with a 0/1 weight returns either end exactly.
            fully_masked = 1.0 - above(den, n * eps * 1.1)
            use_base = p["fallback_to_base"] and bb is not None
            out[sl] = torch.lerp(merged, bb if use_base else stacked.mean(dim=0), fully_masked)
        elif any_zero:
            # 0/0 without any mask (epsilon=0 and v=0 for every expert): the plain
            # mean instead of the fork's NaN.
            out[sl] = torch.where(den == 0, stacked.mean(dim=0), merged)
        else:
            out[sl] = merged
    for i, (t, ties) in enumerate(zip(p["ffg_threshold"], p["ffg_ties"])):
        if t is not None and ties is not None and keepers[i].remaining > 0:
            # the selection pass saw other scores than this merge: never keep a
            # different number of entries than the density promised
            raise CurvlensError(f"ota: expert {i} should keep {ties} entries tied at the threshold {t!r} but "
                                f"only {ties - keepers[i].remaining} exist; scores differ from the selection pass")
    return out.reshape(shape)


def _topk_keeper(score, n: int, k: int, size: int) -> TopKKeeper:
    """The top-``k`` of a nonnegative ``score`` over a tensor, as a block-by-block keeper."""
    kth, above, equal = kth_largest_blocked(score, n, k, size, nonnegative=True)
    return TopKKeeper(kth, k - above, equal)


def _ota_weight_mean(v: Tensor, p: dict, i: int, size: int) -> Tensor:
    """Mean over the tensor of ``v**power * scaling`` (for ``normalise='global'``),
    summed block by block; one block gives torch's fp32 mean exactly."""
    total = 0.0
    for sl in blocks(v.numel(), size):
        w = torch.pow(_moment_block(v, sl, i, "ota"), p["power"])
        if p["scaling_factor"][i] != 1.0:
            w = w * p["scaling_factor"][i]
        total += float(w.sum())
    return torch.tensor(total, dtype=torch.float32, device=v.device) / max(v.numel(), 1)


def _ota_weight(
    v: Tensor, mask: Optional[Tensor], power: float, scaling: float, mean: Optional[Tensor], eps: float
) -> Tensor:
    """``(normalise(v**power * scaling) + eps) * mask``, in the fork's order;
    ``mean`` is the whole tensor's mean of ``v**power * scaling`` for
    ``normalise='global'`` and None otherwise."""
    w = torch.pow(v, power)
    if scaling != 1.0:
        w = w * scaling
    if mean is not None:
        w = w / (mean + eps)
    w = w + eps
    return w if mask is None else w * mask


def _check_ota_masks(p: dict, *, has_base: bool) -> None:
    uses_ffg = any(x is not None for x in p["ffg_threshold"] + p["ffg_density"])
    stray = [i for i, (t, k) in enumerate(zip(p["ffg_threshold"], p["ffg_ties"])) if k is not None and t is None]
    if stray:
        raise CurvlensError(f"ota: ffg_ties is given for expert(s) {stray} without an ffg_threshold")
    uses_precond = any(x is not None for x in p["precond_threshold"])
    if uses_ffg and uses_precond:
        raise CurvlensError(
            "ota: give either precond_threshold (the fork's parameter) or "
            "ffg_density/ffg_threshold, not both; got "
            f"precond_threshold={p['precond_threshold']}, ffg_density={p['ffg_density']}, "
            f"ffg_threshold={p['ffg_threshold']}"
        )
    if uses_ffg and not has_base:
        raise CurvlensError(
            "ota: ffg_density/ffg_threshold score the task vectors v*tau**2 and need a base "
            "tensor; got base=None"
        )
    if p["combine"] != "precond" and not has_base:
        raise CurvlensError(
            f"ota: combine={p['combine']!r} combines task vectors and needs a base tensor; "
            "got base=None (use combine='precond')"
        )
    for i, (r1, r) in enumerate(zip(p["rank1_approx"], p["rank"])):
        if r1 and r is not None:
            raise CurvlensError(
                f"ota: expert {i} sets both rank1_approx=True and rank={r}; choose one"
            )


def _compressed_moment(v: Tensor, use_rank1: bool, rank: Optional[int]) -> Tensor:
    # The fork compresses v before both the mask and the weight, so both see
    # the approximation.
    if use_rank1:
        return rank1(v)
    if rank is not None:
        return rank_r(v, rank)
    return v


def _ota_mask(v: Tensor, tau: Optional[Tensor], p: dict, i: int,
              keeper: Optional[TopKKeeper] = None) -> Optional[Tensor]:
    """fp32 0/1 mask of expert ``i`` on this block (None: no mask)."""
    if p["ffg_threshold"][i] is not None:
        if keeper is not None:  # exact model-wide selection: ties split by the driver's quota
            return keeper(saliency(v, tau))
        return at_least(saliency(v, tau), p["ffg_threshold"][i])
    if p["ffg_density"][i] is not None:
        if keeper is None:  # density 1: keep everything
            return torch.ones_like(v, dtype=torch.float32)
        return keeper(saliency(v, tau))
    t = p["precond_threshold"][i]
    if t is None:
        return None
    # The fork scores v*tau**2 when a base is present, and v alone otherwise.
    return at_least(v, t) if tau is None else at_least(saliency(v, tau), t)


def _ota_combine(
    how: str, W: Tensor, safe_den: Tensor, taus: Tensor, masks: Sequence[Optional[Tensor]]
) -> Tensor:
    """Merged task vector from the (N, ...) stack ``taus`` (which it may overwrite)."""
    if how == "precond":
        # Masked entries already have weight 0.
        return (W * taus).sum(dim=0) / safe_den
    for i, m in enumerate(masks):
        if m is not None:
            taus[i] = taus[i] * m  # our own stack, not an input
    if how == "linear":
        # The fork averages over all N experts, masked or not.
        return taus.mean(dim=0)
    # TIES's disjoint mean with unit weights: the divisor counts agreeing experts
    mixed, divisor = _disjoint_mean_parts(taus, None)
    return mixed / divisor
