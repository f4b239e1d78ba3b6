"""A model writer's bytes written by a second thread, in order, within a budget.

A merge computes tensor ``i + 1`` while tensor ``i``'s bytes go to the page cache
(on this project's VM a TIES merge of a 250M x 3 zoo: 8.7 -> 7.5 s). Used by
:class:`curvlens.io.writer.ModelWriter` with ``background=True``.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

from curvlens.errors import CurvlensError
from curvlens.io.atomic import os_error

__all__ = ["WriteThread", "WRITE_BUDGET"]


#: Bytes a background writer may hold queued before ``add`` waits (a tensor is
#: always admitted when none is queued): enough to write one tensor beside the
#: next one's math, little enough not to raise a merge's peak memory much.
WRITE_BUDGET = 64 << 20


class WriteThread:
    """Planned writes run in order by one thread, at most :data:`WRITE_BUDGET`
    bytes queued. The first error is raised (as a CurvlensError naming the
    output and the tensor) by the next ``put`` or by ``close``; the writes after
    it are dropped."""

    def __init__(self, out: Path):
        self.out = out
        self.queue: queue.Queue = queue.Queue()
        self.cond = threading.Condition()
        self.pending = 0
        self.error: tuple[BaseException, str] | None = None
        self.cancelled = False  # the caller gave up: what is queued is dropped
        self.thread = threading.Thread(target=self._loop, name="curvlens-write", daemon=True)
        self.thread.start()

    def put(self, fn, nbytes: int, name: str) -> None:
        self.check()
        with self.cond:
            while self.pending and self.pending + nbytes > WRITE_BUDGET and self.error is None:
                self.cond.wait()
            self.pending += nbytes
        self.check()
        self.queue.put((fn, nbytes, name))

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            fn, nbytes, name = item
            if self.error is None and not self.cancelled:
                try:
                    fn()
                except BaseException as err:  # handed to the caller's thread
                    self.error = (err, name)
            with self.cond:
                self.pending -= nbytes
                self.cond.notify_all()

    def check(self) -> None:
        if self.error is not None:
            err, name = self.error
            if isinstance(err, OSError):
                raise os_error(self.out, err, f"write tensor {name!r}") from err
            raise CurvlensError(f"output {self.out}: writing tensor {name!r} failed: {err}") from err

    def close(self, raise_error: bool = True) -> None:
        """Wait for the queued writes (or, ``raise_error=False``, after the
        caller's own error, drop them: the output is being removed)."""
        if not raise_error:
            self.cancelled = True
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if raise_error:
            self.check()
