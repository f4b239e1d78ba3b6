import os

import numpy as np
import pandas as pd
import pytest

from curvlens import CurvlensError, Experts
from curvlens.studies.scores import wide_scores
from curvlens.studies.sweep import ExpertsSpec, local_client, sweep, sweep_grid
from tests.passes.handmade import DistanceScore, FailsAbove, KillsWorkerOnJob0, Unpicklable, write_experts


@pytest.fixture
def line(tmp_path):
    """Base w = 0 and three experts w = 1, 2, 4 (one 1-entry tensor)."""
    base, dirs = write_experts(tmp_path, {"w": [0.0]}, {"a": {"w": [1.0]}, "b": {"w": [2.0]}, "c": {"w": [4.0]}},
                               moments={n: {"w": [1.0]} for n in "abc"})
    return Experts.from_dirs(base, dirs)


def test_grid_is_the_product_and_lists_of_lists_sweep_per_expert_values():
    g = sweep_grid("task_arithmetic", **{"lambda": [0.5, 1.0], "weight": [[1, 0, 0], [1, 1, 1]]})
    assert len(g) == 4 and g[1] == {"method": "task_arithmetic", "lambda": 0.5, "weight": [1, 1, 1]}
    assert sweep_grid("linear") == [{"method": "linear"}]


def test_serial_sweep_known_values_failures_reported_not_dropped(line, tmp_path):
    grid = (sweep_grid("task_arithmetic", **{"lambda": [0.5, 1.0]})
            + [{"method": "linear", "experts": ["a", "b"], "label": "soup ab"},
               {"method": "ties", "density": 7.0},                 # invalid parameter
               {"method": "linear", "experts": ["a", "nobody"]}])  # unknown expert
    df = sweep(line, grid, FailsAbove(6.0), out_dir=tmp_path / "jobs", progress=False)
    assert df["job"].tolist() == [0, 1, 2, 3, 4]                   # every job has its row, in order
    ok = df[df["status"] == "ok"].set_index("label")
    # task arithmetic: lambda * (1 + 2 + 4); 7.0 > 6 fails in the evaluator
    assert ok.loc["task_arithmetic lambda=0.5", "value"] == pytest.approx(3.5)
    assert ok.loc["soup ab", "value"] == pytest.approx(1.5) and ok.loc["soup ab", "experts"] == ("a", "b")
    err = df[df["status"] == "error"].set_index("job")
    assert sorted(err.index) == [1, 3, 4]
    assert "ValueError: w0=7.0 above 6.0" in err.loc[1, "error"]
    assert "density" in err.loc[3, "error"] and "nobody" in err.loc[4, "error"]
    assert {"lambda", "density"} <= set(df.columns) and np.isnan(df.loc[2, "lambda"])
    assert (df["seconds"] > 0).all() and df.attrs["wall_s"] > 0
    assert not list((tmp_path / "jobs").iterdir())                # nothing kept
    wide = wide_scores(df)
    assert wide["status"].tolist() == ["ok", "error", "ok", "error", "error"] and len(wide) == 5


def test_kept_models_stay_and_bad_evaluate_output_is_an_error(line, tmp_path):
    df = sweep(line, [{"method": "linear"}], DistanceScore({"zero": [0.0], "three": [3.0]}),
               out_dir=tmp_path / "kept", keep=True, progress=False)
    assert df["metric"].tolist() == ["zero", "three"]
    assert df["value"].tolist() == pytest.approx([-49 / 9, -4 / 9])
    assert (tmp_path / "kept").is_dir() and all(pd.notna(df["model_dir"]))
    bad = sweep(line, [{"method": "linear"}], lambda d: {"x": "high"}, progress=False)
    assert bad["status"].tolist() == ["error"] and "expected a number" in bad["error"][0]
    with pytest.raises(CurvlensError, match="keep=True needs out_dir"):
        sweep(line, [{"method": "linear"}], lambda d: {}, keep=True)
    with pytest.raises(CurvlensError, match="'method'"):
        sweep(line, [{"density": 0.3}], lambda d: {})


def test_spec_reopens_the_same_experts(line):
    again = ExpertsSpec.of(line).open()
    assert again.names == line.names and again.has_moments and again.base.path == line.base.path


def test_local_cluster_of_two_processes_gives_the_serial_answer_and_reports_lost_jobs(line):
    # no skip: the dask extra is part of the test install (README, .ci/run); without it this fails
    # with local_client's install hint
    import dask
    import distributed  # its config must be loaded before the override below

    grid = sweep_grid("task_arithmetic", **{"lambda": [0.25, 0.5, 1.0]}) + [{"method": "ties", "density": 7.0}]
    serial = sweep(line, grid, FailsAbove(6.0), progress=False)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # a dead worker fails its job at once
        client = local_client(2)  # what client="local" starts: 2 single-threaded worker processes
    try:
        assert isinstance(client, distributed.Client) and len(client.scheduler_info()["workers"]) == 2
        par = sweep(line, grid, FailsAbove(6.0), client=client, progress=False)
        unsent = sweep(line, grid[:2], Unpicklable(), client=client, progress=False)
        killed = sweep(line, grid[:2], KillsWorkerOnJob0(), client=client, progress=False)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    cols = ["job", "label", "metric", "value", "status"]
    pd.testing.assert_frame_equal(par[cols], serial[cols])
    pids = {int(w.rsplit(":", 1)[1]) for w in par["worker"].dropna()}
    assert pids and os.getpid() not in pids                        # ran in the worker processes
    assert par.loc[3, "status"] == "error" and "density" in par.loc[3, "error"]
    assert unsent["status"].tolist() == ["error", "error"]
    assert "could not send the job to the cluster: TypeError" in unsent["error"][0]
    assert "lock" in unsent["error"][0]
    assert killed["status"].tolist() == ["error", "ok"] and "KilledWorker" in killed["error"][0]
    with pytest.raises(CurvlensError, match="client must be"):
        sweep(line, grid, FailsAbove(6.0), client="remote", progress=False)
