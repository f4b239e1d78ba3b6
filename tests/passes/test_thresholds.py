import pytest
import torch

from curvlens import CurvlensError
from curvlens.math import blocks
from curvlens.passes.thresholds import mask_scores, model_thresholds, score_chunks


@pytest.fixture
def groups(tiny_zoo):
    from curvlens import Experts

    base, dirs = tiny_zoo[:2]
    ex = Experts.from_dirs(base, dirs)
    return ex, list(ex.iter_tensors(device="cpu", dtype=None, progress=False))


@pytest.mark.parametrize("criterion", ["fisher", "magnitude"])
def test_score_chunks_are_mask_scores_in_pieces(groups, criterion, monkeypatch):
    _, gs = groups
    monkeypatch.setitem(blocks.BLOCK, "cpu", 5)  # several ragged blocks per chunk
    for g in gs:
        if not g.experts[0].is_floating_point():
            continue
        f32 = g.__class__(g.name, g.layer, g.role, g.base.float(), [e.float() for e in g.experts],
                          [v.float() for v in g.moments], g.expert_names)
        want = mask_scores(f32, criterion)
        got = {i: [] for i in range(len(want))}
        for i, sc in score_chunks(g, criterion, chunk=17):
            assert sc.dtype == torch.float32 and sc.numel() <= 17
            got[i].append(sc.clone())  # the buffer is reused between chunks
        for i, w in enumerate(want):
            assert torch.equal(torch.cat(got[i]), w.reshape(-1)), (g.name, i)


def test_score_chunks_need_a_base_and_moments(groups):
    _, gs = groups
    g = gs[0]
    no_base = g.__class__(g.name, g.layer, g.role, None, g.experts, g.moments, g.expert_names)
    with pytest.raises(CurvlensError, match="need a base"):
        next(score_chunks(no_base))
    no_v = g.__class__(g.name, g.layer, g.role, g.base, g.experts, None, g.expert_names)
    with pytest.raises(CurvlensError, match="needs second moments"):
        next(score_chunks(no_v))
    assert next(score_chunks(no_v, "magnitude"))[0] == 0
    with pytest.raises(CurvlensError, match="criterion"):
        next(score_chunks(g, "random"))


def test_thresholds_do_not_depend_on_block_size(groups, monkeypatch):
    ex, _ = groups
    a = model_thresholds(ex, 0.3, device="cpu", progress=False)
    monkeypatch.setitem(blocks.BLOCK, "cpu", 3)
    b = model_thresholds(ex, 0.3, device="cpu", progress=False)
    assert a.equals(b)
