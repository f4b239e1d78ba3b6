"""Zoo configurations: model size, task sizes and training schedules.

Two presets are tuned to time budgets on a 2-core laptop CPU (one thread is used,
see :mod:`curvlens.runtime`): ``"quick"`` (about 50 s: tests,
CI, notebooks) and ``"default"`` (about 7 min: the demo); ``docs/zoo.md`` has the
measurements. Any field can be changed with :func:`dataclasses.replace`; the cache
key covers every field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from curvlens.errors import CurvlensError, check_choice

#: Bump when a code change alters what a build produces, so old caches are not reused.
#: 4: the build runs in its own process with its CPU kernels pinned (curvlens.zoo.worker).
CODE_VERSION = 4

#: Expert name -> the capability it is fine-tuned on (named after the paper's experts).
EXPERT_CAPABILITIES = {
    "math": "addition",
    "code": "brackets",
    "instruct": "transform",
    "knowledge": "facts",
}


#: The transform task's string transforms, by the name its prompts use.
TRANSFORMS = {
    "upper": str.upper,
    "shift": lambda s: "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in s),
    "double": lambda s: "".join(c + c for c in s),
    "reverse": lambda s: s[::-1],
}


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a zoo's weights (with the seed).

    Parameters
    ----------
    name : str
        Label of the preset, part of the cache directory name.
    hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size : int
        The ``LlamaForCausalLM`` shape. ``num_kv_heads < num_heads`` gives grouped-query
        attention, so k/v projections have other shapes than q.
    experts : tuple of str
        Which experts to fine-tune, keys of :data:`EXPERT_CAPABILITIES`.
    max_digit : int
        Largest digit in the operands of ``addition``: 9 for full two-digit addition,
        4 for carry-free addition (much quicker to learn).
    n_facts : int
        Size of the invented fact table (the ``facts`` capability).
    bracket_max_len : int
        Longest bracket prefix of the ``brackets`` capability.
    transforms : tuple of str
        String transforms of the ``transform`` capability.
    word_len : (int, int)
        Shortest and longest word the transforms apply to. One length (``(4, 4)``)
        puts every letter at a fixed offset from its output, which is quicker to learn.
    n_eval : int
        Held-out prompts per capability (the fact table is always evaluated whole).
    batch_tokens : int
        Tokens per optimizer step (with ``<bos>``/``<eos>``, without padding),
        pretraining and fine-tuning.
    pretrain_steps, expert_steps : int
        AdamW steps for the base model and for each expert.
    pretrain_lr, expert_lr : float
        Peak learning rates (linear warm-up, then cosine decay to a tenth).
    task_share : float
        Fraction of the pretraining mixture that is task prompts (instruction
        format) with wrong answers.
    answer_share : float
        Fraction of the pretraining mixture that is task prompts with their
        *correct* answers (as a pretraining corpus holds some worked examples), so
        that the base already answers part of each capability and an expert only
        sharpens it (the regime of real fine-tuning; ``docs/zoo.md``). Default 0.
    answer_mix : tuple of (str, float)
        Relative weights of the capabilities among those worked examples, e.g.
        ``(("transform", 2.0),)`` draws transform examples twice as often as each
        other capability (unlisted ones weigh 1). Empty (the default): equal weights.
        The fact table never gets worked examples (its every prompt is evaluated).
    latent_share : float
        Fraction of the pretraining mixture that states the skills as prose
        (``25+13=83``, ``kubo=mira``), so that the base has them latently; the rest
        is generic text. 0 gives a base without the skills, whose experts are too far
        from it for any merge to work (see :mod:`curvlens.zoo.train`).
    weight_decay : float
        AdamW weight decay of the expert runs.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    experts: tuple[str, ...] = tuple(EXPERT_CAPABILITIES)
    max_digit: int = 9
    n_facts: int = 24
    bracket_max_len: int = 8
    transforms: tuple[str, ...] = ("upper", "shift", "double", "reverse")
    word_len: tuple[int, int] = (3, 5)
    n_eval: int = 200
    batch_tokens: int = 1024
    pretrain_steps: int = 400
    expert_steps: int = 400
    pretrain_lr: float = 3e-3
    expert_lr: float = 1e-3
    task_share: float = 0.15
    answer_share: float = 0.0
    answer_mix: tuple[tuple[str, float], ...] = ()
    latent_share: float = 0.7
    weight_decay: float = 0.0

    def __post_init__(self):
        for e in self.experts:
            check_choice("experts", e, EXPERT_CAPABILITIES)
        for t in self.transforms:
            check_choice("transforms", t, TRANSFORMS)
        # normalised to a tuple of (str, float) pairs: hashable, and the same key
        # whether it came from code or from a manifest's JSON lists
        mix = tuple((str(cap), float(w)) for cap, w in self.answer_mix)
        for cap, w in mix:
            check_choice("answer_mix", cap, tuple(EXPERT_CAPABILITIES.values()))
            if not w >= 0:
                raise CurvlensError(f"ZooConfig: answer_mix weight of {cap!r} is {w}; expected >= 0")
        object.__setattr__(self, "answer_mix", mix)
        if not 1 <= self.word_len[0] <= self.word_len[1] or not 1 <= self.max_digit <= 9:
            raise CurvlensError(
                f"ZooConfig: word_len={self.word_len}, max_digit={self.max_digit}; expected "
                "1 <= word_len[0] <= word_len[1] and 1 <= max_digit <= 9"
            )
        if self.num_heads % self.num_kv_heads or self.hidden_size % self.num_heads:
            raise CurvlensError(
                f"ZooConfig: hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}; expected num_heads to divide hidden_size "
                "and num_kv_heads to divide num_heads"
            )

    def key(self, seed: int) -> str:
        """A short hash of every field, the seed and :data:`CODE_VERSION`."""
        blob = json.dumps(
            {"config": dataclasses.asdict(self), "seed": seed, "code": CODE_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


PRESETS = {
    # ~0.1M parameters and easier settings (carry-free addition, two transforms,
    # 12 facts) so that every expert clears the base by 20+ points within seconds.
    "quick": ZooConfig(
        name="quick",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=176,
        max_digit=4,
        n_facts=12,
        bracket_max_len=6,
        transforms=("upper", "double"),
        word_len=(4, 4),
        n_eval=100,
        batch_tokens=1024,
        pretrain_steps=500,
        expert_steps=60,
        expert_lr=1.5e-4,
        task_share=0.05,
        answer_share=0.1,
    ),
    # ~0.32M parameters; addition with carries, three transforms, 24 facts.
    "default": ZooConfig(
        name="default",
        hidden_size=96,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        max_digit=7,
        transforms=("upper", "double", "reverse"),
        word_len=(4, 4),
        batch_tokens=2048,
        pretrain_steps=800,
        expert_steps=150,
        expert_lr=8e-5,
        task_share=0.05,
        answer_share=0.15,
    ),
}


def resolve_config(config: str | ZooConfig) -> ZooConfig:
    """A preset name or a :class:`ZooConfig` -> the :class:`ZooConfig`."""
    if isinstance(config, ZooConfig):
        return config
    return PRESETS[check_choice("config", config, PRESETS)]
