"""The tokenizer written beside merged weights: mergekit's ``tokenizer_source``,
``tokenizer: {source, pad_to_multiple_of, tokens}`` and ``chat_template``.

With a tokenizer source, mergekit builds the output vocabulary (``base``, one
model's, or the ``union`` of all) and re-indexes every model's embedding and LM
head rows by token, resized to the vocabulary's length (rows of tokens a model
lacks are taken from the one model that has them, else the base, else averaged).
curvlens merges rows as they are, so it accepts a tokenizer source exactly where
that re-indexing changes nothing: every model has the same vocabulary as the
source and its vocabulary-indexed tensors have one row per token (and
``pad_to_multiple_of`` adds no rows). Anything else is refused by name. The
source's tokenizer files are then copied beside the weights.

``chat_template`` is, as in mergekit, ``auto`` (the template most of the models
share), the name of a template mergekit ships (curvlens carries its own text of
each: :mod:`curvlens.config.chat_template`), or a Jinja template; it is written
into the output's ``tokenizer_config.json`` (and ``chat_template.jinja`` when the source has one, which transformers prefers).
"""
from __future__ import annotations

import json
from pathlib import Path

from curvlens.config.chat_template import chat_template_text
from curvlens.config.keys import check_keys
from curvlens.config.options import TokenizerOptions
from curvlens.errors import CurvlensError
from curvlens.io.paths import model_file, read_model_json, read_model_text
from curvlens.roles import param_role

#: The keys of a config's ``tokenizer:`` section.
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}

# tensors indexed by token id (mergekit's vocabulary_axis 0)
_VOCAB_TENSORS = ("embed_tokens", "lm_head", "wte", "word_embeddings")


def read_vocab(model_dir: Path) -> dict | None:
    """``{token: id}`` of a model's tokenizer (``tokenizer.json``, else
    ``vocab.json`` with ``added_tokens.json``), or None when it has neither.
    Every file is read through the model dir's containment."""
    data = read_model_json(model_dir, "tokenizer.json")
    if data is not None:
        return vocab_of(data, model_dir / "tokenizer.json")
    vocab = read_model_json(model_dir, "vocab.json")
    if vocab is None:
        return None
    out = _token_ids(vocab, model_dir / "vocab.json")
    added = read_model_json(model_dir, "added_tokens.json")
    if added is not None:
        out.update(_token_ids(added, model_dir / "added_tokens.json"))
    return out


def vocab_of(data, where) -> dict:
    """``{token: id}`` of a parsed ``tokenizer.json`` (BPE/WordPiece dict or
    Unigram list vocabularies, plus ``added_tokens``)."""
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab", {}) if isinstance(model, dict) else None
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        if not all(isinstance(p, list) and p and isinstance(p[0], str) for p in vocab):
            raise CurvlensError(f"{where}: model.vocab must be a list of [piece, score]")
        vocab = {piece[0]: i for i, piece in enumerate(vocab)}
    if not isinstance(vocab, dict):
        raise CurvlensError(f"{where}: expected a tokenizer with model.vocab (a mapping or a list)")
    out = _token_ids(vocab, where)
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                              and _is_id(t.get("id")) for t in added):
        raise CurvlensError(f"{where}: added_tokens must be a list of {{content: str, id: int}}")
    out.update({t["content"]: t["id"] for t in added})
    return out


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _token_ids(vocab, where) -> dict:
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and _is_id(v) for k, v in vocab.items()):
        raise CurvlensError(f"{where}: expected a mapping token -> id (an int >= 0)")
    return dict(vocab)


def _model_dirs(experts) -> list[tuple[str, Path]]:
    out = []
    if experts.base is not None and experts.base.path is not None:
        out.append(("base", _dir(experts.base.path)))
    for e in experts.experts:
        path = e.path or e.checkpoint.path
        if path is not None:
            out.append((f"expert {e.name!r}", _dir(Path(path))))
    seen, unique = set(), []
    for who, d in out:  # a base averaged as a model (linear) is one model
        if d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append((who, d))
    return unique


def _dir(p: Path) -> Path:
    p = Path(p)
    return p if p.is_dir() else p.parent


