"""The lm-evaluation-harness evaluator on the quick zoo: the harness's scores equal
the zoo evaluator's, exactly, for the base, every expert, merges, a state dict, a
sweep on a two-process LocalCluster; offline; a model kept loaded gives the same
numbers as one loaded afresh."""
import pickle

import pytest

import curvlens as cl
from curvlens import CurvlensError
from curvlens.evaluators import LmEvalEvaluator, lm_eval, zoo_tasks
from curvlens.evaluators.zoo_tasks import SHIPPED, task_files
from curvlens.studies.scores import wide_scores
from curvlens.studies.sweep import local_client


def _scores(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.endswith("_stderr")}


def test_zoo_tasks_through_the_harness_equal_the_zoo_evaluator(zoo_harness, quick_zoo, no_network, tmp_path):
    zoo = quick_zoo
    ref = zoo.evaluator()
    linear = cl.merge(zoo.experts(), "linear", tmp_path / "linear", progress=False).path
    ta = cl.merge(zoo.experts(), "task_arithmetic", tmp_path / "ta", progress=False, **{"lambda": 0.7}).path
    models = {"base": zoo.base_dir, **zoo.expert_dirs, "linear": linear, "task_arithmetic": ta}
    loads = []
    for name, d in models.items():
        df = zoo_harness.scores(d)
        loads.append(df["load"].iloc[0])
        got = zoo_harness(str(d))
        assert _scores(got) == ref(str(d)), name                      # exact, not approximate
        for cap in zoo.capabilities.values():                         # the binomial standard error
            p, n = got[cap], int(df.loc[df["task"] == cap, "n"].iloc[0])
            assert got[cap + "_stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5, abs=1e-12)
    assert loads[0] in ("loaded", "swapped") and set(loads[1:]) == {"swapped"}   # one model kept
    fresh = lm_eval(list(zoo.capabilities.values()), include_path=zoo_tasks(zoo), device="cpu", keep_loaded=False)
    assert fresh(str(ta)) == zoo_harness(str(ta))                     # swapped in == loaded afresh
    assert fresh.scores(ta)["load"].eq("loaded").all()
    # graft_sweep hands state dicts: laid onto base=
    on_base = lm_eval(["addition", "facts"], include_path=zoo_tasks(zoo), device="cpu", base=zoo.base_dir)
    sd = cl.Checkpoint.open(zoo.expert_dirs["math"])
    assert _scores(on_base(dict(sd))) == {k: v for k, v in ref(str(zoo.expert_dirs["math"])).items()
                                          if k in ("addition", "facts")}
    assert no_network == []


def test_the_harness_run_gives_simple_evaluates_results(zoo_harness, quick_zoo):
    # run_harness is simple_evaluate's steps without its run report; the numbers must not differ
    import lm_eval as harness
    from curvlens.evaluators import harness as H
    from curvlens.evaluators.loaded import LOCK, LoadSpec, harness_model

    spec = LoadSpec("cpu", "auto", 64)
    tasks = H.TaskIndex.scan(str(zoo_tasks(quick_zoo)))
    configs = [tasks.config(t) for t in ("brackets", "transform")]
    with LOCK:
        lm, _ = harness_model(quick_zoo.expert_dirs["code"], spec)
        manager = H.task_manager(True)
        ours = H.run_harness(lm, manager, configs, num_fewshot=None, limit=30)["results"]
        theirs = harness.simple_evaluate(model=lm, tasks=configs, task_manager=manager, limit=30,
                                         log_samples=False)["results"]
    for t in ("brackets", "transform"):
        assert {k: ours[t][k] for k in ours[t] if "," in k} == {k: theirs[t][k] for k in theirs[t] if "," in k}


def test_a_sweep_of_three_merges_on_a_two_worker_local_cluster(zoo_harness, quick_zoo):
    experts = quick_zoo.experts()
    grid = [{"method": "linear"}, {"method": "task_arithmetic", "lambda": 0.5},
            {"method": "ties", "density": 0.5, "lambda": 1.0}]
    client = local_client(2)
    try:
        par = cl.sweep(experts, grid, zoo_harness, client=client, progress=False)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    serial = cl.sweep(experts, grid, quick_zoo.evaluator(), progress=False)
    assert (par["status"] == "ok").all() and par["worker"].nunique() >= 1
    wide = wide_scores(par).set_index("label")
    ref = wide_scores(serial).set_index("label")
    caps = list(quick_zoo.capabilities.values())
    assert wide[caps].equals(ref[caps])                                # exactly the zoo's scores
    assert {c + "_stderr" for c in caps} <= set(wide.columns)          # stderr kept as columns
    assert (wide[[c + "_stderr" for c in caps]] >= 0).all().all()


def test_the_evaluator_pickles_and_checks_its_arguments(harness, tmp_path, monkeypatch):
    ev = lm_eval("arc_easy,gsm8k", metric={"gsm8k": "exact_match,strict-match"}, limit=10.0,
                 model_args="dtype=bfloat16,max_length=2048", include_path=tmp_path, base=tmp_path)
    again = pickle.loads(pickle.dumps(ev))
    assert vars(again) == vars(ev) and again.limit == 10 and isinstance(again.limit, int)
    assert again.model_args == {"dtype": "bfloat16", "max_length": 2048}
    assert again.include_path == (str(tmp_path.resolve()),)
    for bad, match in [({"tasks": []}, "task names"), ({"tasks": ["a", "a"]}, "twice"),
                       ({"tasks": ["a"], "metric": {"b": "acc"}}, "not among"),
                       ({"tasks": ["a"], "model_args": "trust_remote_code=True"}, "model_args key"),
                       ({"tasks": ["a"], "model_args": {"dtype": "int8"}}, "dtype"),
                       ({"tasks": ["a"], "limit": 0}, "limit"), ({"tasks": ["a"], "batch_size": 0}, "batch_size"),
                       ({"tasks": ["a"], "num_fewshot": -1}, "num_fewshot")]:
        with pytest.raises(CurvlensError, match=match):
            lm_eval(**bad)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(CurvlensError, match=r"pip install 'curvlens\[eval\]'"):
        LmEvalEvaluator(["arc_easy"])


def test_shipped_zoo_tasks_are_the_zoos_items(tmp_path):
    from curvlens.zoo.config import PRESETS, ZooConfig
    import dataclasses

    for name in ("quick", "default"):
        d = zoo_tasks(name)
        assert d == SHIPPED / f"{name}-seed0"
        files = task_files(PRESETS[name], 0)
        assert {p.name: p.read_text() for p in d.iterdir()} == files   # never drift from the zoo
    other = dataclasses.replace(PRESETS["quick"], n_eval=7)
    with pytest.raises(CurvlensError, match="out=DIR"):
        zoo_tasks(other)
    out = zoo_tasks(other, seed=3, out=tmp_path / "tasks")
    assert sum(1 for _ in open(out / "addition.jsonl")) == 7
    with pytest.raises(CurvlensError, match="input"):
        zoo_tasks(other, out=SHIPPED / "x")                             # never into the shipped dir
    assert isinstance(other, ZooConfig)
