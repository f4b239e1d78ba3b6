"""The chat templates curvlens carries render as mergekit 0.1.5's of the same name.

Rendered the way transformers renders a tokenizer's template (its sandboxed
environment with ``trim_blocks`` and ``lstrip_blocks``). Without mergekit the
expected texts below (what mergekit's templates render for them) are checked;
with it, every template is compared with mergekit's on a broad sample of
conversations: well-formed and not, with and without a generation prompt, BOS
given or None, errors included.
"""
import random

import pytest

from curvlens import CurvlensError
from curvlens.config.chat_template import SHIPPED_TEMPLATES, chat_template_text, shipped_template

chat_utils = pytest.importorskip("transformers.utils.chat_template_utils",
                                 reason="transformers (the zoo extra) renders chat templates")


def render(template, messages, gen=False, bos="<s>", eos="</s>"):
    """The text, or the error's type name where rendering raises."""
    try:
        return chat_utils._compile_jinja_template(template).render(
            messages=messages, add_generation_prompt=gen, bos_token=bos, eos_token=eos)
    except Exception as err:  # the template's own refusals (raise_exception, undefined, type errors)
        return type(err).__name__


SYS, U1, A1, U2 = ({"role": "system", "content": " be brief "}, {"role": "user", "content": " hi \n"},
                   {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"})

# (name, messages, generation prompt, expected text): mergekit 0.1.5's renderings
EXPECTED = [
    ("chatml", [SYS, U1], True,
     "<|im_start|>system\n be brief <|im_end|>\n<|im_start|>user\n hi \n<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", [U1, A1], False,
     "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n"
     "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>\n"),
    ("llama3", [U1], True,
     "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("mistral", [SYS, U1, A1, U2], False, "<s> [INST]  be brief \n\n hi \n [/INST] hello</s> [INST] bye [/INST]"),
    ("mistral", [U1, U2], False, "TemplateError"),
    ("mistral", [SYS, A1], False, "TemplateError"),
    ("alpaca", [SYS, U1, A1], False, "be brief\n\n### Instruction:\nhi\n\n### Response:\nhello"),
    ("alpaca", [U1, {"role": "user_context", "content": "ctx"}], True,
     "\n\n### Instruction:\nhi\n\n### Input:\nctx### Response:\n"),
    ("exaone", [U1, A1], True,
     "        [|system|][|endofturn|]\n\n    [|user|] hi \n\n        \n\n    [|assistant|]hello\n"
     "        [|endofturn|]\n\n    [|assistant|]\n"),
]


@pytest.mark.parametrize("name, messages, gen, want", EXPECTED)
def test_renders_what_mergekit_renders(name, messages, gen, want):
    assert render(shipped_template(name), messages, gen) == want


def test_every_shipped_name_has_a_template():
    assert SHIPPED_TEMPLATES == ("alpaca", "chatml", "exaone", "llama3", "mistral")
    for name in SHIPPED_TEMPLATES:
        text = shipped_template(name)
        assert "messages" in text and "curvlens" in text  # a template, with its note on where it comes from
        assert chat_template_text(name) == text


@pytest.mark.parametrize("value, match", [
    ("../chatml", "not a template name"), ("chat/ml", "not a template name"), (".hidden", "not a template name"),
    ("zephyr", "not a template curvlens carries"), ("ChatML", "not a template curvlens carries"),
    ("{{ x }}", "neither 'auto', a template name"), ("no braces but long enough to be text", "not a template"),
])
def test_names_are_looked_up_only_among_the_shipped(value, match):
    with pytest.raises(CurvlensError, match=match):
        chat_template_text(value)


def _conversations(n=150, seed=0):
    rng = random.Random(seed)
    roles = ["system", "user", "assistant", "user_context", "tool"]
    texts = ["hi", "  padded text \n", "", "multi\nline", "[INST]"]
    out = [[]]
    for _ in range(n):  # anything goes, including what a template refuses
        out.append([{"role": rng.choice(roles), "content": rng.choice(texts)} for _ in range(rng.randint(1, 5))])
    for system in (False, True):  # well-formed alternations
        for k in range(1, 6):
            out.append(([SYS] if system else []) + [
                {"role": "user" if i % 2 == 0 else "assistant", "content": rng.choice(texts)} for i in range(k)])
    return out


@pytest.mark.parametrize("name", SHIPPED_TEMPLATES)
def test_same_text_as_mergekits_template_on_many_conversations(name):
    from importlib import resources

    pytest.importorskip("mergekit._data.chat_templates", reason="mergekit (the parity extra) to compare with")
    theirs = resources.files("mergekit._data.chat_templates").joinpath(f"{name}.jinja").read_text()
    ours = shipped_template(name)
    assert ours != theirs  # our own text ...
    outcomes = set()
    for messages in _conversations():
        for gen in (False, True):
            for bos in ("<s>", None):
                want = render(theirs, messages, gen, bos)
                assert render(ours, messages, gen, bos) == want, (messages, gen, bos)  # ... rendering theirs
                outcomes.add("error" if want.endswith("Error") else "text")
    assert "text" in outcomes
