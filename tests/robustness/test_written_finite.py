"""No NaN or Inf is ever written, whatever wrote it and whatever the dtype: the
writer checks every floating tensor (``ModelWriter.add``, ``write_tensor_file``),
and the error names the tensor and what made it; from the CLI, exit 2 and no
output."""
from __future__ import annotations

import re

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from curvlens import Checkpoint, CurvlensError, Experts, export_moments, merge
from curvlens.cli import main
from curvlens.io.writer import ModelWriter, write_tensor_file
from curvlens.passes.sparse_soup import sparse_soup
from tests.robustness.conftest import scratch

KW = dict(device="cpu", progress=False)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def tensors(draw):
    """A small tensor of a float dtype, and the positions made NaN / +-Inf (maybe none)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))).to(dtype)
    n = t.numel()
    bad = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from([float("nan"), float("inf"),
                                                                           float("-inf")])), max_size=3))
    flat = t.reshape(-1)
    for i, v in bad:
        flat[i] = v
    return t, len({i for i, _ in bad})


@settings(max_examples=40, deadline=None)
@given(items=st.lists(tensors(), min_size=1, max_size=4), planned=st.booleans())
def test_the_writer_writes_finite_tensors_and_refuses_any_other(items, planned):
    named = {f"t{i}": t for i, (t, _) in enumerate(items)}
    first_bad = next((f"t{i}" for i, (_, nbad) in enumerate(items) if nbad), None)
    plan = [(k, t.shape, t.dtype) for k, t in named.items()] if planned else None
    with scratch() as d:
        if first_bad is None:
            with ModelWriter(d / "o", plan=plan) as w:
                for k, t in named.items():
                    w.add(k, t)
            back = Checkpoint.open(d / "o")
            assert all(torch.equal(back[k], t) for k, t in named.items())
        else:
            nbad = dict((f"t{i}", n) for i, (_, n) in enumerate(items))[first_bad]
            with pytest.raises(CurvlensError, match=rf"tensor '{first_bad}' has {nbad} non-finite value"):
                with ModelWriter(d / "o", plan=plan) as w:
                    for k, t in named.items():
                        w.add(k, t, made_by="the test")
            assert not (d / "o").exists() and [p.name for p in d.iterdir()] == []
        with scratch() as f:
            if first_bad is None:
                write_tensor_file(named, f / "x.safetensors")
                assert all(torch.equal(load_file(str(f / "x.safetensors"))[k], t) for k, t in named.items())
            else:
                with pytest.raises(CurvlensError, match=f"tensor '{first_bad}'"):
                    write_tensor_file(named, f / "x.safetensors")
                assert list(f.iterdir()) == []


@pytest.mark.parametrize("scale, match", [
    ("1e39", r"non-finite value\(s\).*times scale 1e\+39"),  # finite as a number, Inf in fp32
    ("-1e39", r"non-finite value\(s\).*times scale -1e\+39"),
    ("nan", "scale must be finite"), (".inf", "scale must be finite"),
    ("true", "scale must be a real number"), ("abc", "scale must be a real number"),
    ("[{filter: mlp, value: abc}, {value: 1}]", r"scale\[0\]\.value must be a real number"),
    ("[1, .nan]", r"scale\[1\] must be finite"),
])
def test_a_slice_scale_that_is_not_a_finite_number_never_writes(zoo, tmp_path, capsys, scale, match):
    base, dirs, *_ = zoo
    text = (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {dirs[0]}, layer_range: [0, 2]}}]\n"
            f"parameters: {{scale: {scale}}}\n")
    (tmp_path / "s.yml").write_text(text)
    assert main(["merge", str(tmp_path / "s.yml"), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_a_merge_that_overflows_never_writes(zoo, tmp_path, capsys):
    base, dirs, *_ = zoo
    ex = Experts.from_dirs(base, dirs[:2], moments=False)
    with pytest.raises(CurvlensError, match="produced non-finite values"):
        merge(ex, "task_arithmetic", tmp_path / "o", **{"lambda": 1e38}, **KW)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"lambda": 1e38},
           "models": [{"model": str(d)} for d in dirs[:2]]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "o"), "--quiet", "--device", "cpu"]) == 2
    assert "non-finite" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_input_dtype_overflow_says_it_is_the_input_dtype(zoo, tmp_path):
    base, dirs, *_ = zoo
    ex = Experts.from_dirs(base, dirs[:2], moments=False)
    with pytest.raises(CurvlensError, match=r"overflows the input dtype float16 .*before the cast to out_dtype float32"):
        merge(ex, "task_arithmetic", tmp_path / "o", input_dtype="float16", dtype="float32", **{"lambda": 1e6}, **KW)
    with pytest.raises(CurvlensError, match="overflows the output dtype float16"):
        merge(ex, "task_arithmetic", tmp_path / "o", input_dtype="float32", dtype="float16", **{"lambda": 1e6}, **KW)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("weights, match", [
    ([1.0, float("inf")], r"weights\[1\] must be finite"), ([float("nan"), 1.0], r"weights\[0\] must be finite"),
    (["a", 1.0], r"weights\[0\] must be a real number"), ([True, 1.0], "must be a real number"),
    ([1.0], "has 1 entries but there are 2"), ([-1.0, 2.0], r"weights\[0\] must be in \[0"),
    ([0.0, 0.0], "must not be all 0"), ("ab", "must be a list"), (3.0, "must be a list"),
])
def test_sparse_soup_weights_are_finite_numbers(zoo, tmp_path, weights, match):
    base, dirs, *_ = zoo
    with pytest.raises(CurvlensError, match=match):
        sparse_soup(Experts.from_dirs(None, dirs[:2], moments=False), tmp_path / "o", weights=weights, **KW)
    assert not (tmp_path / "o").exists()


def test_exported_moments_are_finite(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    opt.state[model.weight]["exp_avg_sq"][0, 0] = float("nan")
    with pytest.raises(CurvlensError, match="tensor 'weight' has 1 non-finite"):
        export_moments(opt, model, tmp_path / "export" / "exp_avg_sq.safetensors")
    assert not (tmp_path / "export").exists()
