"""sparse_soup / sparsity_check over whole models: known masks, reported disagreement."""
import pytest
import torch

import curvlens as cl
from curvlens.errors import CurvlensError
from curvlens.io.writer import write_model


def _sparse_experts(root, disagree=False, n=3, seed=0):
    """n experts sharing one mask per tensor (optionally expert 1 prunes one more entry of ``b``)."""
    g = torch.Generator().manual_seed(seed)
    masks = {"a.weight": torch.rand(4, 6, generator=g) > 0.5, "b.weight": torch.rand(5, generator=g) > 0.3}
    dirs, weights = [], []
    for i in range(n):
        w = {k: torch.randn(m.shape, generator=g) * m for k, m in masks.items()}
        w["a.weight"][w["a.weight"] == 0] = 0.0  # -0.0 stays a zero either way
        if disagree and i == 1:
            kept = masks["b.weight"].nonzero().flatten()
            w["b.weight"][kept[0]] = 0.0
        dirs.append(write_model(w, root / f"e{i}"))
        weights.append(w)
    return masks, dirs, weights


def test_shared_masks_are_kept_exactly(tmp_path):
    masks, dirs, weights = _sparse_experts(tmp_path)
    ex = cl.Experts.from_dirs(None, dirs, moments=False)
    res = cl.sparse_soup(ex, tmp_path / "soup", device="cpu", progress=False)
    for k, m in masks.items():
        t = res.checkpoint[k]
        assert torch.equal(t != 0, m)
        torch.testing.assert_close(t, sum(w[k] for w in weights) / 3)
    assert res.report["agree"].all() and (res.report["disagreeing"] == 0).all()
    assert list(res.report["shared_zeros"]) == [int((~m).sum()) for m in masks.values()]
    assert (res.report["cancelled"] == 0).all()
    assert (tmp_path / "soup" / "sparsity_report.csv").is_file()
    check = cl.sparsity_check(ex, device="cpu", progress=False)
    assert check["agree"].all() and list(check["name"]) == ["a.weight", "b.weight"]


def test_disagreeing_masks_are_reported_never_accepted_silently(tmp_path):
    masks, dirs, weights = _sparse_experts(tmp_path, disagree=True)
    ex = cl.Experts.from_dirs(None, dirs, moments=False)
    with pytest.raises(CurvlensError, match="disagree in 1 of 2 tensors: b.weight: 1 of 5") as info:
        cl.sparse_soup(ex, tmp_path / "soup", device="cpu", progress=False)
    assert not (tmp_path / "soup").exists()  # nothing written
    rep = info.value.report
    assert list(rep.loc[~rep["agree"], "name"]) == ["b.weight"]
    assert int(rep.loc[rep["name"] == "b.weight", "zeros_e1"].iloc[0]) == int((~masks["b.weight"]).sum()) + 1
    check = cl.sparsity_check(ex, device="cpu", progress=False)
    assert list(check.loc[~check["agree"], "disagreeing"]) == [1]

    with pytest.warns(UserWarning, match="disagree in 1 tensors"):
        union = cl.sparse_soup(ex, device="cpu", progress=False, mask="union")
    with pytest.warns(UserWarning, match="disagree"):
        inter = cl.sparse_soup(ex, device="cpu", progress=False, mask="intersection", weights=[1, 1, 2])
    b = [w["b.weight"] for w in weights]
    shared_zero = (b[0] == 0) & (b[1] == 0) & (b[2] == 0)
    any_zero = (b[0] == 0) | (b[1] == 0) | (b[2] == 0)
    assert torch.equal(union.checkpoint["b.weight"] == 0, shared_zero)
    assert torch.equal(inter.checkpoint["b.weight"] == 0, any_zero)
    torch.testing.assert_close(inter.checkpoint["b.weight"][~any_zero],
                               ((b[0] + b[1] + 2 * b[2]) / 4)[~any_zero])
    assert list(union.disagreements["name"]) == ["b.weight"]


def test_soup_refuses_bad_options_and_its_inputs(tmp_path):
    _, dirs, _ = _sparse_experts(tmp_path, n=2)
    ex = cl.Experts.from_dirs(None, dirs, moments=False)
    with pytest.raises(CurvlensError, match="mask must be"):
        cl.sparse_soup(ex, mask="both", device="cpu", progress=False)
    with pytest.raises(CurvlensError, match="weights"):
        cl.sparse_soup(ex, weights=[1.0], device="cpu", progress=False)
    with pytest.raises(CurvlensError, match="never writes onto or into"):
        cl.sparse_soup(ex, dirs[0] / "soup", device="cpu", progress=False)
