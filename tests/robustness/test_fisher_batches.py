"""``estimate_fisher`` against generated batches, by outcome: token ids, labels and
attention masks a model can take give a finite Fisher, equal whether the
per-example gradients are vectorised or looped; anything else (an id outside the
vocabulary, a negative label other than -100, a NaN or non-0/1 mask, float ids)
is a CurvlensError naming the examples and the key, before any forward pass."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlens import CurvlensError
from curvlens.passes.fisher_estimate import estimate_fisher

VOCAB = 16
KW = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def lm():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@st.composite
def batches(draw):
    rows, seq = draw(st.integers(1, 3)), draw(st.integers(2, 5))
    ids = draw(st.lists(st.lists(st.integers(-2, VOCAB + 2), min_size=seq, max_size=seq), min_size=rows,
                        max_size=rows))
    labels = draw(st.lists(st.lists(st.sampled_from([-100, -100, -7, -1, 0, 3, VOCAB - 1, VOCAB, VOCAB + 5]),
                                    min_size=seq, max_size=seq), min_size=rows, max_size=rows))
    mask = draw(st.lists(st.lists(st.sampled_from([1.0, 1.0, 1.0, 0.0, float("nan"), 0.5, 2.0]), min_size=seq,
                                  max_size=seq), min_size=rows, max_size=rows))
    float_ids = draw(st.booleans()) and draw(st.booleans())
    batch = {"input_ids": torch.tensor(ids, dtype=torch.float32 if float_ids else torch.long),
             "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}
    # the outcome, decided independently of curvlens: which key (if any) is bad
    if float_ids:
        bad = "input_ids"
    elif any(not 0 <= i < VOCAB for r in ids for i in r):
        bad = "input_ids"
    elif any(lab != -100 and not 0 <= lab < VOCAB for r in labels for lab in r):
        bad = "labels"
    elif any(not (m in (0.0, 1.0)) for r in mask for m in r):
        bad = "attention_mask"
    else:
        bad = None
    return batch, bad


@settings(max_examples=25, deadline=None)
@given(case=batches())
def test_estimate_fisher_on_any_batch(lm, case):
    batch, bad = case
    if bad is None:
        f = estimate_fisher(lm, [batch], vectorize=True, **KW)
        g = estimate_fisher(lm, [batch], vectorize=False, **KW)
        for k in f.keys():
            assert torch.isfinite(f[k]).all() and (f[k] >= 0).all()
            assert torch.allclose(f[k], g[k], rtol=1e-4, atol=1e-10), k
    else:
        with pytest.raises(CurvlensError, match=rf"examples 0\.\.\d+: {bad}"):
            estimate_fisher(lm, [batch], **KW)


def test_a_negative_label_is_never_read_as_token_zero(lm):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(CurvlensError, match=r"labels hold -1; a label is -100 \(ignored\) or >= 0"):
        estimate_fisher(lm, [{"input_ids": ids, "labels": torch.tensor([[1, -1, 3]])}], **KW)


def test_the_models_own_failure_is_one_error_naming_the_examples():
    lin = torch.nn.Linear(2, 1)

    def picky(out, ex):  # a user's loss that indexes with the data, as a model's own code may
        return out[0, int(ex["labels"])]

    batch = {"input": torch.ones(2, 2), "labels": torch.tensor([0, 5])}  # example 1 picks an absent output
    with pytest.raises(CurvlensError, match=r"examples 0\.\.1: the model's forward or loss failed \((IndexError|"
                                            r"RuntimeError)"):
        estimate_fisher(lin, [batch], loss=picky, vectorize=False, **KW)


def test_a_callable_loss_sees_any_labels(lm):
    mse = lambda out, ex: (out.logits[0, -1, 0] - ex["labels"].float().sum()) ** 2  # noqa: E731
    f = estimate_fisher(lm, [{"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([-5.5])}], loss=mse, **KW)
    assert all(math.isfinite(float(f[k].sum())) for k in f.keys())
