import pytest
import torch
from safetensors.torch import save_file

from curvlens import CurvlensError, Experts
from curvlens.io.writer import write_model
from curvlens.runtime import resolve_device


def test_from_dirs_streams_every_tensor(tiny_zoo):
    base_dir, dirs, weights, moments = tiny_zoo
    ex = Experts.from_dirs(base_dir, dirs)
    assert ex.names == ["expert0", "expert1", "expert2"] and ex.has_moments
    seen = []
    for g in ex.iter_tensors(device="cpu", progress=False):
        seen.append(g.name)
        assert g.base.dtype == torch.float32 and len(g.experts) == 3
        for name, x, m in zip(ex.names, g.experts, g.moments):
            assert torch.equal(x, weights[name][g.name])
            assert torch.equal(m, moments[name][g.name])
        torch.testing.assert_close(g.task_vectors[1], weights["expert1"][g.name] - g.base)
    assert seen == ex.tensor_names()
    assert len(seen) == len(ex.describe())


def test_names_and_partial_reads(tiny_zoo):
    base_dir, dirs, *_ = tiny_zoo
    ex = Experts.from_dirs(base_dir, dirs, names=["math", "code", "facts"], moments=False)
    groups = list(ex.iter_tensors(["lm_head.weight"], moments=False, base=False, progress=False))
    assert len(groups) == 1 and groups[0].base is None and groups[0].moments is None
    assert groups[0].role == "lm_head"
    with pytest.raises(CurvlensError, match=r"expert\(s\) \['math', 'code', 'facts'\] have none"):
        next(ex.iter_tensors(progress=False))
    with pytest.raises(CurvlensError, match="unknown tensor name"):
        next(ex.iter_tensors(["nope"], moments=False, progress=False))
    assert ex.subset(["facts", "math"]).names == ["facts", "math"]


def test_every_mismatch_reported_at_once(tiny_zoo, tmp_path):
    base_dir, dirs, weights, moments = tiny_zoo
    w = dict(weights["expert1"])
    w.pop("model.norm.weight")
    w["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    w["extra.weight"] = torch.zeros(1)
    bad = write_model(w, tmp_path / "bad")
    (bad / "export").mkdir()
    m = dict(moments["expert1"])
    m["lm_head.weight"] = torch.zeros(2, 2)
    save_file(m, str(bad / "export" / "exp_avg_sq.safetensors"))
    with pytest.raises(CurvlensError) as info:
        Experts.from_dirs(base_dir, [dirs[0], bad], names=["good", "bad"])
    msg = str(info.value)
    assert "expert 'bad' lacks 1 tensor(s) of base: model.norm.weight" in msg
    assert "expert 'bad' has 1 tensor(s) base lacks: extra.weight" in msg
    assert "model.layers.0.mlp.up_proj.weight has shape (3, 3), base has (12, 8)" in msg
    assert "moments of expert 'bad'" in msg and "lm_head.weight: moment shape (2, 2)" in msg


def test_missing_moments_names_the_expert(tiny_zoo, tmp_path):
    base_dir, dirs, weights, _ = tiny_zoo
    bare = write_model(weights["expert0"], tmp_path / "bare")
    with pytest.raises(CurvlensError, match="expert 'bare'.*no second moments found"):
        Experts.from_dirs(base_dir, [dirs[1], bare])


def test_duplicate_names_and_counts(tiny_zoo):
    base_dir, dirs, *_ = tiny_zoo
    with pytest.raises(CurvlensError, match="unique; repeated: \\['a'\\]"):
        Experts.from_dirs(base_dir, dirs[:2], names=["a", "a"])
    with pytest.raises(CurvlensError, match="names has 1 entries but 2"):
        Experts.from_dirs(base_dir, dirs[:2], names=["a"])


def test_without_base(tiny_zoo):
    _, dirs, weights, _ = tiny_zoo
    ex = Experts.from_dirs(None, dirs)
    g = next(ex.iter_tensors(progress=False, device="cpu"))
    assert g.base is None
    with pytest.raises(CurvlensError, match="task vectors need a base"):
        g.task_vectors


def test_resolve_device():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CurvlensError, match="not a torch device"):
        resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(CurvlensError, match="CUDA is not available"):
            resolve_device("cuda")


def test_dtype_kept_when_asked(tmp_path):
    from tests.conftest import make_tiny_zoo

    base_dir, dirs, *_ = make_tiny_zoo(tmp_path, n_experts=1, dtype=torch.bfloat16)
    ex = Experts.from_dirs(base_dir, dirs)
    g = next(ex.iter_tensors(dtype=None, progress=False, device="cpu"))
    assert g.base.dtype == torch.bfloat16 and g.moments[0].dtype == torch.float32


def test_experts_answer_storage_questions(tmp_path):
    # the dtype and storage questions a writer asks, answered without reading data
    from curvlens import Checkpoint, Expert

    base = {"w": torch.zeros(2, 3, dtype=torch.bfloat16), "ids": torch.arange(3)}
    a = {"w": torch.ones(2, 3, dtype=torch.bfloat16), "ids": torch.arange(3)}
    b = {"w": torch.ones(2, 3, dtype=torch.float16), "ids": torch.arange(3, dtype=torch.int32)}
    d = write_model(b, tmp_path / "b")
    ex = Experts(base, [Expert("a", Checkpoint.open(a)), Expert("b", Checkpoint.open(d), path=d)])
    assert ex.stored_dtype("w") == torch.float32  # bf16 and fp16 promote to fp32
    assert ex.stored_dtype("ids") == torch.int64  # integer tensors keep the reference's
    assert ex.shape("w") == torch.Size([2, 3])
    assert ex.model("base") is ex.base and ex.model("b") is ex["b"].checkpoint
    assert ex.model_dir() is None and ex.model_dir("b") == d  # in memory: no dir to copy files from
    with pytest.raises(CurvlensError, match="no expert named 'c'"):
        ex.model("c")
