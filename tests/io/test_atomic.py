"""Outputs never touch inputs, never stay half-written (exceptions, SIGINT, SIGTERM),
and a partial dir left by SIGKILL is swept by the next run beside it."""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from curvlens import CurvlensError, Experts
from curvlens.cli import main
from curvlens.io.atomic import MARKER, AtomicDir, sweep_stale
from curvlens.io.writer import ModelWriter, write_model
from curvlens.config.merge import merge
from tests.conftest import make_tiny_zoo

ROOT = Path(__file__).parents[2]


@pytest.fixture
def zoo(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "zoo", n_experts=2)
    return Experts.from_dirs(base, dirs), base, dirs


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["expert", "inside expert", "base", "zoo root", "moments file dir"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_merge_output_onto_or_into_an_input_is_refused(zoo, where, overwrite):
    ex, base, dirs = zoo
    out = {"expert": dirs[0], "inside expert": dirs[0] / "merged", "base": base, "zoo root": base.parent,
           "moments file dir": dirs[1] / "export"}[where]
    before = {d: _files(d) for d in [base, *dirs]}
    with pytest.raises(CurvlensError, match=r"output .* (is|lies inside|contains) the input"):
        merge(ex, "linear", out, device="cpu", progress=False, overwrite=overwrite)
    assert {d: _files(d) for d in [base, *dirs]} == before


def test_cli_merge_onto_an_expert_with_overwrite_is_refused(zoo, tmp_path, capsys):
    ex, base, dirs = zoo
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"merge_method: ota\nbase_model: {base}\nmodels:\n  - model: {dirs[0]}\n  - model: {dirs[1]}\n")
    before = _files(dirs[0])
    assert main(["merge", str(cfg), str(dirs[0]), "--overwrite", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvlens: error: output") and err.count("\n") == 1
    assert _files(dirs[0]) == before


def test_cli_analyze_refuses_an_input_and_leaves_no_dirs_when_it_fails(zoo, tmp_path, capsys):
    ex, base, dirs = zoo
    assert main(["analyze", *map(str, dirs), "--base", str(base), "--out", str(dirs[0]), "--overwrite",
                 "--quiet", "--device", "cpu"]) == 2
    assert "is the input" in capsys.readouterr().err
    out = tmp_path / "new" / "deeper" / "analysis"
    assert main(["analyze", *map(str, dirs), "--base", str(base), "--out", str(out), "--densities", "2.0",
                 "--quiet", "--device", "cpu"]) == 2
    assert "densities" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # neither the out dir nor the parents it made
    assert main(["analyze", *map(str, dirs), "--base", str(base), "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    assert {p.name for p in out.iterdir()} >= {"curvature_overlap.csv", "mask_stats.csv"}


def test_output_dirs_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        d = write_model({"a": torch.ones(2)}, tmp_path / "x" / "out")
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o755
    assert not any(p.name.startswith(".") for p in (tmp_path / "x").iterdir())


def test_failure_removes_the_partial_and_the_parents_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with ModelWriter(out) as w:
            w.add("a", torch.ones(2))
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()


def test_output_parent_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CurvlensError, match="is a file, not a dir"):
        write_model({"a": torch.ones(2)}, tmp_path / "f" / "out")
    with pytest.raises(CurvlensError, match="exists and is a file"):
        write_model({"a": torch.ones(2)}, tmp_path / "f", overwrite=True)


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("code, why", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only file system")])
def test_disk_full_and_read_only_targets_are_curvlens_errors(tmp_path, monkeypatch, code, why, background):
    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    # the bytes' write fails (in the writer's own thread when in the background)
    monkeypatch.setattr(ModelWriter, "_write_bytes", fail)
    plan = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    with pytest.raises(CurvlensError, match=f"could not write tensor 'a': {why}"):
        with ModelWriter(tmp_path / "out", plan=plan, background=background) as w:
            w.add("a", torch.ones(2))
            w.add("b", torch.ones(3))
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("curvlens-write")]
    monkeypatch.setattr(Path, "mkdir", fail)
    with pytest.raises(CurvlensError, match=f"could not create its dir: {why}"):
        write_model({"a": torch.ones(2)}, tmp_path / "new" / "out")


def test_background_writes_give_the_same_bytes_and_stop_with_the_caller(tmp_path, monkeypatch):
    import curvlens.io.writer as writer
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(100 + 37 * i, generator=g).to(dt)
               for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16] * 4)}
    plan = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    monkeypatch.setattr(writer, "WRITE_BUDGET", 500)  # the caller waits on the writer now and then
    for background in (False, True):
        with ModelWriter(tmp_path / str(background), plan=plan, max_shard_size=1500, background=background) as w:
            for k, v in tensors.items():
                w.add(k, v)
    a, b = sorted((tmp_path / "False").iterdir()), sorted((tmp_path / "True").iterdir())
    assert [p.name for p in a] == [p.name for p in b] and len(a) > 3  # several shards
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    # the caller's own error mid-write (a non-finite tensor): nothing left, no thread
    with pytest.raises(CurvlensError, match="not finite|NaN"):
        with ModelWriter(tmp_path / "bad", plan=plan, background=True) as w:
            w.add("t0", tensors["t0"])
            w.add("t1", torch.full_like(tensors["t1"], float("nan")))
    assert not (tmp_path / "bad").exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert not [t for t in threading.enumerate() if t.name.startswith("curvlens-write")]


# ------------------------------------------------------------- killed mid-write
WRITER = """
import sys, time, torch
from curvlens.io.writer import ModelWriter
# Python ignores SIGINT when its parent did (a job started with '&' by a non-interactive
# shell, as CI scripts do); restore the interactive default so SIGINT means Ctrl-C here
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
with ModelWriter(sys.argv[1], plan=[("a", (1000,), torch.float32), ("b", (1000,), torch.float32)]) as w:
    w.add("a", torch.ones(1000))
    print("writing", flush=True)
    time.sleep(60)
    w.add("b", torch.ones(1000))
"""


def _start_writer(out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "writing"
    return p


def _partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_mid_write_leave_nothing(tmp_path, sig):
    out = tmp_path / "sub" / "out"
    p = _start_writer(out)
    assert len(_partials(out.parent)) == 1
    p.send_signal(sig)
    p.wait(timeout=30)
    assert p.returncode != 0
    assert not (tmp_path / "sub").exists()  # no output, no partial, no parent it created


def test_sigkill_partial_is_swept_by_the_next_run_beside_it(tmp_path):
    out = tmp_path / "out"
    p = _start_writer(out)
    p.kill()
    p.wait(timeout=30)
    (left,) = _partials(tmp_path)
    assert json.loads((left / MARKER).read_text())["pid"] == p.pid
    assert not out.exists()
    # not ours: a hidden dir of the same shape without our marker is left alone
    foreign = tmp_path / ".out.partial-notours"
    foreign.mkdir()
    # a live writer's partial is left alone too
    live = tmp_path / ".out.partial-live"
    live.mkdir()
    (live / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    write_model({"a": torch.ones(2)}, out)
    assert not left.exists() and foreign.exists() and live.exists() and out.is_dir()
    assert sweep_stale(tmp_path) == []


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CurvlensError, match="already exists"):
        AtomicDir(out)
    with pytest.raises(ValueError):
        with AtomicDir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with AtomicDir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_sigterm_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with AtomicDir(tmp_path / "o"):
        pass
    assert signal.getsignal(signal.SIGTERM) is before
    time.sleep(0)
