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


# ----------------------------------------------- input dtype (mergekit's `dtype`)
def _zoo_in(root, dtype, values):
    """``values`` (fp32 tensors exactly representable in ``dtype``) written as
    ``dtype`` checkpoints, the moments as fp32."""
    dirs = []
    for who, (w, m) in values.items():
        d = write_model({k: v.to(dtype) for k, v in w.items()}, root / who, max_shard_size=1 << 20)
        if m is not None:
            (d / "export").mkdir()
            save_file(m, str(d / "export" / "exp_avg_sq.safetensors"))
        dirs.append(d)
    return dirs


def _zoo_values(narrow, seed=0):
    from tests.conftest import tiny_llama_shapes

    # the embedding and head reach the native kernels' sizes (2**17 entries)
    shapes = tiny_llama_shapes(hidden=64, layers=1, inter=96, vocab=2048, kv=16)
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(narrow).float() for k, s in shapes.items()}
    out = {"base": (base, None)}
    for e in range(3):
        w = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(narrow).float() for k, v in base.items()}
        w = {k: torch.where(torch.rand(v.shape, generator=g) < 0.1, base[k], v) for k, v in w.items()}  # ties, zeros
        out[f"expert{e}"] = (w, {k: torch.rand(v.shape, generator=g) * 1e-3 for k, v in base.items()})
    return out


def test_rounding_that_changes_no_value_keeps_the_stored_tensors(tmp_path):
    vals = _zoo_values(torch.bfloat16)
    base_dir, *dirs = _zoo_in(tmp_path, torch.bfloat16, vals)
    ex = Experts.from_dirs(base_dir, dirs)
    name = "model.layers.0.mlp.up_proj.weight"
    want = vals["expert1"][0][name]
    for round_to, seen in [(torch.float32, torch.bfloat16), (torch.float16, torch.float16), (None, torch.bfloat16)]:
        (g,) = ex.rounded(round_to).iter_tensors([name], dtype=None, progress=False)
        assert g.experts[1].dtype == seen and g.base.dtype == seen and g.moments[1].dtype == torch.float32
        # fp32 holds every bf16 value; fp16 rounds them (its range and precision differ)
        expected = want if round_to in (None, torch.float32) else want.to(torch.float16)
        assert torch.equal(g.experts[1], expected.to(seen))
        (g32,) = ex.rounded(round_to).iter_tensors([name], progress=False)  # a pass asking for fp32 gets fp32
        assert g32.experts[1].dtype == torch.float32 and torch.equal(g32.experts[1], expected.float())
    # fp32 weights rounded to bf16 are rounded
    f32 = {"base": vals["base"], "expert0": ({k: v + 1e-4 for k, v in vals["expert0"][0].items()},
                                             vals["expert0"][1])}
    b2, d2 = _zoo_in(tmp_path / "f32", torch.float32, f32)
    (g,) = Experts.from_dirs(b2, [d2]).rounded(torch.bfloat16).iter_tensors([name], dtype=None, progress=False)
    assert g.experts[0].dtype == torch.bfloat16
    assert torch.equal(g.experts[0], (f32["expert0"][0][name]).to(torch.bfloat16))


# Every merge method, with parameters that make it do its work (masks, ties, model-wide selections).
_EVERY_METHOD = {
    "linear": ({"weight": 1.0}, False), "task_arithmetic": ({"weight": 0.5}, True),
    "ties": ({"weight": 1.0, "density": 0.5}, True), "dare_ties": ({"weight": 1.0, "density": 0.5}, True),
    "dare_linear": ({"weight": 1.0, "density": 0.5}, True),
    "breadcrumbs": ({"weight": 1.0, "density": 0.9, "gamma": 0.01}, True),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.9, "gamma": 0.01}, True),
    "della": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, True),
    "della_linear": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, True),
    "model_stock": ({}, True), "slerp": ({"t": 0.3}, True), "nuslerp": ({"weight": 1.0}, False),
    "multislerp": ({"weight": 1.0}, True), "karcher": ({}, False), "sce": ({"select_topk": 0.1}, True),
    "arcee_fusion": ({}, True), "fisher": ({}, False), "passthrough": ({}, False),
    "ota": ({"ffg_density": 0.3, "epsilon": 1e-26, "fallback_to_base": True}, True),
}


def test_every_method_is_in_the_input_dtype_check():
    from curvlens.math.methods import registry

    assert set(_EVERY_METHOD) == set(registry._REGISTRY)


@pytest.fixture(scope="module")
def dtype_zoos(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype-zoos")
    out = {}
    for narrow in (torch.bfloat16, torch.float16):
        vals = _zoo_values(narrow, seed=1)
        key = str(narrow).split(".")[1]
        out[key] = (_zoo_in(root / key, narrow, vals), _zoo_in(root / f"{key}-as-fp32", torch.float32, vals))
    return out


@pytest.mark.parametrize("narrow,kernels", [("bfloat16", "native"), ("float16", "native"), ("bfloat16", "torch")])
@pytest.mark.parametrize("method", sorted(_EVERY_METHOD))
def test_a_float32_merge_of_narrow_weights_equals_the_merge_of_their_fp32_copies(dtype_zoos, method, narrow, kernels,
                                                                                  monkeypatch):
    """mergekit's ``dtype: float32`` computes on fp32 inputs: weights stored in
    bf16/fp16 and the same values stored in fp32 must merge to the same bytes
    (the narrow ones are not cast first: the cast changes no value), with the
    compiled kernels and with the torch code (a GPU's path)."""
    import yaml

    from curvlens.config.merge import merge
    from curvlens.config.merge_config import load_merge_config
    from curvlens.math import native

    if kernels == "torch":
        monkeypatch.setitem(native._STATE, "lib", None)

    params, with_base = _EVERY_METHOD[method]
    results = []
    for dirs in dtype_zoos[narrow]:
        base, *experts = [str(d) for d in dirs]
        models = {"slerp": experts[:1], "arcee_fusion": experts[:1], "nuslerp": experts[:2],
                  "passthrough": experts[:1]}.get(method, experts)
        cfg = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16",
               "models": [{"model": m} for m in models], "parameters": params}
        if with_base:
            cfg["base_model"] = base
        if method == "passthrough":
            del cfg["parameters"]
        mc = load_merge_config(text=yaml.safe_dump(cfg))
        results.append(merge(mc.experts(), mc.method, device="cpu", progress=False, **mc.merge_kwargs()))
    a, b = results
    assert list(a.checkpoint.keys()) == list(b.checkpoint.keys())
    for k in a.checkpoint.keys():
        assert a.checkpoint[k].dtype == b.checkpoint[k].dtype == torch.bfloat16, k
        assert torch.equal(a.checkpoint[k], b.checkpoint[k]), k
    assert a.report.equals(b.report)
