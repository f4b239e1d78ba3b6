"""Sparse-soup math on hand-made masks."""
import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math.sparse_soup import soup_support, sparse_average, zero_pattern

A = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, -3.0]])
B = torch.tensor([[0.0, 3.0, 5.0], [4.0, 0.0, 0.0]])


def test_zero_pattern_counts():
    assert zero_pattern([A, B]) == {"zeros": [3, 3], "shared_zeros": 2, "any_zero": 4, "disagreeing": 2}
    assert zero_pattern([A, A * 2])["disagreeing"] == 0


def test_union_keeps_every_kept_entry_and_zeros_exactly_the_shared_zeros():
    keep = soup_support([A, B], "union")
    soup = sparse_average([A, B], [1.0, 1.0], keep)
    torch.testing.assert_close(soup, torch.tensor([[0.0, 2.0, 2.5], [3.0, 0.0, -1.5]]))
    assert torch.equal(soup == 0, (A == 0) & (B == 0))


def test_intersection_is_zero_wherever_any_ingredient_is():
    keep = soup_support([A, B], "intersection")
    soup = sparse_average([A, B], [3.0, 1.0], keep)
    torch.testing.assert_close(soup, torch.tensor([[0.0, 1.5, 0.0], [2.5, 0.0, 0.0]]))
    assert torch.equal(soup == 0, (A == 0) | (B == 0))


def test_shared_mask_is_kept_by_averaging():
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    ingredients = [torch.randn(2, 3, generator=g) * mask for _ in range(3)]
    for rule in ("agree", "union", "intersection"):
        soup = sparse_average(ingredients, [1.0, 2.0, 1.0], soup_support(ingredients, rule))
        assert torch.equal(soup != 0, mask.bool())


def test_bad_inputs():
    with pytest.raises(CurvlensError, match="mask must be"):
        soup_support([A, B], "any")
    with pytest.raises(CurvlensError, match="shape"):
        zero_pattern([A, B[:1]])
    with pytest.raises(CurvlensError, match="weights"):
        sparse_average([A, B], [0.0, 0.0], soup_support([A, B]))
