"""Experts trained differently: the preflight per expert and the level warning
before a curvature-weighted merge (the notebook 07 case runs in
``tests/test_notebooks.py``, its numbers checked there)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import curvlens as cl
from curvlens.cli import main
from curvlens.passes.preflight import bias_factor, level_names, preflight
from tests.conftest import make_tiny_zoo

KW = {"device": "cpu", "progress": False}


def _zoo(tmp_path, scale: float = 1.0, steps=(60, 150)):
    """Two experts whose moments record step and betas: the second's are the
    first's times ``scale``."""
    base, dirs, weights, moments = make_tiny_zoo(tmp_path, n_experts=2)
    first = load_file(str(dirs[0] / "export" / "exp_avg_sq.safetensors"))
    for d, step, s in zip(dirs, steps, (1.0, scale)):
        save_file({k: t * s for k, t in first.items()}, str(d / "export" / "exp_avg_sq.safetensors"),
                  metadata={"step": str(step), "betas": "[0.9, 0.999]"})
    return base, dirs


def test_preflight_says_where_moments_come_from_and_their_levels(tmp_path):
    base, dirs = _zoo(tmp_path, scale=10.0)
    ex = cl.Experts.from_dirs(base, dirs, names=["math", "sorter"])
    df = preflight(ex)
    assert df["expert"].tolist() == ["math", "sorter"]
    assert (df["moments_format"] == "exported exp_avg_sq (safetensors)").all()
    assert df["step"].tolist() == [60, 150] and (df["beta2"] == 0.999).all()
    assert df["bias_factor"].tolist() == pytest.approx([1 / (1 - 0.999**60), 1 / (1 - 0.999**150)])
    # every tensor fits the budget: the level is moment_levels' mean v, exactly
    levels = cl.moment_levels(ex, **KW).set_index("expert")["mean_v"]
    assert df.set_index("expert")["v_level"].tolist() == pytest.approx(levels.tolist(), rel=1e-12)
    assert df["level_ratio"].tolist() == pytest.approx([1.0, 10.0], rel=1e-5)
    assert (df["relative_edit"] > 0).all() and df["edit_ratio"].min() == 1.0
    corrected = preflight(cl.Experts.from_dirs(base, dirs, names=["math", "sorter"], bias_correction=True))
    assert corrected["bias_corrected"].all()
    assert corrected["level_ratio"].iloc[1] == pytest.approx(10 * bias_factor(0.999, 150) / bias_factor(0.999, 60),
                                                             rel=1e-5)


def test_a_level_sample_spreads_over_the_model_within_its_budget(tmp_path):
    base, dirs = _zoo(tmp_path)
    ex = cl.Experts.from_dirs(base, dirs)
    names = ex.tensor_names(floating_only=True)
    assert level_names(ex) == names
    small = level_names(ex, max_entries=300)
    sizes = {n: ex.reference.shape(n).numel() for n in names}
    assert sum(sizes[n] for n in small) <= 300 and names[0] in small and names[-1] in small
    assert len(small) >= 3 and small == [n for n in names if n in small]


