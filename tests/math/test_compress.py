"""Tests for curvlens.math.compress: rank-1 and rank-r moment compression."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlens.errors import CurvlensError
from curvlens.math.compress import compressed_bytes, rank1, rank_r


def test_rank1_exact_on_rank1_matrix():
    a = torch.tensor([1.0, 2.0, 0.5])
    b = torch.tensor([4.0, 0.0, 1.0, 3.0])
    v = torch.outer(a, b)
    torch.testing.assert_close(rank1(v), v)


def test_rank1_hand_example_not_rank1():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # rowsum = colsum = [1, 1], total 2 -> every entry 1 * 1 / 2
    torch.testing.assert_close(rank1(v), torch.full((2, 2), 0.5))


def test_rank1_preserves_row_and_column_sums():
    v = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    approx = rank1(v)
    torch.testing.assert_close(approx.sum(dim=0), v.sum(dim=0))
    torch.testing.assert_close(approx.sum(dim=1), v.sum(dim=1))


def test_rank1_zero_sum_gives_zeros():
    out = rank1(torch.zeros(3, 2))
    assert torch.equal(out, torch.zeros(3, 2))


@pytest.mark.parametrize("v", [torch.tensor(2.0), torch.tensor([1.0, 2.0]), torch.ones(2, 2, 2)])
def test_non_2d_unchanged(v):
    assert rank1(v) is v
    assert rank_r(v, 1) is v


def test_rank1_rejects_negative_and_non_float():
    with pytest.raises(CurvlensError, match="nonnegative"):
        rank1(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    with pytest.raises(CurvlensError, match="floating-point"):
        rank1(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(CurvlensError, match="torch.Tensor"):
        rank1([[1.0]])


def test_rank_r_full_rank_exact():
    v = torch.rand(6, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rank_r(v, 4), v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rank_r(v, 10), v, atol=1e-5, rtol=1e-5)


def test_rank_r_error_shrinks_with_rank_and_stays_nonnegative():
    v = torch.rand(8, 8, generator=torch.Generator().manual_seed(2))
    errors = [float((rank_r(v, r) - v).norm()) for r in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4
    assert all(bool((rank_r(v, r) >= 0).all()) for r in (1, 2, 4))


def test_rank_r_clips_negative_reconstruction():
    # The rank-2 SVD reconstruction of this matrix has -0.19 in two corners.
    v = torch.tensor([[0.0, 1.0, 1.0], [1.0, 4.0, 1.0], [1.0, 1.0, 0.0]])
    u, s, vh = torch.linalg.svd(v)
    assert float(((u[:, :2] * s[:2]) @ vh[:2]).min()) < -0.1
    out = rank_r(v, 2)
    assert out[0, 0] == 0 and out[2, 2] == 0
    assert bool((out >= 0).all())


def test_rank_r_one_matches_rank1_on_rank1_matrix():
    v = torch.outer(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0, 5.0]))
    torch.testing.assert_close(rank_r(v, 1), rank1(v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [0, -1, 1.5, True, None])
def test_rank_r_bad_rank(r):
    with pytest.raises(CurvlensError, match="rank r must be an int >= 1"):
        rank_r(torch.ones(2, 2), r)


def test_inputs_not_mutated():
    v = torch.rand(4, 3, generator=torch.Generator().manual_seed(3))
    before = v.clone()
    rank1(v)
    rank_r(v, 1)
    assert torch.equal(v, before)


def test_compressed_bytes():
    assert compressed_bytes((10, 20), None) == 800
    assert compressed_bytes((10, 20), 1) == 120
    assert compressed_bytes((10, 20), 2) == 2 * 31 * 4
    assert compressed_bytes((10, 20), 9) == 800  # never more than dense
    assert compressed_bytes((10,), 1) == 40
    assert compressed_bytes((), None) == 4
    assert compressed_bytes((10, 20), 1, itemsize=2) == 60


@pytest.mark.parametrize("shape, rank", [((2, -1), None), ("ab", 1), ((2, 2), 0), ((2, 2), 1.0)])
def test_compressed_bytes_bad_input(shape, rank):
    with pytest.raises(CurvlensError):
        compressed_bytes(shape, rank)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.0, 10.0), min_size=1, max_size=5),
    st.lists(st.floats(0.0, 10.0), min_size=1, max_size=5),
)
def test_rank1_exact_property(a, b):
    v = torch.outer(torch.tensor(a), torch.tensor(b))
    torch.testing.assert_close(rank1(v), v, atol=1e-4, rtol=1e-4)
