import pytest

from curvlens import CurvlensError, Experts, Checkpoint
from curvlens.studies.soup import greedy_soup
from tests.passes.handmade import DistanceScore, write_experts

# One weight, held-out score -w^2 (target 0). Alone: b (0.4) -0.16, d (-0.5) -0.25,
# a (0.6) -0.36, c (3.0) -9. Soups: {b,d} mean -0.05 -> -0.0025 (kept);
# {b,d,a} 0.5/3 -> -0.02778 (dropped); {b,d,c} 2.9/3 -> -0.9344 (dropped: c hurts).
WEIGHTS = {"a": 0.6, "b": 0.4, "c": 3.0, "d": -0.5}


@pytest.fixture
def ingredients(tmp_path):
    _, dirs = write_experts(tmp_path, None, {n: {"w": [w]} for n, w in WEIGHTS.items()})
    return Experts.from_dirs(None, dirs, moments=False)


def test_greedy_soup_skips_the_harmful_ingredient(ingredients, tmp_path):
    res = greedy_soup(ingredients, DistanceScore({"fit": [0.0]}), out=tmp_path / "soup", progress=False)
    assert res.ingredients == ["b", "d"]
    rank = res.curve[res.curve["phase"] == "rank"].set_index("candidate")["score"]
    assert rank.to_dict() == pytest.approx({"a": -0.36, "b": -0.16, "c": -9.0, "d": -0.25})
    steps = res.curve[res.curve["phase"] == "soup"]
    assert steps["candidate"].tolist() == ["b", "d", "a", "c"]
    assert steps["kept"].tolist() == [True, True, False, False]
    assert steps["score"].tolist() == pytest.approx([-0.16, -0.0025, -(0.5 / 3) ** 2, -(2.9 / 3) ** 2])
    assert steps["best"].tolist() == pytest.approx([-0.16, -0.0025, -0.0025, -0.0025])
    assert float(Checkpoint.open(res.path)["w"]) == pytest.approx(-0.05)
    assert set(res.sweeps["step"]) == {0, 2, 3, 4}


def test_worst_objective_and_an_ingredient_that_fails(ingredients):
    # two metrics: targets 0 and 0.4; "worst" takes the min over them
    class Flaky(DistanceScore):
        def __call__(self, model_dir):
            out = super().__call__(model_dir)
            if out["t0"] < -5:  # c alone: fails
                raise RuntimeError("evaluation crashed")
            return out

    res = greedy_soup(ingredients, Flaky({"t0": [0.0], "t4": [0.4]}), objective="worst", progress=False)
    rank = res.curve[res.curve["phase"] == "rank"].set_index("candidate")
    assert rank.loc["c", "status"] == "error" and "evaluation crashed" in rank.loc["c", "error"]
    assert "c" not in res.curve.loc[res.curve["phase"] == "soup", "candidate"].tolist()
    # worst of (-w^2, -(w-0.4)^2): b -0.16, a -0.36, d -0.81; {b,a}: 0.5 -> -0.25 dropped;
    # {b,d}: -0.05 -> -0.2025 dropped
    assert res.ingredients == ["b"] and res.path is None
    with pytest.raises(CurvlensError, match="objective"):
        greedy_soup(ingredients, Flaky({"t0": [0.0]}), objective="median")


class WithStderr(DistanceScore):
    """Each score with an ``<m>_stderr`` companion, as lm-eval's evaluator returns;
    the companion is large where the score is bad, so pooling it would change the soup."""

    def __call__(self, model_dir):
        out = super().__call__(model_dir)
        return {**out, **{f"{k}_stderr": -100.0 * v for k, v in out.items()}}


def test_standard_errors_are_kept_but_not_pooled_into_the_objective(ingredients):
    res = greedy_soup(ingredients, WithStderr({"fit": [0.0]}), progress=False)
    assert res.ingredients == ["b", "d"]                          # as with the plain scores
    assert "fit_stderr" not in res.curve.columns and "fit" in res.curve.columns
    assert "fit_stderr" in set(res.sweeps["metric"])              # kept in the sweep rows
    assert greedy_soup(ingredients, WithStderr({"fit": [0.0]}), metrics=["fit_stderr"],
                       progress=False).ingredients != ["b", "d"]  # asked for, it is pooled