@pytest.mark.parametrize("scale, warned", [(10.0, True), (2.5, False)])
def test_a_curvature_weighted_merge_warns_when_levels_differ(tmp_path, scale, warned):
    base, dirs = _zoo(tmp_path, scale=scale)
    ex = cl.Experts.from_dirs(base, dirs, names=["math", "sorter"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cl.merge(ex, "ota", epsilon=1e-26, **KW)
        cl.merge(ex, "fisher", **KW)
    msgs = [str(w.message) for w in caught if "differ in level" in str(w.message)]
    assert len(msgs) == (2 if warned else 0)
    if warned:
        assert msgs[0].startswith("ota:") and msgs[1].startswith("fisher:")
        assert "'sorter'" in msgs[0] and "'math'" in msgs[0] and "10.0x" in msgs[0]
        assert "normalise: global" in msgs[0] and "bias_correction" in msgs[0]
        assert "step 60" in msgs[0] and "bias factor 7.18" in msgs[0]


def test_no_warning_where_the_levels_do_not_decide(tmp_path):
    base, dirs = _zoo(tmp_path, scale=10.0)
    ex = cl.Experts.from_dirs(base, dirs, names=["math", "sorter"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cl.merge(ex, "ota", epsilon=1e-26, normalise="global", **KW)  # divided out per tensor
        cl.merge(ex, "linear", **KW)  # no moments used
    assert not [w for w in caught if "differ in level" in str(w.message)]


def test_edits_of_very_different_sizes_are_named_in_the_warning(tmp_path):
    base, dirs = _zoo(tmp_path, scale=10.0)
    # the second expert moved 20x further from the base
    from curvlens.io.writer import write_model

    b = cl.Checkpoint.open(base)
    far = {n: b[n] + 20 * (cl.Checkpoint.open(dirs[1])[n] - b[n]) for n in b.keys()}
    write_model(far, tmp_path / "far")
    ex = cl.Experts.from_dirs(base, [dirs[0], tmp_path / "far"], names=["math", "sorter"],
                              moments=[d / "export" / "exp_avg_sq.safetensors" for d in dirs])
    assert preflight(ex)["edit_ratio"].iloc[1] > 10
    with pytest.warns(UserWarning, match=r"edits also differ in size by \d+\.\dx"):
        cl.merge(ex, "ota", epsilon=1e-26, **KW)


def test_the_notebook_view_and_the_cli_show_it(tmp_path, capsys):
    base, dirs = _zoo(tmp_path, scale=10.0)
    ex = cl.Experts.from_dirs(base, dirs, names=["math", "sorter"])
    html = ex._repr_html_()
    assert "<table" in html and "v_level" in html and "bias_factor" in html and "differ in level" in html
    assert "<table" not in cl.Experts.from_dirs(base, dirs, moments=False)._repr_html_()
    (tmp_path / "ota.yml").write_text(
        f"merge_method: ota\nbase_model: {base}\nmodels:\n  - model: {dirs[0]}\n  - model: {dirs[1]}\n"
        "parameters:\n  epsilon: 1.0e-26\n")
    assert main(["merge", str(tmp_path / "ota.yml"), str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "v_level" in out.out and "bias_factor" in out.out
    assert out.out.index("v_level") < out.out.index("merged 2 experts")
    warn = [line for line in out.err.splitlines() if "differ in level" in line]
    assert len(warn) == 1 and warn[0].startswith("curvlens: warning: ota:")


def test_bias_factor():
    assert math.isnan(bias_factor(None, 10)) and math.isnan(bias_factor(0.999, None))
    assert math.isnan(bias_factor(0.999, 0)) and bias_factor(0.0, 3) == 1.0
    assert bias_factor(0.999, 1) == pytest.approx(1000.0)


def test_uneven_steps_bias_correct_each_parameter_by_its_own_count():
    """A parameter no gradient reached at some steps (Wav2Vec2's masked embedding)."""
    v = {"a": torch.full((2,), 4.0), "b": torch.full((3,), 9.0)}
    state = {"state": {0: {"exp_avg_sq": v["a"], "step": torch.tensor(5.0)},
                       1: {"exp_avg_sq": v["b"], "step": torch.tensor(2.0)}},
             "param_groups": [{"params": [0, 1], "betas": (0.9, 0.99)}]}
    raw = cl.Moments.open(state, checkpoint=["a", "b"])
    assert raw.step == 5 and not raw.bias_corrected
    m = cl.Moments.open(state, checkpoint=["a", "b"], bias_correction=True)
    assert m.bias_corrected and m.step == 5
    torch.testing.assert_close(m["a"], v["a"] / (1 - 0.99**5))
    torch.testing.assert_close(m["b"], v["b"] / (1 - 0.99**2))
