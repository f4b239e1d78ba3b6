"""``Experts``: a base model plus named experts with their second moments, streamed.

Every model-wide computation in curvlens is a loop over :meth:`Experts.iter_tensors`:
for one parameter name it reads that tensor from the base, from every expert and
from every moments file, places them on the device, and releases them when the
consumer moves on. Peak memory is a few tensors per expert, whatever the model size.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint, PathLike
from curvlens.io.dtypes import reads_as_stored
from curvlens.io.paths import expert_names
from curvlens.io.moments import Moments
from curvlens.math.checks import moment_problems, weight_problems
from curvlens.roles import param_role
from curvlens.runtime import progress_bar, resolve_device, threads_for, torch_threads
from curvlens.passes.preflight import preflight_html
from curvlens.tensor_filter import TensorFilter


@dataclass(frozen=True)
class Expert:
    """One fine-tuned model and (optionally) the second moments of its training."""

    name: str
    checkpoint: Checkpoint
    moments: Moments | None = None
    path: Path | None = None


@dataclass
class TensorGroup:
    """Everything curvlens knows about one parameter name, on one device."""

    name: str
    layer: int | None
    role: str
    base: torch.Tensor | None
    experts: list[torch.Tensor]
    moments: list[torch.Tensor] | None
    expert_names: list[str] = field(default_factory=list)

    @property
    def task_vectors(self) -> list[torch.Tensor]:
        """``theta_i - theta_0`` for each expert (needs a base)."""
        if self.base is None:
            raise CurvlensError(f"{self.name}: task vectors need a base model")
        return [e - self.base for e in self.experts]


class Experts:
    """A base checkpoint and named experts, each with its moments.

    Construction checks keys and shapes across base, experts and moments (headers
    only) and reports every difference in one :class:`CurvlensError`, before any
    long computation starts.

    Parameters
    ----------
    base : Checkpoint, path, dict or None
        The common starting point. ``None`` for base-free methods (linear, Fisher,
        OTA as curvature-weighted averaging).
    experts : sequence of Expert
        At least one expert, with unique names.
    exclude : str or list of str, optional
        Tensors to leave out of every pass (patterns of
        :mod:`curvlens.tensor_filter`: ``"classifier"``, ``"*.pooler.*"``,
        ``"role:lm_head"``, ``"name:<exact>"``). Excluded tensors need not line up
        across the models (each task's head may have its own shape), and no
        analysis or merge reads them. See :meth:`without`.
    """

    def __init__(self, base: Checkpoint | PathLike | dict | None, experts: Sequence[Expert], *,
                 exclude: TensorFilter | str | Sequence[str] | None = None):
        self.base = Checkpoint.open(base) if base is not None else None
        self.experts = list(experts)
        self.exclude = TensorFilter.of(exclude)
        self.round_to: torch.dtype | None = None  # see rounded()
        if not self.experts:
            raise CurvlensError("Experts needs at least one expert")
        bad = [type(e).__name__ for e in self.experts if not isinstance(e, Expert)]
        if bad:
            raise CurvlensError(f"experts must be Expert objects (or use Experts.from_dirs); got {bad}")
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CurvlensError(f"expert names must be unique; repeated: {dup}")
        if self.exclude:
            every = {n for _, ckpt in self._models() for n in ckpt.keys()}
            unused = self.exclude.unused(every)
            if unused:
                raise CurvlensError(f"exclude: pattern(s) {unused} match no tensor of the models")
            if not self.tensor_names(floating_only=True):  # nothing left would be silently "no result"
                raise CurvlensError(f"exclude: {list(self.exclude.patterns) or 'the rules'} leave no floating-point "
                                    f"tensor of the {len(self.reference)} to merge or analyse")
        self._check()

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_dirs(
        cls,
        base: PathLike | None,
        dirs: Sequence[PathLike],
        names: Sequence[str] | None = None,
        *,
        moments: bool | Sequence[PathLike | None] = True,
        bias_correction: bool = False,
        exclude: TensorFilter | str | Sequence[str] | None = None,
    ) -> Experts:
        """Open experts laid out as the OTA paper released them.

        Parameters
        ----------
        base : path or None
            Base model dir.
        dirs : sequence of path
            Expert model dirs; each holds ``export/exp_avg_sq.safetensors`` (or an
            ``optimizer.pt``) unless ``moments`` says otherwise.
        names : sequence of str, optional
            Expert names; default: the dir names, with as many parent dirs as it
            takes to tell them apart (``run_a/checkpoint-188``).
        moments : bool or sequence
            ``True``: find moments in each dir (error if absent); ``False``: no
            moments; a sequence: one moments path (or None) per expert.
        bias_correction : bool
            Apply Adam bias correction to every moments file.
        exclude : str or list of str, optional
            Tensors to leave out (see :class:`Experts`).
        """
        if isinstance(dirs, (str, bytes, os.PathLike)) or not isinstance(dirs, Sequence):
            raise CurvlensError(f"dirs must be a list of expert dirs; got {dirs!r}")
        dirs = [Path(d) for d in dirs]
        if names is None:
            names = expert_names(dirs)
        if len(names) != len(dirs):
            raise CurvlensError(f"names has {len(names)} entries but {len(dirs)} expert dirs were given")
        if moments is True:
            sources: list = list(dirs)
        elif moments is False:
            sources = [None] * len(dirs)
        else:
            sources = list(moments)
            if len(sources) != len(dirs):
                raise CurvlensError(f"moments has {len(sources)} entries but {len(dirs)} expert dirs were given")
        experts = []
        for name, d, src in zip(names, dirs, sources):
            try:
                ckpt = Checkpoint.open(d)
                mom = None
                if src is not None:
                    mom = Moments.open(src, checkpoint=ckpt, bias_correction=bias_correction)
            except CurvlensError as err:
                raise CurvlensError(f"expert {name!r}: {err}") from err
            experts.append(Expert(name, ckpt, mom, d))
        return cls(base, experts, exclude=exclude)

    def _models(self) -> list[tuple[str, Checkpoint]]:
        return ([("base", self.base)] if self.base is not None else []) + \
               [(f"expert {e.name!r}", e.checkpoint) for e in self.experts]

    def _check(self) -> None:
        ref = self.reference
        kept = self.tensor_names()
        problems: list[str] = []
        models = self._models()
        ref_label = models[0][0]
        hint = " (leave tensors out with exclude= / Experts.without)"
        for label, ckpt in models[1:]:
            missing = [n for n in kept if n not in ckpt]
            extra = [n for n in ckpt.keys() if n not in ref and not self.exclude(n)]
            if missing:
                problems.append(f"{label} lacks {len(missing)} tensor(s) of {ref_label}: {_head(missing)}")
            if extra:
                problems.append(f"{label} has {len(extra)} tensor(s) {ref_label} lacks: {_head(extra)}")
            for n in kept:
                if n in ckpt and ckpt.shape(n) != ref.shape(n):
                    problems.append(f"{label}: {n} has shape {tuple(ckpt.shape(n))}, "
                                    f"{ref_label} has {tuple(ref.shape(n))}")
        for e in self.experts:
            if e.moments is not None:
                problems += [f"moments of expert {e.name!r} ({e.moments.label}): {p}"
                             for p in e.moments.shape_problems(e.checkpoint, skip=self.exclude)]
        if problems:
            raise CurvlensError("experts do not line up" + (hint if not self.exclude else "") + ":\n  "
                                + "\n  ".join(problems))

    # -- information (no tensor data read) ----------------------------------------
    @property
    def reference(self) -> Checkpoint:
        """The checkpoint defining names, shapes and order: the base, else the first expert."""
        return self.base if self.base is not None else self.experts[0].checkpoint

    def model(self, source: str) -> Checkpoint:
        """The checkpoint ``source`` names: ``"base"`` or an expert's name (as a
        merge's ``tensors`` actions do)."""
        return self.base if source == "base" else self[source].checkpoint

    def model_dir(self, source: str | None = None) -> Path | None:
        """The dir of model ``source`` (default: the reference), whose config and
        tokenizer files a written model copies; None for an in-memory model."""
        path = (self.reference if source is None else self.model(source)).path
        return None if path is None else (path if path.is_dir() else path.parent)

    def shape(self, name: str) -> torch.Size:
        """Shape of tensor ``name`` (the reference's; no data read)."""
        return self.reference.shape(name)

    def stored_dtype(self, name: str) -> torch.dtype:
        """The experts' dtype of tensor ``name``, promoted across experts (bf16 and
        fp32 give fp32); integer tensors, carried from the reference, keep its dtype."""
        ref = self.reference.dtype(name)
        if not ref.is_floating_point:
            return ref
        out = self.experts[0].checkpoint.dtype(name)
        for e in self.experts[1:]:
            out = torch.promote_types(out, e.checkpoint.dtype(name))
        return out

    @property
    def names(self) -> list[str]:
        """Expert names, in order."""
        return [e.name for e in self.experts]

    @property
    def has_moments(self) -> bool:
        """Whether every expert has second moments."""
        return all(e.moments is not None for e in self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        raise CurvlensError(f"no expert named {name!r}; experts are {self.names}")

    def __repr__(self) -> str:
        base = self.base.label if self.base is not None else None
        excl = f", exclude={list(self.exclude.patterns)}" if self.exclude else ""
        return f"Experts(base={base!r}, experts={self.names}, moments={self.has_moments}{excl})"

    def input_paths(self) -> list[Path]:
        """Every file or dir the models and moments are read from (an output must
        not touch any of them)."""
        paths = [self.base.path] if self.base is not None else []
        for e in self.experts:
            paths += [e.path, e.checkpoint.path, e.moments.path if e.moments is not None else None]
        return list(dict.fromkeys(p for p in paths if p is not None))

    def tensor_names(self, *, floating_only: bool = False) -> list[str]:
        """Parameter names in the reference checkpoint's order, excluded ones left out."""
        ref = self.reference
        return [n for n in ref.keys()
                if not self.exclude(n) and (not floating_only or ref.dtype(n).is_floating_point)]

    def excluded_names(self) -> list[str]:
        """The reference's tensors that :attr:`exclude` leaves out."""
        return self.exclude.select(self.reference.keys())

    def without(self, patterns: TensorFilter | str | Sequence[str]) -> Experts:
        """The same models with more tensors left out of every pass.

        Examples
        --------
        >>> import torch
        >>> sd = {"body.weight": torch.ones(2, 2), "body.bias": torch.ones(2), "classifier.weight": torch.ones(3, 2)}
        >>> other = {**sd, "classifier.weight": torch.ones(5, 2)}
        >>> ex = Experts(None, [Expert("a", Checkpoint.open(sd)), Expert("b", Checkpoint.open(other))],
        ...              exclude="classifier")
        >>> ex.tensor_names(), ex.without("body.bias").excluded_names()
        (['body.weight', 'body.bias'], ['body.bias', 'classifier.weight'])
        """
        out = Experts(self.base, self.experts, exclude=self.exclude | TensorFilter.of(patterns))
        out.round_to = self.round_to
        return out

    def rounded(self, dtype: torch.dtype | None) -> Experts:
        """The same models, every pass reading their floating weights (not the
        moments) rounded to ``dtype`` first, as mergekit reads inputs in its
        config's ``dtype``. None: as stored. A rounding that changes no value is
        skipped (:func:`~curvlens.io.dtypes.reads_as_stored`)."""
        out = Experts(self.base, self.experts, exclude=self.exclude)
        out.round_to = dtype
        return out

    def _repr_html_(self) -> str:
        return preflight_html(self)  # the moments' sources and levels, before any merge

    def describe(self):
        """The reference checkpoint's ``describe()`` (no data read)."""
        return self.reference.describe()

    def subset(self, names: Sequence[str]) -> Experts:
        """The same base with only the named experts, in the given order."""
        return Experts(self.base, [self[n] for n in names], exclude=self.exclude)

    # -- streaming -----------------------------------------------------------------
    def iter_tensors(
        self,
        names: Sequence[str] | None = None,
        *,
        device: str | torch.device | None = "auto",
        dtype: torch.dtype | None = torch.float32,
        moments: bool = True,
        base: bool = True,
        experts: bool = True,
        progress: bool = True,
        desc: str = "tensors",
        prefetch_bytes: int = 1 << 30,
        threads: int | None = None,
    ) -> Iterator[TensorGroup]:
        """Yield one :class:`TensorGroup` per parameter name.

        The next name's tensors are read in a background thread while the caller
        works on the current one, so disk reads overlap computation (within
        ``prefetch_bytes``).

        Parameters
        ----------
        names : sequence of str, optional
            Which tensors (default: all, in reference order).
        device : str or torch.device
            ``"auto"``: CUDA when available, else CPU.
        dtype : torch.dtype or None
            Cast floating tensors to this dtype on the device (default fp32; None
            keeps the stored dtype). Moments are always fp32.
        moments, base, experts : bool
            Which inputs to read (skip what a pass does not need).
        progress : bool
            Show a tqdm progress bar.
        prefetch_bytes : int
            Read the next group ahead only when it and the current one together
            take at most this many bytes (default 1 GiB), so peak memory stays about
            one large group plus this budget.
        threads : int, optional
            Torch intra-op threads while the pass runs (the consumer's math
            included); default :func:`curvlens.runtime.get_threads` on a CPU (1:
            a busy machine makes more threads many times slower).
        """
        dev = resolve_device(device)
        names = list(self.tensor_names() if names is None else names)
        ref = self.reference
        unknown = [n for n in names if n not in ref]
        if unknown:
            raise CurvlensError(f"unknown tensor name(s): {_head(unknown)}")
        if moments and not self.has_moments:
            lacking = [e.name for e in self.experts if e.moments is None]
            raise CurvlensError(f"second moments requested but expert(s) {lacking} have none")

        def place(t: torch.Tensor) -> torch.Tensor:
            t = t.to(dev, non_blocking=True)
            if self.round_to is not None and t.is_floating_point() and not reads_as_stored(t.dtype, self.round_to):
                t = t.to(self.round_to)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        def load(name: str) -> TensorGroup:
            # Read (and checked) in the prefetch thread: a NaN weight or a negative
            # moment stops the pass naming its tensor and expert, whatever consumes it.
            layer, role = param_role(name)
            floating = ref.dtype(name).is_floating_point
            b = None
            if base and self.base is not None:
                b = place(_checked_weight(_read(self.base, name, None), name, "the base model"))
            xs = [place(_checked_weight(_read(e.checkpoint, name, e.name), name, f"expert {e.name!r}"))
                  for e in self.experts] if experts else []
            ms = None
            if moments and floating:
                ms = [_checked_moment(_read(e.moments, name, e.name), name, e).to(dev) for e in self.experts]
            return TensorGroup(name, layer, role, b, xs, ms, self.names)

        n_inputs = (1 if base and self.base is not None else 0) + (len(self.experts) if experts else 0)

        def nbytes(name: str) -> int:
            # what one group occupies once placed (fp32 after the cast)
            item = dtype.itemsize if dtype is not None else ref.dtype(name).itemsize
            n = ref.shape(name).numel()
            return n * (item * n_inputs + (4 * len(self.experts) if moments else 0))

        bar = progress_bar(len(names), desc, progress)
        with torch_threads(threads_for(dev, threads)), \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="curvlens-read") as pool:
            pending = pool.submit(load, names[0]) if names else None
            for i in range(len(names)):
                group = pending.result() if pending is not None else load(names[i])
                pending = None
                # Read ahead only while two groups fit the budget: a 128k-vocab
                # embedding must not be held twice.
                if i + 1 < len(names) and nbytes(names[i]) + nbytes(names[i + 1]) <= prefetch_bytes:
                    pending = pool.submit(load, names[i + 1])
                yield group
                del group
                bar.update(1)
        bar.close()


def _read(source, name: str, expert: str | None) -> torch.Tensor:
    who = f"expert {expert!r}" if expert is not None else "the base model"
    try:
        return source[name]
    except CurvlensError as err:
        raise CurvlensError(f"{who}: {err}") from err
    except KeyError:
        raise CurvlensError(f"{who}: no tensor {name!r} in {source.label}") from None


def _checked_weight(t: torch.Tensor, name: str, who: str) -> torch.Tensor:
    problem = weight_problems(t)
    if problem is not None:
        raise CurvlensError(f"{who}, tensor {name!r}: {problem}")
    return t


def _checked_moment(v: torch.Tensor, name: str, e: Expert) -> torch.Tensor:
    problem = moment_problems(v)
    if problem is not None:
        raise CurvlensError(f"expert {e.name!r}, tensor {name!r}: {problem} (in {e.moments.label})")
    return v


def _head(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
