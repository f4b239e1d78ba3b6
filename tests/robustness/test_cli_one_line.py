"""No traceback from the CLI on bad input: each defect, planted in an otherwise
good config or command, exits 2 with one line on stderr that names it, and
leaves no output behind."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlens.cli import main
from tests.robustness.conftest import scratch

#: (defect, how it changes a good ties config, what the error line must say)
DEFECTS = {
    "unknown key": (lambda c, z: c.update(colour="red"), r"unknown key\(s\) \['colour'\]"),
    "unknown method": (lambda c, z: c.update(merge_method="tiez"), "unknown merge method 'tiez'"),
    "missing model": (lambda c, z: c["models"].append({"model": str(z / "nowhere")}), "not found"),
    "bad density": (lambda c, z: c["parameters"].update(density=1.5), r"density must be <= 1\.0"),
    "nan in a gradient": (lambda c, z: c["parameters"].update(density=[0.5, float("nan")]), r"density\[1\] must be finite"),
    "bool weight": (lambda c, z: c["models"][0].update(parameters={"weight": True}), "weight must be a real number"),
    "string lambda": (lambda c, z: c["parameters"].update({"lambda": "big"}), "lambda must be a real number"),
    "bad filter": (lambda c, z: c["parameters"].update(density=[{"filter": 3, "value": 0.5}]),
                   r"\[0\]\.filter must be a string"),
    "template path": (lambda c, z: c.update(chat_template="../../etc/passwd"), "is not a template name"),
    "template abs": (lambda c, z: c.update(chat_template="/etc/passwd"), "is not a template name"),
    "bad dtype": (lambda c, z: c.update(dtype="int8"), "dtype='int8' is not valid"),
    "exclude everything": (lambda c, z: c.update(tensors=[{"filter": "model", "action": "drop"},
                                                          {"filter": "lm_head", "action": "drop"}]),
                           "leave no"),
    "models not a list": (lambda c, z: c.update(models={"model": "x"}), "'models' must be a non-empty list"),
    "passthrough with two": (lambda c, z: (c.update(merge_method="passthrough"), c.pop("parameters", None),
                                          [m.pop("parameters", None) for m in c["models"]]),
                             r"passthrough takes at most 1 model\(s\); got"),
    "lambda overflow": (lambda c, z: c["parameters"].update({"lambda": 1e38}), "non-finite"),
}


@settings(max_examples=len(DEFECTS) + 5, deadline=None)
@given(defect=st.sampled_from(sorted(DEFECTS)), overwrite=st.booleans())
def test_each_planted_defect_is_one_line_and_exit_2(zoo, defect, overwrite):
    base, dirs, *_ = zoo
    edit, match = DEFECTS[defect]
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(d)} for d in dirs[:2]],
           "parameters": {"density": 0.5}}
    with scratch() as d:
        edit(cfg, d)
        (d / "c.yml").write_text(yaml.safe_dump(cfg))
        err = _run_main(["merge", str(d / "c.yml"), str(d / "o"), "--quiet", "--device", "cpu"]
                        + (["--overwrite"] if overwrite else []), expect=2)
        assert re.search(match, err), (defect, err)
        assert not (d / "o").exists()


def _run_main(argv, expect):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    text = err.getvalue()
    assert rc == expect, text
    assert text.startswith("curvlens: error: ") and text.count("\n") == 1 and "Traceback" not in text, text
    return text


def test_analyze_with_an_exclude_that_leaves_nothing(zoo, tmp_path):
    base, dirs, *_ = zoo
    err = _run_main(["analyze", *map(str, dirs[:2]), "--base", str(base), "--out", str(tmp_path / "a"),
                     "--exclude", "model", "lm_head", "--quiet", "--device", "cpu"], expect=2)
    assert "leave no floating-point tensor" in err and not (tmp_path / "a").exists()


@pytest.mark.parametrize("scale", ["abc", "1e39"])  # a load error and a write error
def test_the_real_entry_point_prints_no_traceback(zoo, tmp_path, scale):
    base, dirs, *_ = zoo
    (tmp_path / "s.yml").write_text(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {dirs[0]}, "
                                    f"layer_range: [0, 2]}}]\nparameters: {{scale: {scale}}}\n")
    p = subprocess.run([sys.executable, "-m", "curvlens.cli", "merge", str(tmp_path / "s.yml"), str(tmp_path / "o"),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert "scale" in p.stderr and not (tmp_path / "o").exists()
