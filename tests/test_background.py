"""The passes' second thread (``curvlens.runtime.Background``): results in order,
the budget held by the caller taking jobs itself, errors raised, nothing left
running; and ``mask_stats`` gives the same frame whichever thread ranks what."""
import threading
import time

import pandas as pd
import pytest
import torch

from curvlens import CurvlensError, Experts
from curvlens.passes import analysis as A
from curvlens import runtime as bg
from curvlens.passes.analyze_masks import Masks
from curvlens.runtime import torch_threads
from tests.conftest import make_tiny_zoo

KW = dict(device="cpu", progress=False)


def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.001)


def _bg_threads():
    return [t for t in threading.enumerate() if t.name.startswith("curvlens-bg")]


def test_results_come_back_in_the_order_handed_in():
    jobs = bg.Background(True)
    try:
        for i in range(12):
            # later jobs finish sooner: the order must not depend on timing
            jobs.submit(lambda i=i: (time.sleep(0.002 * (12 - i)), i)[1], 1)
        assert jobs.results() == list(range(12))
    finally:
        jobs.close()
    assert not _bg_threads()


def test_a_job_over_the_budget_runs_in_the_caller_instead_of_waiting():
    gate, ran = threading.Event(), {}

    def slow():
        ran["slow"] = threading.current_thread().name
        gate.wait(5)
        return "slow"

    def quick(key):
        ran[key] = threading.current_thread().name
        return key

    jobs = bg.Background(True, budget=10)
    try:
        jobs.submit(slow, 8)
        jobs.submit(lambda: quick("over"), 8)  # 8 + 8 > 10 while slow holds its 8
        assert ran["over"] == threading.current_thread().name
        gate.set()
        assert jobs.results() == ["slow", "over"]
        assert ran["slow"].startswith("curvlens-bg")
        _until(lambda: jobs.pending == 0)  # a future's callbacks run just after its result is set
        # with nothing pending any job is admitted, however large
        jobs.submit(lambda: quick("big"), 10**12)
        _until(lambda: "big" in ran)  # run by the helper, not taken back by results()
        assert jobs.results() == ["big"] and ran["big"].startswith("curvlens-bg")
        _until(lambda: jobs.pending == 0)
        assert jobs.pending == 0
    finally:
        gate.set()
        jobs.close()


def test_disabled_runs_every_job_at_once_in_the_caller():
    jobs = bg.Background(False)
    names = []
    jobs.submit(lambda: names.append(threading.current_thread().name) or 1, 1)
    assert names == [threading.current_thread().name] and jobs.results() == [1]
    jobs.close()


def _fail(msg):
    raise CurvlensError(msg)


def test_an_error_is_raised_by_results():
    jobs = bg.Background(True)
    try:
        jobs.submit(lambda: 1, 1)
        jobs.submit(lambda: _fail("bad mask"), 1)
        with pytest.raises(CurvlensError, match="bad mask"):
            jobs.results()
    finally:
        jobs.close()
    assert not _bg_threads()


def test_an_error_stops_the_next_submission():
    jobs = bg.Background(True)
    try:
        jobs.submit(lambda: _fail("first"), 1)
        deadline = time.time() + 5
        while jobs.error is None and time.time() < deadline:
            time.sleep(0.01)
        ran = []
        with pytest.raises(CurvlensError, match="first"):
            jobs.submit(lambda: ran.append(1), 1)
        assert not ran
    finally:
        jobs.close()


def test_close_cancels_what_has_not_started():
    gate, started = threading.Event(), []
    jobs = bg.Background(True)
    jobs.submit(lambda: (started.append("first"), gate.wait(5)), 1)
    while not started:
        time.sleep(0.001)
    for _ in range(5):
        jobs.submit(lambda: started.append("queued"), 1)
    threading.Timer(0.05, gate.set).start()
    jobs.close()  # waits for the running job, drops the queued ones
    assert started == ["first"]
    assert not _bg_threads()


def test_the_worker_uses_the_callers_thread_count():
    jobs = bg.Background(True)
    try:
        for n in (1, 2, 1):
            with torch_threads(n):
                jobs.submit(torch.get_num_threads, 1)
                assert jobs.results() == [n]
    finally:
        jobs.close()


