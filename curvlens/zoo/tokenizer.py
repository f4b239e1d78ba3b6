"""The zoo's character-level tokenizer, in Hugging Face format.

Every character the zoo's tasks can write is one token, so a model's vocabulary is
small (the embedding and ``lm_head`` stay a modest share of a tiny model) and an
answer is scored character by character, with no subword boundary in the way.
The tokenizer is a ``tokenizers.Tokenizer`` (a WordLevel model whose "words" are
single characters) wrapped in ``PreTrainedTokenizerFast``, so
``transformers.AutoTokenizer.from_pretrained(dir)`` loads it like any hub tokenizer.
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

#: Every character any zoo task or the generic pretraining text may contain.
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " +-=:?.,()[]{}<>"


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Build the zoo's character-level tokenizer.

    Ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; then one id per character
    of :data:`ALPHABET`. Padding is on the left, as batched generation with
    ``model.generate`` needs (the zoo's own decoding groups prompts by length and
    does not pad).

    Returns
    -------
    transformers.PreTrainedTokenizerFast

    Examples
    --------
    >>> tok = make_tokenizer()
    >>> ids = tok("add 07+45:", add_special_tokens=False)["input_ids"]
    >>> len(ids), tok.decode(ids)
    (10, 'add 07+45:')
    >>> tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    (0, 1, 2)
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Split before every character; special tokens are matched before this runs,
    # so "<eos>" in a string is still one token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins tokens without the spaces WordLevel would otherwise insert.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
