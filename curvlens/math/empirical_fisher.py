"""The diagonal empirical Fisher: the mean over examples of squared per-example gradients.

Pure tensor functions (tensors and functions in, tensors out), used by
:func:`curvlens.passes.fisher_estimate.estimate_fisher`:

* :func:`per_example_grads` -- the gradient of a per-example loss for every row of a
  chunk, with ``torch.func`` (``vmap(grad)``) or one row at a time;
* :class:`SquaredGradSum` -- accumulates ``sum_i g_i**2`` in fp32 per parameter and
  counts the examples; its :meth:`~SquaredGradSum.mean` is the empirical Fisher
  ``F = (1/N) sum_i g_i**2``;
* :func:`causal_lm_loss` -- a causal LM's per-example loss, the mean token
  cross-entropy over the example's labelled tokens (as HF computes it for one row);
* :func:`causal_mask_4d` -- a row's 0/1 attention mask as the additive causal mask
  HF decoders accept (2-D masks make HF branch on data, which ``vmap`` cannot);
* :func:`check_token_batch` -- token ids, labels and masks a model can take, checked
  before any forward pass (an out-of-range id is an error, never an index crash).

Memory: the per-example gradients of one chunk (``chunk x`` the parameters) plus the
fp32 sums (once the parameters).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from curvlens.errors import CurvlensError

Tensor = torch.Tensor
IGNORE_INDEX = -100


class SquaredGradSum:
    """Running ``sum_i g_i**2`` per parameter (fp32) and the number of examples.

    Examples
    --------
    >>> acc = SquaredGradSum()
    >>> acc.add({"w": torch.tensor([[1.0, 2.0], [3.0, 0.0]])})  # two examples' grads
    >>> acc.add({"w": torch.tensor([[0.0, 2.0]])})
    >>> acc.n, acc.mean()["w"]
    (3, tensor([3.3333, 2.6667]))
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.n = 0

    def add(self, grads: Mapping[str, Tensor]) -> None:
        """Add a chunk: ``{name: tensor of shape (examples, *param_shape)}``."""
        counts = {int(g.shape[0]) for g in grads.values()}
        if len(counts) != 1:
            raise CurvlensError(f"per-example gradients disagree on the number of examples: {sorted(counts)}")
        for name, g in grads.items():
            sq = g.detach().float().square().sum(dim=0)
            if name in self.sums:
                if self.sums[name].shape != sq.shape:
                    raise CurvlensError(f"{name}: gradient shape {tuple(sq.shape)} != "
                                        f"{tuple(self.sums[name].shape)} seen before")
                self.sums[name] += sq
            else:
                self.sums[name] = sq
        self.n += counts.pop()

    def mean(self) -> dict[str, Tensor]:
        """``{name: sum_i g_i**2 / N}``; an error before any example was added."""
        if self.n == 0:
            raise CurvlensError("no examples: the empirical Fisher needs at least one")
        return {k: v / self.n for k, v in self.sums.items()}


def per_example_grads(loss: Callable[..., Tensor], params: Mapping[str, Tensor], chunk: Mapping[str, Tensor],
                      *, vectorize: bool = True) -> dict[str, Tensor]:
    """The gradient of ``loss(params, example)`` w.r.t. ``params`` for every row of ``chunk``.

    Parameters
    ----------
    loss : callable
        ``loss(params, example) -> scalar`` where ``example`` maps each key of
        ``chunk`` to one row (the leading dim removed).
    params : mapping
        Name -> tensor (detached).
    chunk : mapping
        Name -> tensor whose first dim indexes the examples (all the same length).
    vectorize : bool
        ``torch.func.vmap`` over the rows (one pass, ``rows x`` the parameters in
        memory); False: one row at a time, stacked (for losses ``vmap`` cannot
        trace, e.g. ones that branch on data).

    Returns
    -------
    dict
        Name -> tensor of shape ``(rows, *param.shape)``.

    Examples
    --------
    >>> w = {"w": torch.tensor([1.0, 2.0])}
    >>> xs = {"x": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "y": torch.tensor([0.0, 1.0])}
    >>> mse = lambda p, ex: 0.5 * (p["w"] @ ex["x"] - ex["y"]) ** 2   # grad (w.x - y) x
    >>> per_example_grads(mse, w, xs)["w"]
    tensor([[1., 0.],
            [2., 2.]])
    """
    from torch.func import grad, vmap

    rows = {int(v.shape[0]) for v in chunk.values()}
    if len(rows) != 1:
        raise CurvlensError(f"the example tensors disagree on the number of rows: {sorted(rows)}")
    g = grad(loss)
    if vectorize:
        return vmap(g, in_dims=(None, 0))(dict(params), dict(chunk))
    per_row = [g(dict(params), {k: v[i] for k, v in chunk.items()}) for i in range(rows.pop())]
    return {k: torch.stack([r[k] for r in per_row]) for k in params}


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """One example's causal LM loss: mean cross-entropy of the next token over the
    positions whose label is not ``-100`` (0 when there are none).

    ``logits`` is ``(seq, vocab)``, ``labels`` ``(seq,)`` aligned with the inputs
    (shifted here, as HF does).

    Examples
    --------
    >>> logits = torch.zeros(3, 4)                       # uniform over 4 tokens
    >>> float(causal_lm_loss(logits, torch.tensor([-100, 2, -100])))  # log 4
    1.3862943649291992
    """
    target = labels[1:]
    valid = (target != IGNORE_INDEX).to(logits.dtype)
    ce = torch.nn.functional.cross_entropy(logits[:-1].float(), target.clamp_min(0), reduction="none")
    return (ce * valid).sum() / valid.sum().clamp_min(1.0)


