"""Examples for a data Fisher from a file: token ids as JSON lines, or text lines.

``curvlens fisher`` reads one of two files, both untrusted:

* ``.jsonl``: one example per line, a JSON object with ``input_ids`` (a list of
  ints), optionally ``labels`` (ints, -100 for tokens the loss skips; default
  ``input_ids``) of the same length;
* ``.txt``: one example per non-empty line, tokenized by a tokenizer the caller
  passes (the model's own).

:func:`padded_batches` turns the examples into HF batches (``input_ids``,
``attention_mask``, ``labels``), right-padded, the padding masked out of the
attention and the loss: what :func:`curvlens.estimate_fisher` takes.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from curvlens.errors import CurvlensError

#: Label of a token the loss skips (as HF and PyTorch's cross-entropy).
IGNORE = -100
#: Largest file read (bytes): token data for a diagonal Fisher is small; a larger
#: file is refused rather than read into memory.
MAX_BYTES = 256 * 2**20


def _lines(path: Path) -> list[str]:
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise CurvlensError(f"{path}: {size:,} bytes; token data files are read whole, up to {MAX_BYTES:,}")
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CurvlensError(f"{path}: cannot read ({err})") from err


def _ids(value, where: str, what: str, vocab_size: int | None, allow_ignore: bool) -> list[int]:
    if not isinstance(value, list) or not value:
        raise CurvlensError(f"{where}: {what!r} must be a non-empty list of token ids; got {str(value)[:60]}")
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int):
            raise CurvlensError(f"{where}: {what!r} holds {x!r}; expected ints")
        if allow_ignore and x == IGNORE:
            continue
        if x < 0 or (vocab_size is not None and x >= vocab_size):
            top = f" < {vocab_size} (the model's vocab_size)" if vocab_size is not None else ""
            raise CurvlensError(f"{where}: {what!r} holds token id {x}; expected 0 <= id{top}")
    return value


def read_token_jsonl(path, *, vocab_size: int | None = None) -> list[dict[str, list[int]]]:
    """The examples of a JSON-lines file: ``[{"input_ids": [...], "labels": [...]}]``.

    Raises
    ------
    CurvlensError
        A line that is not a JSON object with a non-empty ``input_ids`` list of
        ints (in ``[0, vocab_size)`` when given), unknown keys, ``labels`` of
        another length; a file with no example.
    """
    path = Path(path)
    out = []
    for i, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise CurvlensError(f"{where}: not a JSON object ({err})") from err
        if not isinstance(obj, dict) or "input_ids" not in obj:
            raise CurvlensError(f"{where}: expected an object with 'input_ids' (and optionally 'labels')")
        extra = sorted(set(obj) - {"input_ids", "labels"})
        if extra:
            raise CurvlensError(f"{where}: unknown key(s) {extra}; expected 'input_ids' and optionally 'labels'")
        ids = _ids(obj["input_ids"], where, "input_ids", vocab_size, allow_ignore=False)
        labels = _ids(obj.get("labels", ids), where, "labels", vocab_size, allow_ignore=True)
        if len(labels) != len(ids):
            raise CurvlensError(f"{where}: 'labels' has {len(labels)} entries, 'input_ids' {len(ids)}")
        out.append({"input_ids": ids, "labels": list(labels)})
    if not out:
        raise CurvlensError(f"{path}: no example (expected one JSON object per line)")
    return out


def read_text_examples(path, tokenize: Callable[[str], Sequence[int]], *, max_length: int | None = None,
                       vocab_size: int | None = None) -> list[dict[str, list[int]]]:
    """One example per non-empty line of a UTF-8 text file, tokenized by
    ``tokenize(line) -> ids`` and cut to ``max_length`` tokens; labels are the ids."""
    path = Path(path)
    out = []
    for i, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        ids = [int(x) for x in tokenize(line)][:max_length]
        if ids:
            ids = _ids(ids, f"{path}:{i}", "input_ids", vocab_size, allow_ignore=False)
            out.append({"input_ids": ids, "labels": ids})
    if not out:
        raise CurvlensError(f"{path}: no text line to take a Fisher on")
    return out


def padded_batches(examples: Sequence[dict[str, list[int]]], batch_size: int,
                   pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """HF batches of ``batch_size`` examples, right-padded to the batch's longest.

    Examples
    --------
    >>> b = next(padded_batches([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
    ...                          {"input_ids": [8], "labels": [8]}], 2))
    >>> b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[5, 6, 7], [8, -100, -100]])
    """
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for r, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[r, :n] = torch.tensor(e["input_ids"])
            mask[r, :n] = 1
            labels[r, :n] = torch.tensor(e["labels"])
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}
