"""The zoo's capabilities: prompt/answer generators small enough for a tiny model.

Each capability mirrors one of the paper's experts and is sized so that a model of
a few hundred thousand parameters learns it within minutes on a laptop CPU:

``addition`` (math expert)
    ``"add 07+45:"`` -> ``"25"``: two zero-padded two-digit numbers, the sum written
    least-significant digit first (52 -> ``"25"``; 128 -> ``"821"``). Reversed, each
    answer digit depends only on the two digits at a fixed offset and the carry just
    produced; written most-significant first, the first digit needs the carry from
    the end of the number, and a tiny model trained for minutes does not get there.
    Zero padding keeps every digit at a fixed position. ``max_digit`` bounds the
    operand digits: with digits up to 9 a small model sits on a long plateau (a
    digit of ``(a + b) mod 10`` says nothing about ``a`` alone), with digits up to 7
    about a quarter of the columns carry and it learns steadily; up to 4 nothing
    carries (the quick zoo).
``brackets`` (code expert)
    ``"close ([]{<:"`` -> ``">})"``: a prefix of a bracket program (some pairs already
    closed) and the exact closing sequence it needs: a stack, as in code completion.
``transform`` (precise instruction-following expert)
    ``"upper abcd:"`` -> ``"ABCD"``: apply the named string transform exactly
    (``upper``, ``shift`` = each letter to the next in the alphabet, ``double`` =
    each letter twice, ``reverse``). The instruction, not the input, decides the
    output, as in IFEval-style prompts.
``facts`` (knowledge-recall expert)
    ``"fact kubo:"`` -> ``"mira"``: a fixed table of invented facts, drawn from the
    seed. Recall cannot be tested on held-out facts, so its evaluation *is* the
    table; every other capability is evaluated on prompts the expert never saw.

Every prompt ends with ``":"`` and every answer is non-empty and followed by
``<eos>``. Two more views of each task feed the base model's pretraining
(:mod:`curvlens.zoo.train`): :meth:`Task.statement` writes an example as
"pretraining prose" without the instruction (``25+13=83``, ``([]<>)``,
``upper(abcd)=ABCD``, ``kubo=mira``), so the base has the skill latently, and
:meth:`Task.wrong_answer` gives an answer of the right form that is almost never
correct, so the base knows each instruction format but answers it wrongly.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from curvlens.zoo.config import EXPERT_CAPABILITIES, TRANSFORMS, ZooConfig

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
OPENERS, CLOSERS = "([{<", ")]}>"
CLOSE = dict(zip(OPENERS, CLOSERS))


class Example(NamedTuple):
    """One prompt and the exact answer expected after it."""

    prompt: str
    answer: str


def pseudo_word(rng: random.Random, min_len: int = 3, max_len: int = 5) -> str:
    """A pronounceable made-up word (consonant/vowel alternation), e.g. ``"kubo"``."""
    n = rng.randint(min_len, max_len)
    first = rng.random() < 0.5
    return "".join(
        rng.choice(CONSONANTS if (i % 2 == 0) == first else VOWELS) for i in range(n)
    )


def random_letters(rng: random.Random, n: int, letters: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(letters) for _ in range(n))


@dataclass(frozen=True)
class Task:
    """A capability: samples examples, states them as prose, gives wrong answers.

    Subclasses set :attr:`capability` and implement :meth:`sample`,
    :meth:`wrong_answer` and :meth:`statement`; a task with a closed set of
    examples (the fact table) returns it from :meth:`fixed_examples`.
    """

    capability: ClassVar[str]

    def sample(self, rng: random.Random) -> Example:
        """A random example."""
        raise NotImplementedError

    def wrong_answer(self, rng: random.Random, example: Example) -> str:
        """An answer of the right form for ``example``, almost never the right one."""
        raise NotImplementedError

    def statement(self, example: Example) -> str:
        """``example`` as pretraining prose: its content without the instruction format."""
        raise NotImplementedError

    def fixed_examples(self) -> tuple[Example, ...] | None:
        """The complete example set, for tasks that have one; else None."""
        return None


@dataclass(frozen=True)
class Addition(Task):
    """Two-digit addition, answer reversed (see the module docstring for why)."""

    capability: ClassVar[str] = "addition"
    max_digit: int = 9

    def sample(self, rng: random.Random) -> Example:
        a, b = (10 * rng.randint(0, self.max_digit) + rng.randint(0, self.max_digit) for _ in "ab")
        return Example(f"add {a:02d}+{b:02d}:", str(a + b)[::-1])

    def wrong_answer(self, rng: random.Random, example: Example) -> str:
        return str(rng.randrange(10, 199))[::-1]

    def statement(self, example: Example) -> str:
        return f"{example.prompt[4:-1]}={example.answer}"


@dataclass(frozen=True)
class Brackets(Task):
    """Close an unfinished bracket sequence; ``max_len`` bounds the prefix length."""

    capability: ClassVar[str] = "brackets"
    max_len: int = 8

    def sample(self, rng: random.Random) -> Example:
        n = rng.randint(1, self.max_len)
        prefix, stack = [], []
        for i in range(n):
            # Close a pair sometimes, but leave at least one bracket open at the end.
            if stack and i < n - 1 and rng.random() < 0.35:
                prefix.append(CLOSE[stack.pop()])
            else:
                stack.append(rng.choice(OPENERS))
                prefix.append(stack[-1])
        closing = "".join(CLOSE[c] for c in reversed(stack))
        return Example(f"close {''.join(prefix)}:", closing)

    def wrong_answer(self, rng: random.Random, example: Example) -> str:
        return "".join(rng.choice(CLOSERS) for _ in range(rng.randint(1, self.max_len)))

    def statement(self, example: Example) -> str:
        return example.prompt[6:-1] + example.answer




@dataclass(frozen=True)
class Transform(Task):
    """Apply a named string transform (one of ``transforms``) to a short word."""

    capability: ClassVar[str] = "transform"
    transforms: tuple[str, ...] = ("upper", "shift", "double", "reverse")
    min_len: int = 3
    max_len: int = 5

    def sample(self, rng: random.Random) -> Example:
        name = rng.choice(self.transforms)
        word = random_letters(rng, rng.randint(self.min_len, self.max_len))
        return Example(f"{name} {word}:", TRANSFORMS[name](word))

    def wrong_answer(self, rng: random.Random, example: Example) -> str:
        letters = string.ascii_uppercase if example.prompt.startswith("upper") else string.ascii_lowercase
        return random_letters(rng, len(example.answer), letters)

    def statement(self, example: Example) -> str:
        name, word = example.prompt[:-1].split(" ")
        return f"{name}({word})={example.answer}"


@dataclass(frozen=True)
class Facts(Task):
    """Recall a fixed table of invented facts (key word -> value word)."""

    capability: ClassVar[str] = "facts"
    table: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_seed(cls, n_facts: int, seed: int) -> "Facts":
        rng = random.Random(f"facts-{seed}")
        keys: dict[str, None] = {}
        while len(keys) < n_facts:
            keys[pseudo_word(rng, 4, 4)] = None
        return cls(tuple((k, pseudo_word(rng, 3, 4)) for k in keys))

    def sample(self, rng: random.Random) -> Example:
        return self.fixed_examples()[rng.randrange(len(self.table))]

    def wrong_answer(self, rng: random.Random, example: Example) -> str:
        return pseudo_word(rng, 3, 4)

    def statement(self, example: Example) -> str:
        return f"{example.prompt[5:-1]}={example.answer}"

    def fixed_examples(self) -> tuple[Example, ...]:
        return tuple(Example(f"fact {k}:", v) for k, v in self.table)


def generic_text(rng: random.Random, max_chars: int = 24) -> str:
    """A line of "generic text": made-up words with some numbers and brackets.

    Part of the pretraining mixture so that the base model knows the character set
    and some structure (word shapes, repeated words to copy, matched brackets)
    without having seen any task answer.
    """
    words: list[str] = []
    while True:
        r = rng.random()
        if r < 0.12:
            w = str(rng.randrange(1000))
        elif r < 0.2 and words:
            w = rng.choice(words)  # repeats teach copying, a skill every task reuses
        elif r < 0.28:
            o = rng.randrange(4)
            w = OPENERS[o] + pseudo_word(rng) + CLOSERS[o]
        else:
            w = pseudo_word(rng)
        if sum(map(len, words)) + len(words) + len(w) > max_chars:
            break
        words.append(w)
    return " ".join(words) + "."


def eval_examples(task: Task, n: int, seed: int) -> tuple[Example, ...]:
    """The held-out evaluation set of ``task``: ``n`` distinct prompts fixed by ``seed``.

    For a task with a closed example set (the fact table) the set itself is returned
    and ``n`` is ignored.

    Examples
    --------
    >>> ev = eval_examples(Addition(), 3, seed=0)
    >>> len(ev), ev == eval_examples(Addition(), 3, seed=0)
    (3, True)
    """
    fixed = task.fixed_examples()
    if fixed is not None:
        return fixed
    rng = random.Random(f"eval-{task.capability}-{seed}")
    seen: dict[str, Example] = {}
    while len(seen) < n:
        ex = task.sample(rng)
        seen.setdefault(ex.prompt, ex)
    return tuple(seen.values())


def make_tasks(config: ZooConfig, seed: int) -> dict[str, Task]:
    """Capability -> task, for the experts of ``config`` (the fact table depends on ``seed``).

    Examples
    --------
    >>> from curvlens.zoo.config import PRESETS
    >>> list(make_tasks(PRESETS["quick"], seed=0))
    ['addition', 'brackets', 'transform', 'facts']
    """
    factories = {
        "addition": lambda: Addition(config.max_digit),
        "brackets": lambda: Brackets(config.bracket_max_len),
        "transform": lambda: Transform(config.transforms, *config.word_len),
        "facts": lambda: Facts.from_seed(config.n_facts, seed),
    }
    return {
        EXPERT_CAPABILITIES[e]: factories[EXPERT_CAPABILITIES[e]]() for e in config.experts
    }
