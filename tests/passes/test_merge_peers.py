"""mergekit's peer methods end to end through ``curvlens.merge`` on tiny hand-made
checkpoints: the merged model is the per-tensor function applied tensor by
tensor (with the driver's per-tensor generators for DELLA), written and re-read,
and a method's model count is checked before anything is read."""
import pytest
import torch
import yaml

from curvlens import CurvlensError, Experts
from curvlens.math.blocks import tensor_seed
from curvlens.math.methods import get_method
from curvlens.config.merge import merge
from tests.conftest import make_tiny_zoo


@pytest.fixture
def zoo(tmp_path):
    base_dir, dirs, weights, _ = make_tiny_zoo(tmp_path / "zoo", n_experts=3)
    return Experts.from_dirs(base_dir, dirs, moments=False), weights


def _base(ex, name):
    return ex.base[name]


def test_model_stock_and_della_end_to_end(zoo, tmp_path):
    ex, weights = zoo
    names = ex.tensor_names()
    res = merge(ex, "model_stock", tmp_path / "ms", device="cpu", progress=False, filter_wise=True)
    for n in names:
        want = get_method("model_stock")(_base(ex, n), [weights[e][n] for e in ex.names], filter_wise=True)
        assert torch.equal(res.checkpoint[n], want)
    saved = yaml.safe_load((tmp_path / "ms" / "curvlens_merge.yml").read_text())
    assert saved["merge_method"] == "model_stock" and saved["parameters"] == {"filter_wise": True}

    params = {"density": 0.5, "epsilon": 0.2, "seed": 5, "weight": [0.5, 1.0, 1.5]}
    res = merge(ex, "della", device="cpu", progress=False, **params)
    for n in names:
        rng = torch.Generator().manual_seed(tensor_seed(5, n))
        want = get_method("della")(_base(ex, n), [weights[e][n] for e in ex.names], rng=rng, **params)
        assert torch.equal(res.checkpoint[n], want)
    # the report counts DELLA's kept entries (about density, per expert)
    s = res.summary()
    assert all(abs(s[f"kept_{e}"] - 0.5) < 0.1 for e in ex.names)
    # another seed draws other masks
    other = merge(ex, "della", device="cpu", progress=False, **{**params, "seed": 6})
    assert not torch.equal(other.checkpoint[names[0]], res.checkpoint[names[0]])


def test_slerp_end_to_end_and_model_counts(tmp_path):
    base_dir, dirs, weights, _ = make_tiny_zoo(tmp_path / "pair", n_experts=1)
    ex = Experts.from_dirs(base_dir, dirs, moments=False)
    res = merge(ex, "slerp", tmp_path / "out", device="cpu", progress=False, t=0.3)
    (e,) = ex.names
    for n in ex.tensor_names():
        want = get_method("slerp")(ex.base[n], [weights[e][n]], t=0.3)
        assert torch.equal(res.checkpoint[n], want)
        assert not torch.equal(want, ex.base[n]) and not torch.equal(want, weights[e][n])
    saved = yaml.safe_load((tmp_path / "out" / "curvlens_merge.yml").read_text())
    assert saved["merge_method"] == "slerp" and saved["parameters"] == {"t": 0.3}

    # checked before any tensor is read or any file written
    base_dir, dirs, *_ = make_tiny_zoo(tmp_path / "three", n_experts=3)
    three = Experts.from_dirs(base_dir, dirs, moments=False)
    with pytest.raises(CurvlensError, match="slerp: takes exactly 1 expert besides the base; got 3"):
        merge(three, "slerp", tmp_path / "never", device="cpu", progress=False, t=0.5)
    assert not (tmp_path / "never").exists()
    with pytest.raises(CurvlensError, match="t is required"):
        merge(ex, "slerp", device="cpu", progress=False)
    with pytest.raises(CurvlensError, match="passthrough: takes no base"):
        merge(ex, "passthrough", device="cpu", progress=False)


@pytest.mark.parametrize("method, params", [("karcher", {}), ("multislerp", {}), ("nuslerp", {}),
                                            ("slerp", {"t": 0.4})])
def test_a_base_listed_under_models_is_the_base_only(tmp_path, method, params):
    # mergekit flags the base_model among its inputs; these methods use it as the
    # base (karcher: as one more model), never also as an expert
    from curvlens.config.merge_config import load_merge_config

    n = 1 if method == "slerp" else 2
    base_dir, dirs, weights, _ = make_tiny_zoo(tmp_path / "zoo", n_experts=n)
    cfg = {"merge_method": method, "base_model": str(base_dir),
           "models": [{"model": str(base_dir)}] + [{"model": str(d)} for d in dirs], "parameters": params}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    mc = load_merge_config(tmp_path / "m.yml")
    assert mc.base == base_dir.resolve() and len(mc.models) == n
    ex = mc.experts()
    res = merge(ex, mc.method, device="cpu", progress=False, **mc.params)
    name = "model.layers.0.mlp.up_proj.weight"
    want = get_method(method)(ex.base[name], [weights[e][name] for e in ex.names], **params)
    assert torch.equal(res.checkpoint[name], want)