def test_when_a_second_thread_is_used(monkeypatch):
    monkeypatch.setattr(bg, "_cores", lambda: 2)
    assert bg.background_enabled(torch.device("cpu"))
    assert not bg.background_enabled(torch.device("cuda"))
    monkeypatch.setenv("CURVLENS_BACKGROUND", "0")
    assert not bg.background_enabled(torch.device("cpu"))
    monkeypatch.delenv("CURVLENS_BACKGROUND")
    monkeypatch.setattr(bg, "_cores", lambda: 1)
    assert not bg.background_enabled(torch.device("cpu"))


@pytest.mark.parametrize("rank_exact_max", [None, 0])
def test_mask_stats_is_the_same_whichever_thread_ranks(tmp_path, monkeypatch, rank_exact_max):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", dtype=torch.bfloat16)
    ex = Experts.from_dirs(base, dirs)
    monkeypatch.setattr(bg, "_cores", lambda: 2)

    def run():
        return A.mask_stats(ex, densities=(0.1, 0.3), rank_exact_max=rank_exact_max, **KW)

    threaded = run()
    monkeypatch.setattr(bg, "BUDGET", 1)  # every other job in the caller
    mixed = run()
    monkeypatch.setenv("CURVLENS_BACKGROUND", "0")
    inline = run()
    assert (threaded["rank_method"] == ("exact" if rank_exact_max is None else "randomized")).any()
    pd.testing.assert_frame_equal(threaded, inline, check_exact=True)
    pd.testing.assert_frame_equal(mixed, inline, check_exact=True)
    assert not _bg_threads()


def test_an_error_in_a_background_job_names_expert_and_tensor_and_stops_the_worker(tmp_path, monkeypatch):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z")
    ex = Experts.from_dirs(base, dirs)
    monkeypatch.setattr(bg, "_cores", lambda: 2)
    with pytest.raises(CurvlensError, match=r"expert 'expert\d', tensor '.+': sketch_size must be >= 1"):
        A.mask_stats(ex, densities=(0.1,), sketch_size=0, **KW)
    assert not _bg_threads()


@pytest.mark.parametrize("xdt, bdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                      (torch.float16, torch.float32), (torch.float32, torch.float64),
                                      (torch.float64, torch.bfloat16)])
def test_the_task_vector_is_expert_minus_base_in_fp32_and_writes_no_input(xdt, bdt):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 33, generator=g, dtype=torch.float64) * 3).to(xdt)
    b = (torch.randn(64, 33, generator=g, dtype=torch.float64) * 3).to(bdt)
    keep_x, keep_b = x.clone(), b.clone()

    class Group:
        experts, base = [x], b

    masks = Masks.__new__(Masks)
    masks.group = Group
    tau = masks.task_vector(0)
    assert tau.dtype == torch.float32
    assert torch.equal(tau, x.float() - b.float())
    assert torch.equal(x, keep_x) and torch.equal(b, keep_b)


@pytest.mark.parametrize("threads", ["one", "two"])
def test_the_selection_window_pass_counts_the_same_from_one_thread_or_two(tmp_path, monkeypatch, threads):
    from curvlens.passes.scout import scout_selections
    from curvlens.passes.thresholds import model_selections
    from tests.passes.test_analyze import _same
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", dtype=torch.bfloat16)
    ex = Experts.from_dirs(base, dirs)
    monkeypatch.setattr(bg, "_cores", lambda: 2)
    if threads == "one":
        monkeypatch.setenv("CURVLENS_BACKGROUND", "0")
    want = model_selections(ex, [[0.05, 0.3]] * 3, ["fisher", "magnitude"], **KW)
    got, reads = scout_selections(ex, [[0.05, 0.3]] * 3, ["fisher", "magnitude"], **KW)
    assert reads == 1
    _same(want, got)
    assert not _bg_threads()


def test_a_job_larger_than_the_budget_waits_for_room_before_its_inputs_are_made():
    gate = threading.Event()
    jobs = bg.Background(True, budget=10)
    try:
        jobs.submit(lambda: gate.wait(5), 20)  # over the budget, admitted alone
        jobs.wait_room(5)  # a small job never waits (the caller would run it itself)
        waited = threading.Thread(target=jobs.wait_room, args=(20,))
        waited.start()
        waited.join(0.2)
        assert waited.is_alive()  # a second large one waits for the first to finish
        gate.set()
        waited.join(5)
        assert not waited.is_alive() and jobs.pending == 0
    finally:
        gate.set()
        jobs.close()
    bg.Background(False, budget=1).wait_room(10**12)  # inline: nothing to wait for


