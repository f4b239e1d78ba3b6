"""Local task files are untrusted input: every path stays inside the task dir, no
Python runs, templates render sandboxed, and a task that cannot run is an error row
(and an error row of a sweep job), never a crash."""
import os
import shutil

import pytest

import curvlens as cl
from curvlens import CurvlensError
from curvlens.evaluators import lm_eval, zoo_tasks
from curvlens.evaluators.task_files import TaskIndex


def _task(name: str, data: str = "addition.jsonl", **extra) -> str:
    body = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "<bos>{{prompt}}",
            "doc_to_target": "answer", "num_fewshot": 0,
            "generation_kwargs": {"until": ["<eos>"], "max_gen_toks": 3, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    body.update(extra)
    import yaml

    return yaml.safe_dump(body)


@pytest.fixture
def task_dir(tmp_path, quick_zoo):
    """A task dir: the zoo's addition task, and tasks that break each rule."""
    d = tmp_path / "tasks"
    d.mkdir()
    shutil.copy(zoo_tasks(quick_zoo) / "addition.jsonl", d / "addition.jsonl")
    (tmp_path / "secret.jsonl").write_text('{"prompt": "add 11+22:", "answer": "33"}\n')
    (d / "sub").mkdir()
    tasks = {
        "good": _task("good"),
        "missing_file": _task("missing_file", data="nowhere.jsonl"),
        "outside": _task("outside", data="../secret.jsonl"),
        "absolute": _task("absolute", data=str(tmp_path / "secret.jsonl")),
        "no_match": _task("no_match", data="*.csv"),
        "hub_metric": _task("hub_metric", metric_list=[{"metric": "sacrebleu_remote"}]),
        "remote_code": _task("remote_code", dataset_kwargs={"data_files": "addition.jsonl", "trust_remote_code": True}),
        "escape": _task("escape", doc_to_text="{{ prompt.__class__.__mro__ }}"),
    }
    for name, text in tasks.items():
        (d / f"{name}.yaml").write_text(text)
    (d / "function.yaml").write_text(_task("function").replace("doc_to_text: <bos>{{prompt}}",
                                                                 "doc_to_text: !function utils.doc_to_text"))
    (d / "utils.py").write_text("def doc_to_text(doc):\n    raise SystemExit('task code ran')\n")
    (tmp_path / "base.yaml").write_text(_task("base_outside"))
    (d / "include_outside.yaml").write_text("include: ../base.yaml\ntask: include_outside\n")
    (d / "sub" / "_template.yaml").write_text(_task("template").replace("task: template\n", ""))
    (d / "sub" / "included.yaml").write_text("include: _template.yaml\ntask: included\n"
                                             "dataset_kwargs:\n  data_files:\n    test: ../addition.jsonl\n")
    os.symlink(tmp_path / "secret.jsonl", d / "link.jsonl")
    (d / "symlinked.yaml").write_text(_task("symlinked", data="link.jsonl"))
    return d


RULES = {  # task -> what its error row must say
    "missing_file": "does not exist", "outside": "resolves outside", "absolute": "absolute path",
    "no_match": "matches no file", "hub_metric": "does not implement", "remote_code": "trust_remote_code",
    "escape": "unsafe", "function": "!function", "include_outside": "resolves outside",
    "symlinked": "resolves outside",
}


def test_broken_and_hostile_tasks_are_error_rows_the_good_ones_score(harness, task_dir, quick_zoo, no_network):
    ev = lm_eval(["good", "included", *RULES], include_path=task_dir, device="cpu", limit=20)
    df = ev.scores(quick_zoo.expert_dirs["math"])
    rows = df.set_index("task")
    assert rows.loc["good", "status"] == "ok" and rows.loc["included", "status"] == "ok"
    ref = lm_eval(["addition"], include_path=zoo_tasks(quick_zoo), device="cpu", limit=20)
    assert rows.loc["good", "value"] == rows.loc["included", "value"] == ref(quick_zoo.expert_dirs["math"])["addition"]
    for task, why in RULES.items():
        assert rows.loc[task, "status"] == "error" and why in rows.loc[task, "error"], (task, rows.loc[task, "error"])
    assert list(df["task"]) == ["good", "included", *RULES]             # the order asked for
    with pytest.raises(CurvlensError, match="missing_file"):             # the evaluator contract: it raises...
        ev(quick_zoo.expert_dirs["math"])
    assert no_network == []


def test_a_missing_data_file_is_an_error_row_of_the_sweep(harness, task_dir, quick_zoo):
    ev = lm_eval(["good", "missing_file"], include_path=task_dir, device="cpu", limit=10)
    df = cl.sweep(quick_zoo.experts(), [{"method": "linear"}], ev, progress=False)
    assert df["status"].tolist() == ["error"]                            # ...and the job is a row
    assert "missing_file" in df["error"][0] and "does not exist" in df["error"][0]


def test_index_reads_tasks_and_refuses_what_is_not_a_dir(harness, task_dir, tmp_path):
    index = TaskIndex.scan(task_dir)
    assert {"good", "included", "outside"} <= set(index.files)
    assert "template" not in index.files                                 # a template has no task of its own
    cfg = index.config("included")
    assert cfg["dataset_kwargs"]["data_files"] == {"test": [str((task_dir / "addition.jsonl").resolve())]}
    assert cfg["doc_to_text"] == "<bos>{{prompt}}"                       # from the included template
    with pytest.raises(CurvlensError, match="not a directory"):
        TaskIndex.scan(tmp_path / "secret.jsonl")
    with pytest.raises(CurvlensError, match="no local task"):
        index.config("nope")


def test_lm_evals_own_tasks_run_offline_and_fail_as_rows(harness, quick_zoo, no_network):
    # a hub dataset that is not in the local cache: an error row saying offline, no connection tried
    ev = lm_eval(["arc_easy", "facts", "no_such_task"], include_path=zoo_tasks(quick_zoo), device="cpu")
    rows = ev.scores(quick_zoo.expert_dirs["knowledge"]).set_index("task")
    knowledge = str(quick_zoo.expert_dirs["knowledge"])
    assert rows.loc["facts", "status"] == "ok"
    assert rows.loc["facts", "value"] == quick_zoo.evaluator(["facts"])(knowledge)["facts"]
    assert rows.loc["arc_easy", "status"] == "error" and "Offline" in rows.loc["arc_easy", "error"]
    assert rows.loc["no_such_task", "status"] == "error" and "no_such_task" in rows.loc["no_such_task", "error"]
    assert no_network == []
