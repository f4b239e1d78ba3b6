"""``curvlens eval`` end to end on the quick zoo: one table of scores (CSV + figure)
equal to the zoo evaluator's, error rows for what cannot be scored, and no output
onto an input."""
import pandas as pd

from curvlens.cli import main


def test_eval_scores_models_into_one_table(harness, quick_zoo, tmp_path, capsys, no_network):
    zoo = quick_zoo
    out = tmp_path / "scores"
    models = [str(zoo.base_dir), str(zoo.expert_dirs["math"]), str(tmp_path / "missing")]
    assert main(["eval", *models, "--tasks", "addition,facts", "--zoo-tasks", "quick", "--out", str(out),
                 "--device", "cpu"]) == 0
    df = pd.read_csv(out / "scores.csv")
    assert (out / "scores.png").stat().st_size > 0
    assert df["model"].tolist() == ["base", "base", "math", "math", "missing", "missing"]
    ok = df[df["status"] == "ok"].set_index(["model", "task"])["value"]
    for model in ("base", "math"):
        ref = zoo.evaluator(capabilities=["addition", "facts"])(str(zoo.base_dir if model == "base" else
                                                                    zoo.expert_dirs["math"]))
        assert {t: ok[model, t] for t in ("addition", "facts")} == ref
    bad = df[df["model"] == "missing"]
    assert (bad["status"] == "error").all() and bad["error"].str.contains("not a directory").all()
    printed = capsys.readouterr().out
    assert "math: addition" in printed and "6 rows" in printed
    # an output inside an input is refused (exit 2, one line), nothing written there
    assert main(["eval", str(zoo.base_dir), "--tasks", "facts", "--zoo-tasks", "quick",
                 "--out", str(zoo.base_dir / "scores")]) == 2
    err = capsys.readouterr().err
    assert "lies inside the input" in err and len(err.strip().splitlines()) == 1
    assert not (zoo.base_dir / "scores").exists()
    assert main(["eval", str(zoo.base_dir), "--tasks", "facts", "--out", str(tmp_path / "x"),
                 "--model-args", "trust_remote_code=True"]) == 2
    assert "model_args key" in capsys.readouterr().err


def test_a_study_scores_with_lm_eval_tasks(harness, quick_zoo, tmp_path, no_network):
    # `--tasks` on a study: the sweep's scores are the harness's, which are the zoo evaluator's
    zoo = quick_zoo
    out = tmp_path / "sweep"
    experts = [str(zoo.expert_dirs[n]) for n in ("math", "knowledge")]
    assert main(["sweep", *experts, "--method", "linear", "--tasks", "addition,facts", "--zoo-tasks", "quick",
                 "--keep", "--no-moments", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    df = pd.read_csv(out / "sweep.csv")
    scores = df[~df["metric"].str.endswith("_stderr")].set_index("metric")["value"]
    ref = zoo.evaluator(capabilities=["addition", "facts"])(df["model_dir"].iloc[0])
    assert scores.to_dict() == ref and (df["status"] == "ok").all()
    assert not no_network
