"""training_batches: an expert's own SFT items, as HF batches."""
import pytest
import torch

from curvlens.errors import CurvlensError


def test_training_batches_are_the_experts_sft_items(quick_zoo):
    from curvlens.zoo import training_batches
    from curvlens.zoo.build import held_out_prompts
    from curvlens.zoo.tasks import make_tasks
    from curvlens.zoo.tokenizer import make_tokenizer

    batches = training_batches(quick_zoo, "math", n_examples=10, batch_size=4)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    tok = make_tokenizer()
    task = make_tasks(quick_zoo.config, quick_zoo.seed)["addition"]
    held_out = held_out_prompts(task, quick_zoo.config, quick_zoo.seed)
    for b in batches:
        assert sorted(b) == ["attention_mask", "input_ids", "labels"]
        real = b["attention_mask"].bool()
        assert torch.equal(real, b["input_ids"] != tok.pad_token_id)
        for ids, labels, mask in zip(b["input_ids"], b["labels"], real):
            text = tok.decode(ids[mask][1:-1])            # without <bos> / <eos>
            prompt, answer = text.split(":")
            assert prompt + ":" not in held_out
            scored = labels[labels != -100]
            assert tok.decode(scored[:-1]) == answer       # the loss is on the answer (and <eos>) only
    again = training_batches(quick_zoo, "math", n_examples=10, batch_size=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))  # seeded
    with pytest.raises(CurvlensError):
        training_batches(quick_zoo, "nope")
