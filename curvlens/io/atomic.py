"""Atomic output dirs: written beside their place, renamed in when complete.

Every dir curvlens writes (a merged model, an analysis, the demo's report, the
zoo, figures) goes through :class:`AtomicDir`:

* the output may not be, contain or lie inside any input (``inputs=``), with or
  without ``overwrite``: a merge can never replace the experts it reads;
* the work happens in a hidden partial dir beside the target, marked as
  curvlens's own (:data:`MARKER`: pid, host, process start time), with the
  umask's permissions like any ``mkdir``;
* on success it is renamed into place (an old target, with ``overwrite``, is
  removed only afterwards); on an exception, SIGINT or SIGTERM it is removed,
  together with any parent dirs this run created;
* a partial dir left by a run that could not clean up (SIGKILL, power loss) is
  recognised by its marker and swept by the next run writing beside it;
* ``OSError`` (disk full, read-only file system, a parent that is a file)
  becomes a :class:`~curvlens.errors.CurvlensError` naming the output.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterable

from curvlens.errors import CurvlensError
from curvlens.io.paths import is_inside

#: File inside every partial dir: who is writing it.
MARKER = ".curvlens-partial.json"
_KINDS = ("partial", "old")
#: A partial dir of another host is swept only when its marker is this old (seconds).
FOREIGN_STALE_AFTER = 7 * 24 * 3600


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell a reused pid apart), if known."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # field 22, counted after the ')' that ends the (possibly spaced) command name
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return started is None or _start_time(pid) in (None, started)


def _is_stale(d: Path) -> bool:
    """Whether ``d`` is a partial dir of curvlens whose writer is gone."""
    try:
        info = json.loads((d / MARKER).read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours (or not readable): never touched
    if host != socket.gethostname():
        try:
            return time.time() - (d / MARKER).stat().st_mtime > FOREIGN_STALE_AFTER
        except OSError:
            return False
    return not _alive(pid, info.get("started"))


def sweep_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove curvlens partial dirs in ``parent`` whose writer died (of target ``name``,
    or of any target); returns what was removed."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for d in entries:
        n = d.name
        if not (n.startswith(".") and any(f".{k}-" in n for k in _KINDS)):
            continue
        if name is not None and not n.startswith(f".{name}."):
            continue
        if d.is_dir() and not d.is_symlink() and _is_stale(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def gather_inputs(*sources: object) -> list[Path]:
    """Every path a job reads, from whatever names them.

    A source is a path; an object with ``input_paths()`` (an
    :class:`~curvlens.passes.experts.Experts`, an evaluator that declares the
    data it reads, such as :class:`curvlens.zoo.ZooEvaluator`); or an iterable of
    sources. None is skipped.

    Examples
    --------
    >>> [p.name for p in gather_inputs("a", None, ["b", ("c",)])]
    ['a', 'b', 'c']
    """
    out: list[Path] = []

    def add(src: object) -> None:
        if src is None:
            return
        if isinstance(src, (str, os.PathLike)):
            out.append(Path(src))
        elif callable(getattr(src, "input_paths", None)):
            for p in src.input_paths():
                add(p)
        elif isinstance(src, Iterable) and not isinstance(src, (bytes, dict)):
            for p in src:
                add(p)
        elif callable(src):
            return  # an evaluator that declares no data it reads
        else:
            raise CurvlensError(f"inputs: {src!r} is neither a path nor something with input_paths()")

    for s in sources:
        add(s)
    return list(dict.fromkeys(out))


def check_output(out: Path, inputs: Iterable[object] = (), *, replaces: bool = True,
                 is_file: bool = False) -> Path:
    """Refuse an output dir that is, contains or lies inside an input, or whose
    parent is not a dir. Returns ``out`` resolved.

    ``replaces=False`` is for a work dir that a job only adds new entries to
    (a sweep's ``out_dir``): it may contain an input, since nothing in it is
    replaced, but never be or lie inside one. ``is_file``: the output is one
    file (moments, a Fisher), so an existing dir there is the error instead.
    """
    out = Path(out).expanduser()
    # The place itself is not followed if it is a symlink (replacing it replaces
    # the link, not its target); for the input check, both readings count.
    real = out.parent.resolve() / out.name
    full = out.resolve()
    for inp in gather_inputs(inputs):
        r = Path(inp).expanduser().resolve()
        if any(is_inside(x, r) or (replaces and is_inside(r, x)) for x in (real, full)):
            rel = "is" if r in (real, full) else "lies inside" if is_inside(real, r) or is_inside(full, r) \
                else "contains"
            raise CurvlensError(f"output {out} {rel} the input {inp}; curvlens never writes onto or into "
                                "its inputs (with or without overwrite): choose another output path")
    for p in [real, *real.parents]:
        if p.exists():
            if p != real and not p.is_dir():
                raise CurvlensError(f"output {out}: {p} is a file, not a dir; cannot create {out} under it")
            break
    if real.exists() and not real.is_symlink() and real.is_dir() == is_file:
        raise CurvlensError(f"output {out} exists and is a {'dir' if is_file else 'file'}, not a "
                            f"{'file' if is_file else 'dir'}")
    return real


def claim_output(out: Path, inputs: Iterable[object] = (), *, overwrite: bool = False) -> Path:
    """:func:`check_output`, and an existing ``out`` refused without ``overwrite``:
    what every writer checks before any work starts. Returns ``out`` resolved."""
    real = check_output(out, inputs)
    if (real.exists() or real.is_symlink()) and not overwrite:
        raise CurvlensError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    return real


def os_error(out: Path, err: OSError, doing: str) -> CurvlensError:
    """An OSError while writing ``out`` as a CurvlensError that says what happened."""
    import errno

    why = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded",
           errno.ENOTDIR: "a path component is a file, not a dir"}.get(err.errno, err.strerror or str(err))
    return CurvlensError(f"output {out}: could not {doing}: {why} ({err})")


def _mark(d: Path, target: str) -> None:
    pid = os.getpid()
    (d / MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": _start_time(pid),
                                        "target": target, "time": time.time()}))


def make_partial(parent: Path, name: str, kind: str = "partial") -> Path:
    """A new, marked partial dir for target ``name`` in ``parent`` (which exists),
    after sweeping the stale ones a dead run left there. Raises OSError."""
    sweep_stale(parent, name)
    d = Path(parent) / f".{name}.{kind}-{secrets.token_hex(4)}"
    d.mkdir()  # the umask's permissions, as any mkdir
    _mark(d, name)
    return d


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM while an AtomicDir is open."""


class AtomicDir:
    """A dir written completely or not at all; use as a context manager.

    Parameters
    ----------
    out : path
        The final dir.
    overwrite : bool
        Replace an existing ``out`` once the new one is complete.
    inputs : iterable of path
        Paths the output must neither be, contain nor lie inside.

    Attributes
    ----------
    tmp : Path
        The partial dir to write into (inside the ``with`` block).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()) / "a" / "out"
    >>> with AtomicDir(d) as tmp:
    ...     _ = (tmp / "x.txt").write_text("hi")
    >>> sorted(p.name for p in d.iterdir())
    ['x.txt']
    """

    def __init__(self, out, *, overwrite: bool = False, inputs: Iterable[object] = ()):
        self.out = Path(out).expanduser()
        self.overwrite = overwrite
        self.real = claim_output(self.out, inputs, overwrite=overwrite)
        self.tmp: Path | None = None
        self._created: list[Path] = []
        self._old_handler = None

    def __enter__(self) -> Path:
        parent = self.real.parent
        try:
            missing = [p for p in [parent, *parent.parents] if not p.exists()]
            for p in reversed(missing):
                p.mkdir()
                self._created.append(p)
            self.tmp = make_partial(parent, self.real.name)
        except OSError as err:
            self._cleanup()
            raise os_error(self.out, err, "create its dir") from err
        self._install_sigterm()
        return self.tmp

    def _install_sigterm(self) -> None:
        # Only from the main thread, and never over a handler someone else set
        # (a notebook kernel, a server): the marker covers those cases.
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                return

            def on_term(signum, frame):
                raise _Terminated()

            self._old_handler = signal.signal(signal.SIGTERM, on_term)
        except (ValueError, OSError):
            self._old_handler = None

    def _restore_sigterm(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None

    def _cleanup(self) -> None:
        if self.tmp is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
        for p in reversed(self._created):  # deepest first; only if still empty
            try:
                p.rmdir()
            except OSError:
                break

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    (self.tmp / MARKER).unlink()
                    _rename_into_place(self.tmp, self.real, self.overwrite)
                    self.tmp = None
                    self._created = []
                except CurvlensError:
                    raise
                except OSError as err:
                    raise os_error(self.out, err, "move the finished dir into place") from err
        finally:
            self._restore_sigterm()
            if self.tmp is not None or self._created:
                self._cleanup()
        if exc_type is _Terminated:
            raise SystemExit(128 + signal.SIGTERM) from None


def _rename_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished dir to ``out``; an old ``out`` is removed only afterwards."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CurvlensError(f"{out} appeared while writing; pass overwrite=True to replace it")
        trash = make_partial(out.parent, out.name, "old")
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
