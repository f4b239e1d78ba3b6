"""The empirical Fisher's tensor math against closed forms."""
import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math.empirical_fisher import (
    SquaredGradSum,
    causal_lm_loss,
    causal_mask_4d,
    per_example_grads,
)


def _linear_problem(n=7, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    return x, y, w


def _mse(p, ex):
    return 0.5 * (p["w"] @ ex["x"] - ex["y"]) ** 2


@pytest.mark.parametrize("vectorize", [True, False])
def test_per_example_grads_linear_regression_closed_form(vectorize):
    x, y, w = _linear_problem()
    grads = per_example_grads(_mse, {"w": w}, {"x": x, "y": y}, vectorize=vectorize)
    expected = (x @ w - y)[:, None] * x  # per example (w.x - y) x
    torch.testing.assert_close(grads["w"], expected)


def test_squared_grad_sum_is_the_empirical_fisher_in_any_chunking():
    x, y, w = _linear_problem(n=10)
    fisher = ((x @ w - y)[:, None] * x).pow(2).mean(0)  # closed form
    for chunk in (1, 3, 10):
        acc = SquaredGradSum()
        for s in range(0, 10, chunk):
            acc.add(per_example_grads(_mse, {"w": w}, {"x": x[s:s + chunk], "y": y[s:s + chunk]}))
        assert acc.n == 10
        assert acc.mean()["w"].dtype == torch.float32  # accumulated in fp32
        torch.testing.assert_close(acc.mean()["w"].double(), fisher, rtol=1e-6, atol=0)


def test_squared_grad_sum_refuses_mismatches_and_empty():
    acc = SquaredGradSum()
    with pytest.raises(CurvlensError, match="at least one"):
        acc.mean()
    with pytest.raises(CurvlensError, match="number of examples"):
        acc.add({"a": torch.ones(2, 3), "b": torch.ones(3, 3)})
    acc.add({"a": torch.ones(2, 3)})
    with pytest.raises(CurvlensError, match="shape"):
        acc.add({"a": torch.ones(2, 4)})


def test_causal_lm_loss_is_hf_shifted_mean_over_labelled_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    labels = torch.tensor([-100, 3, -100, 6, 1])
    # HF: logits[t] predicts labels[t + 1]; mean over labelled targets
    expected = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
    assert float(causal_lm_loss(logits, torch.full((5,), -100))) == 0.0


def test_causal_mask_4d_never_lets_a_real_token_see_padding():
    m = causal_mask_4d(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert m.shape == (2, 1, 5, 5)
    ok = m[:, 0] == 0
    assert torch.equal(ok[1], torch.ones(5, 5, dtype=torch.bool).tril())
    assert not ok[0, :3, 3:].any()  # real queries never see the padding keys
    assert ok[0].diagonal().all()  # every row sees at least itself