def test_wait_mode_keeps_every_job_on_the_helper_in_order_and_stops_after_an_error():
    ran = []
    jobs = bg.Background(True, budget=10, when_full="wait")
    try:
        for i in range(8):  # each over half the budget: the caller waits instead of running it
            jobs.submit(lambda i=i: (time.sleep(0.005), ran.append((i, threading.current_thread().name)))[1], 6)
        jobs.results()
        assert [i for i, _ in ran] == list(range(8)) and all(n.startswith("curvlens-bg") for _, n in ran)
        gate = threading.Event()
        jobs.submit(lambda: (gate.wait(5), _fail("disk full")), 1)
        jobs.submit(lambda: ran.append("after"), 1)  # queued behind the failing job: never runs
        gate.set()
        with pytest.raises(CurvlensError, match="disk full"):
            jobs.results()
        assert "after" not in ran
    finally:
        jobs.close()
    with pytest.raises(CurvlensError, match="when_full"):
        bg.Background(False, when_full="later")


def test_results_runs_the_jobs_the_helper_has_not_started_in_the_caller():
    gate, started, ran = threading.Event(), threading.Event(), []

    def first():
        started.set()
        gate.wait(5)
        ran.append((0, threading.current_thread().name))
        return 0

    jobs = bg.Background(True)
    try:
        jobs.submit(first, 1)
        started.wait(5)
        for i in range(1, 6):  # queued behind a job that holds the helper
            jobs.submit(lambda i=i: (ran.append((i, threading.current_thread().name)), i)[1], 1)
        threading.Timer(0.2, gate.set).start()
        assert jobs.results() == list(range(6))  # in submission order, whoever ran what
        by = dict(ran)
        assert by[0].startswith("curvlens-bg")
        assert all(by[i] == threading.current_thread().name for i in range(1, 6))
        assert [i for i, _ in ran[:5]] == [5, 4, 3, 2, 1]  # the caller works from the last job back
        _until(lambda: jobs.pending == 0)  # a future's callbacks run just after its result is set
        assert jobs.pending == 0  # the budget of the jobs it took is released
    finally:
        jobs.close()
    assert not _bg_threads()


def test_a_job_the_caller_takes_at_the_end_raises_its_error_and_leaves_no_thread():
    gate, started = threading.Event(), threading.Event()
    jobs = bg.Background(True)
    try:
        jobs.submit(lambda: (started.set(), gate.wait(5)), 1)
        started.wait(5)
        jobs.submit(lambda: _fail("bad moment"), 1)
        threading.Timer(0.1, gate.set).start()
        with pytest.raises(CurvlensError, match="bad moment"):
            jobs.results()
    finally:
        jobs.close()
    assert not _bg_threads()


def test_wait_mode_results_leave_the_order_to_the_helper():
    gate, started, ran = threading.Event(), threading.Event(), []
    jobs = bg.Background(True, when_full="wait")
    try:
        jobs.submit(lambda: (started.set(), gate.wait(5), ran.append(threading.current_thread().name)), 1)
        started.wait(5)
        for _ in range(3):
            jobs.submit(lambda: ran.append(threading.current_thread().name), 1)
        threading.Timer(0.1, gate.set).start()
        jobs.results()
        assert len(ran) == 4 and all(n.startswith("curvlens-bg") for n in ran)
    finally:
        jobs.close()


def test_a_finished_jobs_inputs_are_freed_before_its_results_are_asked_for():
    import gc
    import weakref

    class Inputs:
        pass

    jobs = bg.Background(True)
    try:
        held = Inputs()
        ref = weakref.ref(held)
        jobs.submit(lambda x=held: 1, 1)
        del held
        deadline = time.time() + 5
        while jobs.pending and time.time() < deadline:
            time.sleep(0.001)
        gc.collect()
        # a pass holds hundreds of finished jobs until its frame: each must not keep its task vector and masks
        assert ref() is None
        assert jobs.results() == [1]
    finally:
        jobs.close()


def test_side_by_side_gives_both_halves_in_order_and_raises_either_error():
    import threading

    names = []

    def half(tag):
        names.append((tag, threading.current_thread().name))
        return tag

    assert bg.side_by_side(lambda: half("first"), lambda: half("second")) == ("first", "second")
    assert dict(names)["first"] == threading.current_thread().name  # the caller's half

    def boom():
        raise ValueError("second half failed")

    with pytest.raises(ValueError, match="second half failed"):
        bg.side_by_side(lambda: 1, boom)
    with pytest.raises(KeyError):
        bg.side_by_side(lambda: {}["x"], lambda: 2)
