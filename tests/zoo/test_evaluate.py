import pytest
import torch
from safetensors.torch import load_file

from curvlens import Checkpoint, CurvlensError
from curvlens.zoo import evaluate
from curvlens.zoo.evaluate import eval_sets, greedy_answers, load_model, score


@pytest.fixture(scope="module")
def sets(quick_zoo):
    return eval_sets(quick_zoo.config, quick_zoo.seed)


def test_scorer_with_a_perfect_and_a_wrong_oracle(sets):
    answers = {ex.prompt: ex.answer for examples in sets.values() for ex in examples}
    perfect = score(lambda prompts: [answers[p] for p in prompts], sets)
    assert list(perfect.columns) == ["capability", "accuracy", "n", "correct"]
    assert list(perfect.capability) == ["addition", "brackets", "transform", "facts"]
    assert (perfect.accuracy == 1.0).all()
    assert list(perfect.n) == [len(v) for v in sets.values()]
    # one result per prompt, in the set's order: what a bootstrap over items resamples
    assert [len(c) for c in perfect.correct] == list(perfect.n) and set("".join(perfect.correct)) == {"T"}
    first_wrong = score(lambda prompts: ["?"] + [answers[p] for p in prompts[1:]], sets)
    assert all(c.startswith("F") and set(c[1:]) == {"T"} for c in first_wrong.correct)
    assert (first_wrong.accuracy == (first_wrong.n - 1) / first_wrong.n).all()
    # right answer plus one character, or minus its last: exact match only
    too_long = score(lambda prompts: [answers[p] + "x" for p in prompts], sets)
    too_short = score(lambda prompts: [answers[p][:-1] for p in prompts], sets)
    assert (too_long.accuracy == 0.0).all() and (too_short.accuracy == 0.0).all()


def test_scorer_rejects_a_wrong_number_of_answers(sets):
    with pytest.raises(CurvlensError, match="one answer per prompt"):
        score(lambda prompts: prompts[:-1], sets)


def test_a_real_model_that_cannot_answer_scores_zero(quick_zoo):
    # All-equal logits: greedy decoding writes the same token forever, never <eos>.
    state = load_file(str(quick_zoo.base_dir / "model.safetensors"))
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    df = evaluate(state, zoo=quick_zoo)
    assert list(df.columns) == ["capability", "accuracy", "n", "correct"]
    assert (df.accuracy == 0.0).all() and (df.n > 0).all()


def test_a_real_model_that_knows_the_table_scores_one(quick_zoo):
    df = evaluate(quick_zoo.expert_dirs["knowledge"], ["facts"], zoo=quick_zoo)
    assert df.accuracy.item() == 1.0 and df.n.item() == quick_zoo.config.n_facts


def test_dir_checkpoint_and_state_dict_give_the_same_scores(quick_zoo):
    d = quick_zoo.expert_dirs["code"]
    by_dir = evaluate(d, zoo=quick_zoo)
    by_checkpoint = evaluate(Checkpoint.open(d), zoo=quick_zoo)
    by_state = evaluate(load_file(str(d / "model.safetensors")), zoo=quick_zoo)
    assert by_dir.equals(by_checkpoint) and by_dir.equals(by_state)
    assert by_dir.set_index("capability").accuracy["brackets"] >= 0.5


def test_answers_do_not_depend_on_batching(quick_zoo, sets):
    model, tok = load_model(quick_zoo.expert_dirs["instruct"], None)
    prompts = [ex.prompt for ex in sets["brackets"]][:30]  # several prompt lengths
    assert greedy_answers(model, tok, prompts, max_new_tokens=9, batch_size=4) == \
        greedy_answers(model, tok, prompts, max_new_tokens=9, batch_size=256)


def test_zoo_default_is_the_cached_quick_zoo_seed_0(quick_zoo, monkeypatch):
    monkeypatch.setenv("CURVLENS_CACHE", str(quick_zoo.root.parent))
    state = load_file(str(quick_zoo.expert_dirs["math"] / "model.safetensors"))
    assert evaluate(state, ["addition"]).equals(evaluate(state, ["addition"], zoo=quick_zoo))
    assert quick_zoo.evaluate(state, ["addition"]).equals(evaluate(state, ["addition"], zoo=quick_zoo))


def test_bad_inputs(quick_zoo, tmp_path):
    with pytest.raises(CurvlensError, match="capabilities='poetry'.*'addition'"):
        evaluate(quick_zoo.base_dir, ["poetry"], zoo=quick_zoo)
    with pytest.raises(CurvlensError, match="not a directory"):
        evaluate(tmp_path / "nope", zoo=quick_zoo)
    with pytest.raises(CurvlensError, match="missing.*lm_head.weight"):
        evaluate({"model.norm.weight": torch.ones(4)}, zoo=quick_zoo)
    with pytest.raises(CurvlensError, match="expected an HF model dir"):
        evaluate(42, zoo=quick_zoo)


def test_zoo_score_stores_reference_scores_once(quick_zoo, monkeypatch):
    """zoo.score gives one merge table; the base's and experts' rows are evaluated
    once and stored with the zoo, not re-evaluated per call."""
    from curvlens import merge
    from curvlens.zoo import Zoo

    avg = merge(quick_zoo.experts(), "linear", device="cpu", progress=False)
    table = quick_zoo.score({"average": avg}, device="cpu")
    assert list(table.columns) == ["model", "method", "capability", "accuracy", "n", "correct"]
    labels = list(dict.fromkeys(table.model))
    assert labels == ["base", *[f"expert: {n}" for n in quick_zoo.expert_dirs], "average"]
    assert set(table[table.model == "average"].method) == {"linear"}
    assert list(quick_zoo.root.glob("scores-cpu-*.csv"))
    calls = []
    real = Zoo._rows
    monkeypatch.setattr(Zoo, "_rows", lambda self, models, device: calls.append(list(models)) or
                        real(self, models, device))
    again = quick_zoo.score({"average": avg}, device="cpu")
    assert calls == [["average"]]  # the reference rows came from the store
    assert again.equals(table)


def test_zoo_evaluator_is_picklable_and_scores_like_evaluate(quick_zoo):
    import pickle

    from curvlens.zoo import ZooEvaluator

    ev = pickle.loads(pickle.dumps(quick_zoo.evaluator(["addition", "facts"])))
    assert isinstance(ev, ZooEvaluator) and ev.root == str(quick_zoo.root)
    d = quick_zoo.expert_dirs["knowledge"]
    got = ev(str(d))
    want = quick_zoo.evaluate(d, ["addition", "facts"], device="cpu")
    assert got == dict(zip(want["capability"], want["accuracy"]))
