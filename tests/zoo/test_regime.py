"""The quick zoo is in the regime of real fine-tuning (issue 14's targets).

Real SFT experts are small edits of a strong base: ``||theta_i - theta_0|| / ||theta_0||``
is about 0.01 for all-MiniLM-L6-v2 Trainer experts (``tests/real``) and the
paper's Llama-3.1-8B experts, and each expert still masters its capability. The
zoo is built to sit there too; these tests pin it, so a change to the zoo's design
that slides it back into the large-edit regime (where every merge fails) fails here.
"""
import pytest

import curvlens as cl
from curvlens.studies.regime import regime_verdict
from curvlens.zoo import evaluate

MAX_RELATIVE_EDIT = 0.03
MIN_OWN_SCORE = 0.8


@pytest.fixture(scope="module")
def norms(quick_zoo):
    return cl.edit_norms(quick_zoo.experts(), progress=False)


@pytest.fixture(scope="module")
def edits(norms):
    return cl.relative_edit(norms).set_index("expert")["relative_edit"]


def test_every_expert_is_a_small_edit_of_the_base(edits, quick_zoo):
    assert sorted(edits.index) == sorted(quick_zoo.expert_dirs)
    assert (edits > 0).all(), edits.to_dict()
    assert (edits <= MAX_RELATIVE_EDIT).all(), edits.to_dict()


def test_every_expert_masters_its_own_capability(quick_zoo):
    scores = {
        name: evaluate(quick_zoo.expert_dirs[name], [cap], zoo=quick_zoo)["accuracy"].item()
        for name, cap in quick_zoo.capabilities.items()
    }
    assert min(scores.values()) >= MIN_OWN_SCORE, scores


def test_regime_verdict_names_the_small_edit_regime(norms):
    verdict = regime_verdict(cl.regime_table(norms))
    assert verdict.startswith("small edits"), verdict