def causal_mask_4d(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows' 0/1 key masks ``(rows, seq)`` -> additive causal masks ``(rows, 1, seq, seq)``:
    0 where a query may attend a key (earlier or same position, key not padding),
    the dtype's minimum elsewhere. A padding query also sees itself (so that no
    softmax row is empty); no real token ever sees a padding key.

    Examples
    --------
    >>> m = causal_mask_4d(torch.tensor([[1, 1, 0]]))
    >>> (m[0, 0] == 0).int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    n = attention_mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    # a padding query that may see nothing would give NaN softmax rows: let it see itself
    allowed |= torch.eye(n, dtype=torch.bool, device=attention_mask.device)[None]
    out = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def check_token_batch(batch: Mapping[str, Tensor], vocab_size: int | None, *, labels: str = "tokens",
                      first_example: int = 0) -> None:
    """Refuse a batch whose token ids, labels or attention mask a model cannot take.

    Parameters
    ----------
    batch : mapping
        ``input_ids``, ``labels``, ``attention_mask`` (each optional), first dim
        the examples.
    vocab_size : int or None
        Rows of the model's input embedding (None: ids checked only to be >= 0).
    labels : {"tokens", "classes", "any"}
        ``"tokens"``: next-token labels, each -100 (ignored) or an id below
        ``vocab_size``; ``"classes"``: integer labels -100 or >= 0 (the model
        checks its own upper bound); ``"any"``: a caller's own loss reads them.
    first_example : int
        Index of the batch's first example, for the message.

    Raises
    ------
    CurvlensError
        Non-integer or out-of-range ids, a negative label other than -100 (which
        a loss would otherwise read as token 0), a NaN in a mask, a 2-D mask that
        is not 0/1.

    Examples
    --------
    >>> check_token_batch({"input_ids": torch.tensor([[1, 7]])}, 5)
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: examples 0..0: input_ids hold token ids up to 7, but the model's vocabulary has 5 tokens (ids 0..4)
    """
    n = next((int(v.shape[0]) for v in batch.values() if isinstance(v, Tensor) and v.dim()), 0)
    where = f"examples {first_example}..{first_example + n - 1}"

    def ints(key: str, t: Tensor) -> None:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise CurvlensError(f"{where}: {key} must be integer token ids; got dtype {t.dtype}")

    ids = batch.get("input_ids")
    if isinstance(ids, Tensor):
        ints("input_ids", ids)
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0:
                raise CurvlensError(f"{where}: input_ids hold a negative token id ({lo}); ids are 0.."
                                    f"{vocab_size - 1 if vocab_size else 'vocab - 1'}")
            if vocab_size is not None and hi >= vocab_size:
                raise CurvlensError(f"{where}: input_ids hold token ids up to {hi}, but the model's vocabulary "
                                    f"has {vocab_size} tokens (ids 0..{vocab_size - 1})")
    lab = batch.get("labels")
    if isinstance(lab, Tensor) and labels != "any":
        ints("labels", lab)
        used = lab[lab != IGNORE_INDEX]
        if used.numel():
            lo, hi = int(used.min()), int(used.max())
            if lo < 0:
                raise CurvlensError(f"{where}: labels hold {lo}; a label is {IGNORE_INDEX} (ignored) or >= 0 "
                                    "(a negative one would be read as token 0)")
            if labels == "tokens" and vocab_size is not None and hi >= vocab_size:
                raise CurvlensError(f"{where}: labels hold token ids up to {hi}, but the model's vocabulary has "
                                    f"{vocab_size} tokens (ids 0..{vocab_size - 1}; -100 = ignored)")
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.numel():
        if mask.is_floating_point() and bool(torch.isnan(mask).any()):
            raise CurvlensError(f"{where}: attention_mask holds NaN; expected 1 (attend) or 0 (padding)")
        if mask.dim() == 2 and not bool(((mask == 0) | (mask == 1)).all()):
            raise CurvlensError(f"{where}: attention_mask must hold only 1 (attend) and 0 (padding); got "
                                f"values such as {sorted({float(x) for x in mask.unique()[:5]})}")