def tokenizer_options(cfg: dict, where: str, base, local) -> TokenizerOptions:
    """A config's ``tokenizer_source`` / ``tokenizer:`` and ``chat_template``
    (a model given by path through ``local``)."""
    source = cfg.get("tokenizer_source")
    tok = cfg.get("tokenizer")
    pad = None
    if tok is not None:
        if source is not None:
            raise CurvlensError(f"{where}: give tokenizer_source or tokenizer, not both (as mergekit)")
        if not isinstance(tok, dict):
            raise CurvlensError(f"{where}: tokenizer must be a mapping {{source:, tokens:, pad_to_multiple_of:}}")
        check_keys(tok, TOKENIZER_KEYS, f"{where}: tokenizer", optional=True)
        if tok.get("tokens"):
            raise CurvlensError(f"{where}: tokenizer.tokens (embeddings of chosen tokens from chosen models) "
                                "is not supported: curvlens merges embedding rows as they are")
        source = tok.get("source", "union")
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise CurvlensError(f"{where}: tokenizer.pad_to_multiple_of must be an int >= 1; got {pad!r}")
    if source is not None:
        if source in ("base", "union"):
            if source == "base" and base is None:
                raise CurvlensError(f"{where}: tokenizer source 'base' needs a base_model")
        else:
            source = local(source, "tokenizer source")
    chat = cfg.get("chat_template")
    if chat is not None and not isinstance(chat, str):
        raise CurvlensError(f"{where}: chat_template must be a string (a template name, 'auto' or Jinja); "
                            f"got {chat!r}")
    if chat is not None and chat != "auto":
        try:  # a bad name or template is refused before any merging
            chat_template_text(chat)
        except CurvlensError as err:
            raise CurvlensError(f"{where}: {err}") from err
    return TokenizerOptions(source, chat, pad)


def tokenizer_files(experts, ref_dir, options: TokenizerOptions):
    """(dir to copy the tokenizer files from, or None for the reference's;
    ``{filename: text}`` written over them).

    Raises
    ------
    CurvlensError
        Where mergekit would re-index embedding rows (vocabularies that differ,
        rows that are not one per token, padding rows) or a chat template cannot
        be found or written.
    """
    tok_dir = None
    if options.source is not None or options.pad_to_multiple_of is not None:
        tok_dir = _check_source(experts, ref_dir, options.source or "union", options.pad_to_multiple_of)
    files = {}
    if options.chat_template is not None:
        src = tok_dir or (Path(ref_dir) if ref_dir is not None else None)
        template = chat_template_text(options.chat_template,
                                      (t for _, d in _model_dirs(experts) if (t := _model_template(d))))
        if template is not None:
            cfg = read_model_json(src, "tokenizer_config.json") if src is not None else None
            if not isinstance(cfg, dict):
                raise CurvlensError(f"chat_template: the tokenizer copied to the output ({src}) has no "
                                    "tokenizer_config.json (a JSON object) to write it into")
            cfg["chat_template"] = template
            files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False)
            if model_file(src, "chat_template.jinja") is not None:
                files["chat_template.jinja"] = template
    return tok_dir, files


def _check_source(experts, ref_dir, source, pad) -> Path:
    models = _model_dirs(experts)
    if source == "base":
        if experts.base is None:
            raise CurvlensError("tokenizer source 'base' needs a base model")
        src = models[0][1]
    elif source == "union":
        src = Path(ref_dir) if ref_dir is not None else models[0][1]
    else:
        src = Path(source)
    want = read_vocab(src)
    if want is None:
        raise CurvlensError(f"tokenizer source {source!r}: {src} has no tokenizer.json or vocab.json to read "
                            "its vocabulary from")
    for who, d in models:
        got = read_vocab(d)
        if got is None:
            raise CurvlensError(f"tokenizer source {source!r}: {who} ({d}) has no tokenizer.json or vocab.json; "
                                "curvlens cannot check that its embedding rows line up with the source's tokens")
        if got != want:
            only = sorted(set(got) ^ set(want))[:5]
            raise CurvlensError(
                f"tokenizer source {source!r}: {who}'s vocabulary differs from {src}'s (e.g. tokens {only} or "
                "their ids): mergekit would re-index embedding rows by token; curvlens does not (merge models "
                "that share a vocabulary, or align them with mergekit-tokensurgeon first)")
    size = len(want)
    if pad is not None and size % pad:
        raise CurvlensError(f"tokenizer.pad_to_multiple_of: {pad}: the vocabulary has {size} tokens, so mergekit "
                            "would add padding rows (set to the mean embedding); curvlens does not resize "
                            "embeddings")
    ref = experts.reference
    for name in ref.keys():
        if param_role(name)[1] in ("embed", "lm_head") and any(k in name for k in _VOCAB_TENSORS):
            rows = ref.shape(name)[0]
            if rows != size:
                raise CurvlensError(
                    f"tokenizer source {source!r}: {name!r} has {rows} rows but the vocabulary {size} tokens: "
                    "mergekit would resize it to one row per token; curvlens does not resize embeddings "
                    "(leave tokenizer_source out to keep the rows as they are)")
    return src


def _model_template(d: Path) -> str | None:
    jinja = read_model_text(d, "chat_template.jinja")
    if jinja is not None:
        return jinja
    tc = read_model_json(d, "tokenizer_config.json")
    if isinstance(tc, dict):
        t = tc.get("chat_template")
        if isinstance(t, dict):
            t = t.get("default")
        if isinstance(t, list):  # transformers' list of {name, template}
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None
