import random

import pytest

from curvlens import CurvlensError
from curvlens.zoo.build import held_out_prompts
from curvlens.zoo.config import PRESETS, ZooConfig
from curvlens.zoo.tasks import (
    Addition, Brackets, Example, Facts, Transform, eval_examples, generic_text, make_tasks,
)
from curvlens.zoo.tokenizer import ALPHABET, make_tokenizer
from curvlens.zoo.train import expert_item

CONFIGS = list(PRESETS.values())


def all_task_strings(config, seed=0, n=300):
    """Eval examples, training samples and wrong answers of every task, plus generic text."""
    rng = random.Random(1)
    out = []
    for task in make_tasks(config, seed).values():
        for ex in eval_examples(task, config.n_eval, seed) + tuple(task.sample(rng) for _ in range(n)):
            out += [ex.prompt, ex.answer, task.wrong_answer(rng, ex)]
    return out + [generic_text(rng) for _ in range(n)]


@pytest.mark.parametrize("prompt, answer", [
    ("add 27+87:", "411"), ("add 07+02:", "9"), ("add 99+99:", "891"), ("add 00+00:", "0"),
])
def test_addition_answer_is_the_sum_reversed(prompt, answer):
    a, b = int(prompt[4:6]), int(prompt[7:9])
    assert str(a + b)[::-1] == answer
    rng = random.Random(0)
    for _ in range(200):
        ex = Addition().sample(rng)
        a, b = int(ex.prompt[4:6]), int(ex.prompt[7:9])
        assert ex.answer == str(a + b)[::-1]


def test_carry_free_addition_never_carries():
    rng = random.Random(0)
    for _ in range(200):
        ex = Addition(max_digit=4).sample(rng)
        digits = [int(c) for c in ex.prompt[4:6] + ex.prompt[7:9]]
        assert max(digits) <= 4 and len(ex.answer) <= 2


def test_brackets_closes_the_open_stack():
    rng = random.Random(0)
    pairs = dict(zip("([{<", ")]}>"))
    for _ in range(300):
        ex = Brackets(max_len=8).sample(rng)
        body = ex.prompt[len("close "):-1]
        assert 1 <= len(body) <= 8 and ex.answer
        stack = []
        for c in body + ex.answer:  # prefix + answer must be exactly balanced
            if c in pairs:
                stack.append(c)
            else:
                assert stack and pairs[stack.pop()] == c
        assert not stack


def test_transforms_apply_exactly():
    task = Transform(("upper", "shift", "double", "reverse"), 3, 5)
    expected = {"upper": "ABYZ", "shift": "bcza", "double": "aabbyyzz", "reverse": "zyba"}
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        ex = task.sample(rng)
        name, word = ex.prompt[:-1].split(" ")
        seen.add(name)
        assert 3 <= len(word) <= 5
    assert seen == set(expected)
    from curvlens.zoo.tasks import TRANSFORMS
    assert {k: f("abyz") for k, f in TRANSFORMS.items()} == expected


def test_unknown_transform_is_rejected():
    with pytest.raises(CurvlensError, match="transforms"):
        ZooConfig(name="x", hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                  intermediate_size=8, transforms=("upper", "rot13"))


def test_fact_table_is_fixed_by_the_seed_and_is_the_eval_set():
    a, b, c = Facts.from_seed(24, 0), Facts.from_seed(24, 0), Facts.from_seed(24, 1)
    assert a == b and a != c
    assert len({k for k, _ in a.table}) == 24
    assert eval_examples(a, 5, seed=0) == a.fixed_examples()  # n ignored: the whole table


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_eval_sets_are_fixed_distinct_and_held_out_of_training(config):
    for cap, task in make_tasks(config, seed=0).items():
        ev = eval_examples(task, config.n_eval, seed=0)
        assert ev == eval_examples(task, config.n_eval, seed=0)
        assert len({ex.prompt for ex in ev}) == len(ev)
        assert all(ex.prompt.endswith(":") and ex.answer for ex in ev)
        held = held_out_prompts(task, config, seed=0)
        if task.fixed_examples() is None:
            assert len(ev) == config.n_eval and held == {ex.prompt for ex in ev}
            rng = random.Random(0)
            assert not any(expert_item(task, rng, held)[0] in held for _ in range(500))
        else:
            assert held == frozenset()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_wrong_answers_have_the_right_form_but_are_rarely_right(config):
    rng = random.Random(0)
    for cap, task in make_tasks(config, seed=0).items():
        examples = [task.sample(rng) for _ in range(300)]
        right = sum(task.wrong_answer(rng, ex) == ex.answer for ex in examples)
        assert right / len(examples) < 0.1, cap


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_tokenizer_round_trips_every_task_string(config):
    tok = make_tokenizer()
    for text in all_task_strings(config):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.unk_token_id not in ids  # one token per character
        assert tok.decode(ids) == text
    assert set("".join(all_task_strings(config))) <= set(ALPHABET)


def test_example_is_a_named_pair():
    assert Example("add 01+02:", "3").answer == "3"
