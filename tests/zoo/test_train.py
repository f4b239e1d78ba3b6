import pytest
import torch

from curvlens import CurvlensError
from curvlens.zoo import PRESETS
from curvlens.zoo.tokenizer import make_tokenizer
from curvlens.zoo.train import IGNORE, encode, lr_factor, make_model, take_batch

TOK = make_tokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id


def ids_of(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_sft_items_score_only_the_answer_and_eos():
    batch = encode(TOK, [("add 01+02:", "3", False), ("fact kubo:", "mira", False)])
    ids, labels = batch["input_ids"], batch["labels"]
    assert set(batch) == {"input_ids", "labels"}
    assert ids[0].tolist() == [BOS, *ids_of("add 01+02:3"), EOS, PAD, PAD, PAD]
    assert labels[0].tolist() == [IGNORE] * 11 + [*ids_of("3"), EOS] + [IGNORE] * 3
    assert labels[1].tolist() == [IGNORE] * 11 + [*ids_of("mira"), EOS]


def test_packed_rows_hold_several_items_and_never_score_bos():
    items = [("ab", "", True), ("cd", "", True), ("efg", "", True)]
    batch = encode(TOK, items, pack_width=9)
    ids, labels = batch["input_ids"], batch["labels"]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 0, 0]]
    assert ids.tolist() == [[BOS, *ids_of("ab"), EOS, BOS, *ids_of("cd"), EOS],
                            [BOS, *ids_of("efg"), EOS, PAD, PAD, PAD]]
    scored = ids.clone()
    scored[(ids == BOS) | (ids == PAD)] = IGNORE
    assert torch.equal(labels, scored)


def test_packed_items_see_only_themselves():
    # Same logits and loss as one item per row: packing changes the cost, not the maths.
    model = make_model(PRESETS["quick"], TOK, seed=0)
    items = [("add 01+02:", "3", True), ("fact kubo:", "mira", True), ("close ([:", "])", True),
             ("upper abcd:", "ABCD", True)]
    packed, single = encode(TOK, items, pack_width=40), encode(TOK, items)
    assert packed["input_ids"].shape[0] == 2
    with torch.no_grad():
        out_packed, out_single = model(**packed), model(**single)
    torch.testing.assert_close(out_packed.loss, out_single.loss)
    keep = packed["input_ids"] != PAD
    torch.testing.assert_close(out_packed.logits[keep], out_single.logits[single["input_ids"] != PAD],
                               atol=1e-5, rtol=1e-5)


def test_batches_are_sized_in_tokens():
    items = iter([("x" * 8, "y", False)] * 100)
    batch = take_batch(lambda: next(items), 50)
    assert len(batch) == 5  # 11 tokens each with <bos>/<eos>: 5 reach 50


def test_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_factor(0, 100) == pytest.approx(0.2)  # 5 warm-up steps
    assert lr_factor(4, 100) == pytest.approx(1.0)
    assert lr_factor(99, 100) == pytest.approx(0.1, abs=1e-3)
    values = [lr_factor(s, 100) for s in range(5, 100)]
    assert values == sorted(values, reverse=True)


def test_model_is_seeded_without_touching_the_callers_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = make_model(PRESETS["quick"], TOK, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = make_model(PRESETS["quick"], TOK, seed=0)
    c = make_model(PRESETS["quick"], TOK, seed=1)
    wa, wb, wc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["lm_head.weight"], wc["lm_head.weight"])
    assert a.config.num_key_value_heads < a.config.num_attention_heads
    assert not a.config.tie_word_embeddings


def test_worked_examples_in_the_base_mixture_are_correct_and_never_of_the_fact_table():
    import dataclasses
    import random

    from curvlens.zoo.build import held_out_prompts
    from curvlens.zoo.tasks import make_tasks
    from curvlens.zoo.train import pretraining_item

    base = dataclasses.replace(PRESETS["quick"], answer_share=0.0)
    tasks = make_tasks(base, 0)
    avoid = frozenset().union(*(held_out_prompts(t, base, 0) for t in tasks.values()))
    facts = {ex.prompt: ex.answer for ex in tasks["facts"].fixed_examples()}

    def mixture(config, n=4000):
        rng = random.Random(1)
        return [pretraining_item(list(tasks.values()), config, rng, avoid) for _ in range(n)]

    def right_sums(items):  # "add 07+45:" -> "25" (52 reversed) when the answer is right
        out = 0
        for prompt, answer, _ in items:
            if prompt.startswith("add "):
                a, b = prompt[4:-1].split("+")
                out += answer == str(int(a) + int(b))[::-1]
        return out

    plain = mixture(base)
    worked = mixture(dataclasses.replace(base, answer_share=0.2))
    assert right_sums(plain) < 0.01 * len(plain) < right_sums(worked)
    assert not any(p in avoid for p, _, _ in worked)  # never an evaluation prompt
    # the fact table is evaluated whole: its items keep their wrong answers
    fact_items = [(p, a) for p, a, _ in worked if p in facts]
    assert fact_items and sum(facts[p] == a for p, a in fact_items) < 0.05 * len(fact_items)


def test_answer_mix_weights_the_worked_examples_per_capability():
    import dataclasses
    import random

    from curvlens.zoo.tasks import TRANSFORMS, make_tasks
    from curvlens.zoo.train import pretraining_item

    config = dataclasses.replace(PRESETS["quick"], answer_share=0.3)
    tasks = make_tasks(config, 0)

    def right(prompt, answer):  # which capability's correct answer this item is, if any
        head, _, body = prompt[:-1].partition(" ")
        if head == "add":
            a, b = body.split("+")
            return "addition" if answer == str(int(a) + int(b))[::-1] else None
        if head in TRANSFORMS:
            return "transform" if answer == TRANSFORMS[head](body) else None
        return None

    def worked(mix, n=3000):
        rng = random.Random(2)
        mixed = dataclasses.replace(config, answer_mix=mix)
        items = [pretraining_item(list(tasks.values()), mixed, rng, frozenset()) for _ in range(n)]
        kinds = [right(p, a) for p, a, _ in items]
        return {cap: kinds.count(cap) for cap in ("addition", "transform")}

    equal = worked(())
    assert min(equal.values()) > 0.5 * max(equal.values()), equal
    heavy = worked((("transform", 3.0),))
    assert heavy["transform"] > 2 * heavy["addition"], heavy
    assert worked((("transform", 0.0),))["transform"] == 0
    with pytest.raises(CurvlensError, match="answer_mix"):
        dataclasses.replace(config, answer_mix=(("facts_x", 1.0),))
    with pytest.raises(CurvlensError, match=">= 0"):
        dataclasses.replace(config, answer_mix=(("transform", -1.0),))
    # a manifest's JSON lists give the same, hashable config and key
    listed = dataclasses.replace(config, answer_mix=[["transform", 3]])
    assert listed.answer_mix == (("transform", 3.0),) and hash(listed)
    assert listed.key(0) == dataclasses.replace(config, answer_mix=(("transform", 3.0),)).key(0)
