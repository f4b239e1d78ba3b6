import pytest

from curvlens import CurvlensError
from curvlens.tensor_filter import TensorFilter, matches, tensor_actions

NAMES = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
         "bert.encoder.layer.1.attention.self.query.weight", "bert.pooler.dense.weight",
         "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("pattern, want", [
    ("classifier", ["classifier.weight", "classifier.bias"]),  # mergekit filter: a substring
    ("*.pooler.*", ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]),
    ("*layer.1.*", ["bert.encoder.layer.1.attention.self.query.weight"]),
    ("role:q", ["bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.1.attention.self.query.weight"]),
    ("name:classifier.bias", ["classifier.bias"]),
    ("name:classifier", []),  # exact, never a substring
])
def test_pattern_forms(pattern, want):
    assert [n for n in NAMES if matches(pattern, n)] == want
    assert TensorFilter.of(pattern).select(NAMES) == want


@pytest.mark.parametrize("bad", ["", "  ", "role:head", "name:", 3, None])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(CurvlensError):
        TensorFilter.of([bad])


def test_union_unused_and_exact():
    f = TensorFilter.of("classifier") | TensorFilter.exact(["bert.pooler.dense.bias"])
    assert f.select(NAMES) == ["bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    assert TensorFilter.of(["classifier", "lm_head"]).unused(NAMES) == ["lm_head"]
    assert not TensorFilter.of(None) and not TensorFilter.not_merged([("classifier", "merge")])


def test_actions_first_match_wins_and_are_checked():
    acts = tensor_actions([("classifier.bias", "base"), ("classifier", "drop"), ("role:embed", "a")],
                          NAMES, ["base", "a"])
    assert acts["classifier.bias"] == "base" and acts["classifier.weight"] == "drop"
    assert acts["bert.embeddings.word_embeddings.weight"] == "a"
    assert acts["bert.pooler.dense.weight"] == "merge"
    with pytest.raises(CurvlensError, match="must be 'merge', 'drop' or a model"):
        tensor_actions({"classifier": "b"}, NAMES, ["base", "a"])
    with pytest.raises(CurvlensError, match="match no tensor"):
        tensor_actions({"lm_head": "drop"}, NAMES, ["base", "a"])
    with pytest.raises(CurvlensError, match="each rule is"):
        tensor_actions(["classifier"], NAMES, ["base"])
