"""Reading pickles that ``weights_only`` refuses, without running their code.

DeepSpeed's optimizer files hold, beside tensors, a few of DeepSpeed's own objects
(its ZeRO stage enum, a loss scaler, fragment addresses); ``torch.distributed.checkpoint``
writes its ``.metadata`` with plain ``pickle``. Loading either with ``pickle`` would
run whatever code a stranger put there. Here every class a file names must be on a
fixed allow-list, and each DeepSpeed / DCP class is replaced by an inert stand-in
(:class:`Record`, :class:`IntRecord`) that only stores what the file gives it, so
neither DeepSpeed nor the class's own code is ever imported or run.

Two readers share that allow-list:

* :func:`load_torch_file` for ``torch.save`` zip files: every global the file's
  pickle names is listed first by :func:`torch.serialization.get_unsafe_globals_in_checkpoint`
  (a scan, nothing executed) and refused unless allowed; the file is then read by
  torch's own ``weights_only`` unpickler (which also restricts which objects may be
  built and appended to) with the stand-ins admitted through
  :func:`torch.serialization.safe_globals`, over a memory map.
* :func:`load_pickle` for plain pickles: a :class:`pickle.Unpickler` whose
  ``find_class`` admits only the allow-list.

Why torch's unpickler rather than only our own for torch files: it restricts
``BUILD``/``NEWOBJ``/``APPEND`` to known types as well as globals, and it is what
torch maintains for exactly this threat. ``safe_globals`` changes a process-wide
list, so loads here hold a lock (the stand-ins are inert if another thread's
``torch.load`` sees them meanwhile).
"""
from __future__ import annotations

import collections
import io
import pickle
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from curvlens.errors import CurvlensError

_LOCK = threading.Lock()


class Record:
    """An inert stand-in for a class named in an untrusted pickle: it stores the
    fields the pickle gives it and nothing else (no methods of the original run).

    ``type(r).original`` is the class it stands in for.
    """

    original = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
            self.__dict__.update(slots or {})
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self).original, repr(sorted(vars(self).items(), key=lambda kv: kv[0]))))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"<{type(self).original} stand-in: {fields}>"


class IntRecord(int):
    """A stand-in for an integer enum member (``ZeroStageEnum.gradients`` -> 2)."""

    original = "?"


def _stand_in(full_name: str, base: type) -> type:
    return type(full_name.rsplit(".", 1)[-1], (base,), {"original": full_name, "__module__": __name__})


def stand_ins(records: list[str], ints: list[str] = ()) -> dict[str, type]:
    """Allow-list entries ``full class name -> inert stand-in`` for the given names."""
    return {**{n: _stand_in(n, Record) for n in records}, **{n: _stand_in(n, IntRecord) for n in ints}}


# Plain objects a plain pickle of torch metadata may name (real, side-effect free).
_TORCH_PLAIN: dict[str, Any] = {
    "torch.Size": torch.Size,
    "collections.OrderedDict": collections.OrderedDict,
    "torch.strided": torch.strided,
    "torch.contiguous_format": torch.contiguous_format,
    "torch.channels_last": torch.channels_last,
    "torch.preserve_format": torch.preserve_format,
    **{f"torch.{n}": getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)},
}


def _check_scan(file: Path, allow: Mapping[str, Any]) -> None:
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None or not hasattr(torch.serialization, "safe_globals"):
        raise CurvlensError(f"{file}: reading this pickled checkpoint safely needs torch >= 2.6 "
                            f"(torch.serialization.safe_globals); this is torch {torch.__version__}")
    try:
        names = scan(str(file))
    except Exception as err:  # zip / pickle errors of a truncated or foreign file
        raise CurvlensError(f"{file}: not a readable torch.save file (truncated or corrupt: {err})") from err
    refused = sorted(n for n in names if n not in allow)
    if refused:
        raise CurvlensError(f"{file}: refusing to unpickle it: it names {', '.join(refused)}, which curvlens "
                            "does not admit (only tensors, containers and a fixed list of plain DeepSpeed / "
                            "torch classes are read; nothing in the file was run)")


def load_torch_file(file: Path, allow: Mapping[str, Any]) -> Any:
    """Load a ``torch.save`` zip file admitting torch's safe globals plus ``allow``.

    Parameters
    ----------
    file : Path
        The file (already checked to lie inside its dir).
    allow : mapping
        Full class names (``"deepspeed.runtime.zero.config.ZeroStageEnum"``) to the
        stand-ins built in their place (see :func:`stand_ins`).

    Returns
    -------
    object
        The unpickled object; tensors are memory-mapped (nothing is read until used).

    Raises
    ------
    CurvlensError
        Naming the file and each class it names that is not admitted, or saying
        the file is truncated or corrupt. Nothing in the file runs.
    """
    if not file.is_file():
        raise CurvlensError(f"{file}: file not found")
    _check_scan(file, allow)
    with _LOCK, torch.serialization.safe_globals([(obj, name) for name, obj in allow.items()]):
        try:
            return torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:
            raise CurvlensError(f"{file}: could not be read with torch.load(weights_only=True) "
                                f"admitting {sorted(allow) or 'no extra classes'} ({err})") from err


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, allow: Mapping[str, Any], label: str):
        super().__init__(fh)
        self._allow = allow
        self._label = label

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._allow:
            return self._allow[full]
        raise CurvlensError(f"{self._label}: refusing to unpickle it: it names {full}, which curvlens does not "
                            "admit (nothing in the file was run)")

    def persistent_load(self, pid: Any) -> Any:
        raise CurvlensError(f"{self._label}: refusing to unpickle it: it holds a persistent reference "
                            f"({str(pid)[:60]}), which a plain metadata pickle never does")


def load_pickle(data: bytes, allow: Mapping[str, Any], label: str) -> Any:
    """Unpickle ``data`` (a plain pickle) admitting only ``allow`` plus plain torch
    metadata objects (``torch.Size``, dtypes, layouts, memory formats).

    Raises
    ------
    CurvlensError
        Naming ``label`` and the first class the pickle names that is not admitted,
        or saying it is truncated or corrupt. Nothing in it runs.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), {**_TORCH_PLAIN, **allow}, label).load()
    except CurvlensError:
        raise
    except Exception as err:  # EOFError, UnpicklingError, a stand-in given odd arguments ...
        raise CurvlensError(f"{label}: not a readable pickle (truncated or corrupt: "
                            f"{type(err).__name__}: {err})") from err
