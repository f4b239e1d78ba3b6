"""The diagonal predicted loss split into a coherent part (along the expert's own edit) and the rest."""
import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math.coherent import coherent_split
from curvlens.math.interference import predicted_loss_increase


def _case(seed=0, shape=(6, 10)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tau = 0.1 * torch.randn(shape, generator=g)
    v = torch.rand(shape, generator=g)
    return v, base, base + tau, tau


@pytest.mark.parametrize("seed", range(4))
def test_the_parts_add_up_to_the_diagonal_prediction(seed):
    v, base, expert, tau = _case(seed)
    g = torch.Generator().manual_seed(100 + seed)
    merged = base + 0.4 * tau + 0.05 * torch.randn(tau.shape, generator=g)
    s = coherent_split(v, merged, expert, base)
    assert s["coherent"] + s["residual"] == pytest.approx(predicted_loss_increase(v, merged, expert), rel=1e-9)
    assert s["coherent"] >= 0 and s["residual"] >= 0
    assert s["residual_per_unit"] == pytest.approx(s["residual"] / tau.shape[1])


def test_scaling_the_edit_is_all_coherent_and_unbiased_noise_mostly_residual():
    v, base, expert, tau = _case(1)
    # a merge that keeps a fraction of every row's edit: coherent only, (1 - beta)^2 of the base's loss
    whole = coherent_split(v, base, expert, base)["coherent"]
    for beta in (0.0, 0.25, 1.0, 1.5):
        s = coherent_split(v, base + beta * tau, expert, base)
        assert s["coherent"] == pytest.approx((1 - beta) ** 2 * whole, rel=1e-5, abs=1e-9 * whole)  # fp32 theta
        assert s["residual"] == pytest.approx(0.0, abs=1e-6 * whole)
    # DARE at density 0.5: drop half the entries, double the rest; unbiased, so mostly residual
    keep = torch.rand(tau.shape, generator=torch.Generator().manual_seed(7)) < 0.5
    dare = coherent_split(v, base + torch.where(keep, 2 * tau, 0 * tau), expert, base)
    assert dare["residual"] > 3 * dare["coherent"]
    # ... whereas the diagonal prediction prices it about as badly as undoing the whole edit
    assert dare["coherent"] + dare["residual"] > 0.5 * whole


def test_rows_of_a_vector_are_entries_and_unedited_rows_are_residual():
    v = torch.tensor([1.0, 2.0, 3.0])
    base, expert = torch.zeros(3), torch.tensor([1.0, -1.0, 0.0])
    merged = torch.tensor([0.5, 0.0, 2.0])
    s = coherent_split(v, merged, expert, base)
    # entry by entry: 0.5*1*0.25 + 0.5*2*1 coherent; the unedited third entry all residual (0.5*3*4)
    assert s["coherent"] == pytest.approx(0.125 + 1.0) and s["residual"] == pytest.approx(6.0)
    assert s["residual_per_unit"] == s["residual"]


def test_bad_inputs_name_the_culprit():
    v, base, expert, _ = _case()
    with pytest.raises(CurvlensError, match="same shape"):
        coherent_split(v, base[:, :3], expert, base)
    with pytest.raises(CurvlensError, match="v"):
        coherent_split(-v, base, expert, base)
