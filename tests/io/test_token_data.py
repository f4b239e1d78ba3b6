"""Token data for a data Fisher, read as untrusted input."""
import json

import pytest

from curvlens import CurvlensError
from curvlens.io import token_data
from curvlens.io.token_data import IGNORE, padded_batches, read_text_examples, read_token_jsonl


def test_jsonl_labels_default_to_the_ids_and_may_skip_tokens(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"input_ids": [3, 4]}) + "\n\n" + json.dumps({"input_ids": [5], "labels": [IGNORE]}))
    assert read_token_jsonl(f, vocab_size=6) == [{"input_ids": [3, 4], "labels": [3, 4]},
                                                  {"input_ids": [5], "labels": [IGNORE]}]
    with pytest.raises(CurvlensError, match=r"d.jsonl:1: 'input_ids' holds token id 3; expected 0 <= id < 3"):
        read_token_jsonl(f, vocab_size=3)


@pytest.mark.parametrize("line, match", [
    ('{"input_ids": [1, true]}', "holds True; expected ints"), ('{"input_ids": [-1]}', "token id -1"),
    ('[1, 2]', "expected an object with 'input_ids'"), ('{"input_ids": "12"}', "non-empty list"),
    ('{"input_ids": [1], "labels": [-5]}', "token id -5"),
])
def test_bad_lines_name_the_line(tmp_path, line, match):
    f = tmp_path / "d.jsonl"
    f.write_text('{"input_ids": [1]}\n' + line + "\n")
    with pytest.raises(CurvlensError, match=match) as err:
        read_token_jsonl(f)
    assert "d.jsonl:2" in str(err.value)


def test_text_lines_are_tokenized_and_cut(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdef\n\n  \nxy\n")
    rows = read_text_examples(f, lambda s: [ord(c) - 96 for c in s], max_length=4)
    assert rows == [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}, {"input_ids": [24, 25], "labels": [24, 25]}]
    f.write_text("\n\n")
    with pytest.raises(CurvlensError, match="no text line"):
        read_text_examples(f, list)


def test_empty_and_oversized_files_are_refused(tmp_path, monkeypatch):
    f = tmp_path / "d.jsonl"
    f.write_text("\n")
    with pytest.raises(CurvlensError, match="no example"):
        read_token_jsonl(f)
    f.write_text('{"input_ids": [1]}\n' * 10)
    monkeypatch.setattr(token_data, "MAX_BYTES", 50)
    with pytest.raises(CurvlensError, match="read whole, up to 50"):
        read_token_jsonl(f)


def test_batches_pad_right_and_mask_the_padding():
    rows = [{"input_ids": [i] * (i + 1), "labels": [i] * (i + 1)} for i in range(5)]
    batches = list(padded_batches(rows, 2, pad_id=9))
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 2), (2, 4), (1, 5)]
    b = batches[1]
    assert b["input_ids"].tolist() == [[2, 2, 2, 9], [3, 3, 3, 3]]
    assert b["attention_mask"].sum().item() == 7 and (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
