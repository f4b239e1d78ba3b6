"""``estimate_fisher``: a real diagonal (empirical) Fisher from data, in the moments layout.

Fisher-weighted averaging (Matena & Raffel) weights each expert by its Fisher; the
OTA paper uses Adam's ``exp_avg_sq`` in its place. This driver computes the
*empirical* Fisher of a model on data,

    F = (1/N) sum_i (d loss_i / d theta)**2,

the mean over examples of the squared per-example gradient, and writes it where
and how curvlens reads ``exp_avg_sq`` (``<out>/export/exp_avg_sq.safetensors``, fp32,
keyed by parameter name), so that :meth:`Experts.from_dirs` (``moments=[...]``), every
analysis and every merge take it unchanged. The file's metadata says what it is
(``kind=empirical_fisher``, ``n_examples``, ``loss``, ``dtype``) and carries no
``step`` / ``beta2``, so Adam bias correction cannot be applied to it by mistake.

Memory: the model, one fp32 accumulator per parameter, and the per-example
gradients of one chunk of ``chunk_size`` examples (``torch.func.vmap(grad)``), never more.
The tensor math lives in :mod:`curvlens.math.empirical_fisher`.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from curvlens.errors import CurvlensError
from curvlens.io.architecture import read_config
from curvlens.io.atomic import check_output
from curvlens.io.paths import is_inside
from curvlens.io.checkpoint import Checkpoint, PathLike
from curvlens.io.moments import EXPORT_RELPATH, Moments
from curvlens.io.writer import write_tensor_file
from curvlens.math.empirical_fisher import (
    SquaredGradSum,
    causal_lm_loss,
    causal_mask_4d,
    check_token_batch,
    per_example_grads,
)
from curvlens.runtime import threads_for, torch_threads
from curvlens.runtime import resolve_device

#: ``kind`` in the metadata of a file written by :func:`estimate_fisher`.
FISHER_KIND = "empirical_fisher"
_LOSSES = {
    "causal_lm": "causal_lm: mean next-token cross-entropy over the example's labelled tokens (labels != -100)",
    "model": "model: the model's own outputs.loss on the single example (labels passed in)",
}


def fisher_path(out: PathLike) -> Path:
    """Where :func:`estimate_fisher` writes for ``out``: ``out`` itself when it names a
    ``.safetensors`` file, else ``out/export/exp_avg_sq.safetensors``.

    Examples
    --------
    >>> fisher_path("fisher/math").as_posix(), fisher_path("f.safetensors").as_posix()
    ('fisher/math/export/exp_avg_sq.safetensors', 'f.safetensors')
    """
    out = Path(out).expanduser()
    return out if out.suffix == ".safetensors" else out / EXPORT_RELPATH


def estimate_fisher(
    model: PathLike | torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    out: PathLike | None = None,
    *,
    loss: str | Callable = "causal_lm",
    chunk_size: int = 16,
    max_examples: int | None = None,
    device: str | torch.device | None = "auto",
    model_class=None,
    vectorize: bool | str = "auto",
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> Moments:
    """The diagonal empirical Fisher of ``model`` on ``batches``, written in the moments layout.

    Parameters
    ----------
    model : path or torch.nn.Module
        An HF model dir, loaded with ``model_class.from_pretrained`` (default
        ``AutoModelForCausalLM``) with ``trust_remote_code=False`` and
        ``use_safetensors=True`` (no checkpoint code runs, no pickle is read), in
        fp32; or an already-built module (left where it is: the computation uses
        copies of its parameters on ``device``; its train/eval mode is restored).
    batches : iterable of dict
        HF-style batches: ``input_ids``, ``attention_mask``, ``labels`` (and any other
        model inputs), each a tensor whose first dim indexes the examples. Every
        row is one example.
    out : path, optional
        A ``.safetensors`` file, or a dir: then ``out/export/exp_avg_sq.safetensors``
        (the layout ``Experts.from_dirs`` reads). The file is written atomically
        (a hidden temporary beside it, renamed in). It is never written over an
        existing file without ``overwrite=True``, never straight into the model
        dir (where the weights live), and only into the model dir's ``export/``
        when ``out`` names that dir. None: kept in memory.
    loss : {"causal_lm", "model"} or callable
        The per-example loss. ``"causal_lm"``: the mean next-token cross-entropy
        over the example's tokens whose label is not -100, the loss HF's causal
        LMs compute on one row (a 2-D ``attention_mask`` is turned into the
        equivalent 4-D causal mask, which ``vmap`` can trace). ``"model"``: the
        model's own ``outputs.loss`` (labels passed in). A callable
        ``loss(outputs, example) -> scalar``: the model is called with the
        example's keys except ``labels`` (each with a leading batch dim of 1).
    chunk_size : int
        Examples whose per-example gradients are computed together (and held in
        memory at once).
    max_examples : int, optional
        Stop after this many examples.
    device : str or torch.device
        ``"auto"``: CUDA when available, else CPU.
    model_class : class or str, optional
        A transformers auto class (or its name) to load a model dir with.
    vectorize : bool or "auto"
        ``True``: ``torch.func.vmap`` over each chunk; ``False``: one example at a
        time; ``"auto"``: vmap, falling back (with a warning) to one at a time
        when the model's forward cannot be vmapped (it branches on data).
    overwrite : bool
        Replace an existing output file.
    threads : int, optional
        Torch threads on a CPU (default :func:`curvlens.runtime.get_threads`).
    progress : bool
        Show a progress bar over examples.

    Returns
    -------
    Moments
        The Fisher as second moments (fp32, keyed by parameter name; read from
        the written file when ``out`` is given, ``.path`` is that file), with
        ``fisher_info`` set to the metadata written plus ``seconds``.

    Raises
    ------
    CurvlensError
        Bad batches (no rows, rows that disagree, no labels for ``causal_lm``), no
        examples at all, a non-finite gradient, or an output that exists or would
        land among the model's weights.

    Examples
    --------
    >>> lin = torch.nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    >>> batch = {"input": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "labels": torch.tensor([0.0, 1.0])}
    >>> mse = lambda out, ex: 0.5 * (out[0, 0] - ex["labels"]) ** 2   # grad (w.x - y) x
    >>> f = estimate_fisher(lin, [batch], loss=mse, device="cpu", progress=False)
    >>> f["weight"]                                       # mean of [1, 0]**2 and [2, 2]**2
    tensor([[2.5000, 2.0000]])
    """
    file = fisher_path(out) if out is not None else None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise CurvlensError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise CurvlensError(f"max_examples must be None or an int >= 1; got {max_examples!r}")
    if vectorize not in (True, False, "auto"):
        raise CurvlensError(f"vectorize must be True, False or 'auto'; got {vectorize!r}")
    if not callable(loss) and loss not in _LOSSES:
        raise CurvlensError(f"loss must be one of {sorted(_LOSSES)} or a callable (outputs, example) -> "
                            f"scalar; got {loss!r}")
    model_dir = None
    if isinstance(model, (str, os.PathLike)):
        model_dir = Path(model)
        if file is not None:
            _check_out(file, model_dir, overwrite)
    elif not isinstance(model, torch.nn.Module):
        raise CurvlensError(f"model must be an HF model dir or a torch.nn.Module; got {type(model).__name__}")
    elif file is not None:
        _check_out(file, None, overwrite)
    dev = resolve_device(device)
    start = time.perf_counter()
    with torch_threads(threads_for(dev, threads)):
        module = _load(model_dir, model_class, progress) if model_dir is not None else model
        was_training = module.training
        module.eval()
        try:
            sums, mode = _accumulate(module, batches, loss, chunk_size, max_examples, dev, vectorize, progress)
        finally:
            module.train(was_training)
    fisher = sums.mean()
    tensors = _named_for_checkpoint(module, fisher, model_dir)
    info = {
        "format": "pt",
        "content": "empirical fisher",
        "kind": FISHER_KIND,
        "n_examples": str(sums.n),
        "loss": f"callable: {getattr(loss, '__qualname__', repr(loss))}" if callable(loss) else _LOSSES[loss],
        "dtype": "float32",
        "model_dtype": str(next(iter(module.parameters())).dtype).replace("torch.", ""),
        "per_example": mode,
        "chunk_size": str(chunk_size),
        "model": str(model_dir) if model_dir is not None else type(module).__name__,
    }
    seconds = time.perf_counter() - start
    if file is None:
        m = Moments.open(tensors)
    else:
        write_tensor_file(tensors, file, metadata=info, overwrite=overwrite, inputs=_model_files(model_dir))
        m = Moments.open(file)
    m.fisher_info = {**info, "seconds": seconds}
    return m


# ------------------------------------------------------------------ pieces
def _check_out(file: Path, model_dir: Path | None, overwrite: bool) -> None:
    real = file.parent.resolve() / file.name
    if model_dir is not None and real.parent == model_dir.resolve():
        raise CurvlensError(f"output {file}: lies beside the weights of the model dir {model_dir}; "
                            f"write the Fisher to a dir (it goes to <dir>/{EXPORT_RELPATH.as_posix()}) "
                            "or a file elsewhere")
    if model_dir is not None and is_inside(real, model_dir.resolve()) \
            and real != model_dir.resolve() / EXPORT_RELPATH:
        raise CurvlensError(f"output {file} lies inside the input model dir {model_dir}; only "
                            f"<model dir>/{EXPORT_RELPATH.as_posix()} (out=the model dir) goes there")
    check_output(file, _model_files(model_dir), is_file=True)
    if (real.exists() or real.is_symlink()) and not overwrite:
        raise CurvlensError(f"{file} already exists; pass overwrite=True to replace it")


def _load(model_dir: Path, model_class, progress: bool = True) -> torch.nn.Module:
    if not model_dir.is_dir():
        raise CurvlensError(f"{model_dir}: not a dir; expected an HF model dir (or pass a built model)")
    # transformers follows any symlink: first check every file it will read stays inside
    Checkpoint.open(model_dir)
    read_config(model_dir)
    import transformers

    cls = model_class if model_class is not None else "AutoModelForCausalLM"
    if isinstance(cls, str):
        if not cls.startswith("AutoModel") or not hasattr(transformers, cls):
            raise CurvlensError(f"model_class={cls!r} is not a transformers AutoModel class name")
        cls = getattr(transformers, cls)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(model_dir, trust_remote_code=False, use_safetensors=True,
                                   dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise CurvlensError(f"{model_dir}: could not load the model with {cls.__name__} (safetensors "
                            f"only, no remote code): {err}") from err
    finally:
        if bars and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def _rows(batches, max_examples: int | None) -> Iterable[dict[str, torch.Tensor]]:
    """Batches -> dicts of tensors with a common first dim, cut at ``max_examples``."""
    seen = 0
    for k, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or not batch:
            raise CurvlensError(f"batch {k}: expected a non-empty dict of tensors (input_ids, "
                                f"attention_mask, labels); got {type(batch).__name__}")
        b = {}
        for key, v in batch.items():
            if not isinstance(v, torch.Tensor):
                try:
                    v = torch.as_tensor(v)
                except (TypeError, ValueError, RuntimeError) as err:
                    raise CurvlensError(f"batch {k}: {key!r} is not a tensor or array of numbers ({err})") from err
            if v.dim() == 0:
                raise CurvlensError(f"batch {k}: {key!r} is a scalar; every value needs a leading example dim")
            b[key] = v
        n = {int(v.shape[0]) for v in b.values()}
        if len(n) != 1:
            raise CurvlensError(f"batch {k}: the tensors disagree on the number of examples: "
                                f"{ {key: int(v.shape[0]) for key, v in b.items()} }")
        n = n.pop()
        if max_examples is not None:
            n = min(n, max_examples - seen)
            b = {key: v[:n] for key, v in b.items()}
        if n:
            yield b
        seen += n
        if max_examples is not None and seen >= max_examples:
            return


def _loss_fn(module: torch.nn.Module, loss, buffers: dict[str, torch.Tensor]):
    from torch.func import functional_call

    def call(p, inputs, **extra):
        return functional_call(module, {**p, **buffers}, (), {**{k: v[None] for k, v in inputs.items()}, **extra})

    if loss == "causal_lm":
        def f(p, ex):
            inputs = {k: v for k, v in ex.items() if k != "labels"}
            out = call(p, inputs, use_cache=False)
            return causal_lm_loss(out.logits[0], ex["labels"])
    elif loss == "model":
        def f(p, ex):
            return call(p, ex).loss
    else:
        def f(p, ex):
            return loss(call(p, {k: v for k, v in ex.items() if k != "labels"}), ex)
    return f


def _prepare(batch: dict[str, torch.Tensor], loss, dev) -> dict[str, torch.Tensor]:
    b = {k: v.to(dev) for k, v in batch.items()}
    if loss == "causal_lm":
        if "input_ids" not in b or "labels" not in b:
            raise CurvlensError(f"loss='causal_lm' needs 'input_ids' and 'labels' in every batch; got "
                                f"{sorted(b)} (for plain LM data, labels = input_ids with padding set to -100)")
        if b["labels"].shape != b["input_ids"].shape:
            raise CurvlensError(f"labels shape {tuple(b['labels'].shape)} != input_ids shape "
                                f"{tuple(b['input_ids'].shape)}")
        if "attention_mask" in b and b["attention_mask"].dim() == 2:
            b["attention_mask"] = causal_mask_4d(b["attention_mask"])
    return b


def _accumulate(module, batches, loss, chunk_size, max_examples, dev, vectorize, progress):
    from tqdm.auto import tqdm

    params = {n: p.detach().to(dev) for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise CurvlensError("the model has no trainable parameters (requires_grad=True) to take a Fisher of")
    buffers = {n: b.detach().to(dev) for n, b in module.named_buffers()}
    f = _loss_fn(module, loss, buffers)
    vocab = _vocab_size(module)
    labels = {"causal_lm": "tokens", "model": "classes"}.get(loss, "any") if isinstance(loss, str) else "any"
    sums = SquaredGradSum()
    mode = "vmap" if vectorize in (True, "auto") else "loop"
    bar = tqdm(total=max_examples, desc="empirical fisher", unit="ex", disable=not progress, leave=False)
    with bar, warnings.catch_warnings():
        # torch.func runs SDPA one row at a time under vmap and says so on every call
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        for batch in _rows(batches, max_examples):
            check_token_batch(batch, vocab, labels=labels, first_example=sums.n)
            b = _prepare(batch, loss, dev)
            n = next(iter(b.values())).shape[0]
            for s in range(0, n, chunk_size):
                chunk = {k: v[s:s + chunk_size] for k, v in b.items()}
                try:
                    try:
                        grads = per_example_grads(f, params, chunk, vectorize=mode == "vmap")
                    except RuntimeError as err:
                        if vectorize != "auto" or mode != "vmap" or sums.n:
                            raise
                        warnings.warn(f"estimate_fisher: vmap cannot trace this model's loss ({str(err)[:160]}); "
                                      "taking per-example gradients one example at a time", stacklevel=4)
                        mode = "loop"
                        grads = per_example_grads(f, params, chunk, vectorize=False)
                except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as err:
                    # the model's own forward rejected the data: say which examples
                    raise CurvlensError(f"examples {sums.n}..{sums.n + len(next(iter(chunk.values()))) - 1}: "
                                        f"the model's forward or loss failed ({type(err).__name__}: "
                                        f"{str(err).splitlines()[0][:300] if str(err) else ''})") from err
                bad = [k for k, g in grads.items() if not bool(torch.isfinite(g).all())]
                if bad:
                    raise CurvlensError(f"non-finite per-example gradients for {bad[:5]} (examples "
                                        f"{sums.n}..{sums.n + len(next(iter(chunk.values()))) - 1})")
                sums.add(grads)
                del grads
                bar.update(len(next(iter(chunk.values()))))
    if sums.n == 0:
        raise CurvlensError("batches held no examples; the empirical Fisher needs at least one")
    return sums, mode


def _vocab_size(module: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding (HF models), else None."""
    get = getattr(module, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


def _named_for_checkpoint(module: torch.nn.Module, fisher: dict[str, torch.Tensor],
                          model_dir: Path | None) -> dict[str, torch.Tensor]:
    """Fisher per parameter name as the model's checkpoint names them: a tied
    parameter under every name the checkpoint stores it under."""
    out = {k: v.to("cpu").contiguous() for k, v in fisher.items()}
    if model_dir is None:
        return out
    try:
        keys = set(Checkpoint.open(model_dir).keys())
    except CurvlensError:
        return out
    canonical = {id(p): n for n, p in module.named_parameters()}
    for alias, p in module.named_parameters(remove_duplicate=False):
        name = canonical.get(id(p))
        if alias not in out and name in out and alias in keys:
            out[alias] = out[name].clone()
    return {k: v for k, v in out.items() if k in keys} or out


def _model_files(model_dir: Path | None) -> list[Path]:
    """What loading the model reads: every entry of its dir but ``export/``."""
    if model_dir is None or not model_dir.is_dir():
        return []
    return [p for p in model_dir.iterdir() if p.name != EXPORT_RELPATH.parts[0]]
