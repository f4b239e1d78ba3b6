"""The architecture tier: transformers families trained into experts by the real Trainer.

Each family is a tiny config (random init, seeded) saved with ``save_pretrained``
as the base, then fine-tuned into two experts by ``transformers.Trainer`` (AdamW,
the Trainer's decay/no-decay groups) on synthetic inputs, each run leaving the
``checkpoint-N/`` dir a user has (``model.safetensors``, ``optimizer.pt``,
``scheduler.pt``, ``trainer_state.json``, ...). The two experts differ in data,
learning rate and step count, as experts trained separately do.

At the end of each run a callback records the live optimizer's ``exp_avg_sq`` by
parameter name (``live_exp_avg_sq.safetensors``, names as in memory) and, through
transformers' own ``revert_weight_conversion`` on the live model, by the names
``save_pretrained`` writes (``live_exp_avg_sq_saved.safetensors``): what curvlens
must read back from ``optimizer.pt``, bit for bit.

Regenerate by hand (about a minute on 2 cores)::

    python -m tests.architectures.families /tmp/families

``transformers`` is imported lazily, so this module imports where it is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RECIPE_VERSION = 2
MANIFEST = "families.json"
LIVE = "live_exp_avg_sq.safetensors"
LIVE_SAVED = "live_exp_avg_sq_saved.safetensors"
BATCH = 4
V = 64  # vocabulary of the text families
T = 8   # sequence length
THREADS = int(os.environ.get("CURVLENS_REAL_THREADS", "1"))

_TEXT = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LM = dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
           max_position_embeddings=32, **_TEXT)
_ENC = dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
            max_position_embeddings=32, **_TEXT)
_S2S = dict(encoder_layers=1, decoder_layers=1, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32,
            encoder_attention_heads=2, decoder_attention_heads=2, max_position_embeddings=32,
            decoder_start_token_id=1, forced_eos_token_id=2, **_TEXT)
_CONV = dict(conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=8,
             num_conv_pos_embedding_groups=2, vocab_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2)


@dataclass(frozen=True)
class Family:
    """One transformers family of the tier.

    ``inputs`` names the synthetic task: ``causal`` (next token), ``seqcls``,
    ``mlm``, ``tokcls``, ``seq2seq``, ``image`` (image classification), ``ctc``
    (speech to characters), ``speech2text`` (Whisper).
    """

    kind: str          # decoder-only, encoder-only, encoder-decoder, vision, speech
    config: str        # transformers config class
    model: str         # transformers model class the Trainer trains
    inputs: str
    kwargs: dict = field(default_factory=dict)
    notes: str = ""


FAMILIES: dict[str, Family] = {
    "gpt2": Family("decoder-only", "GPT2Config", "GPT2LMHeadModel", "causal",
                   dict(n_layer=1, n_embd=16, n_head=2, n_positions=32, **_TEXT),
                   "tied embeddings; Conv1D weights stored transposed"),
    "gemma": Family("decoder-only", "GemmaConfig", "GemmaForCausalLM", "causal",
                    dict(_LM, num_key_value_heads=1, head_dim=8), "tied embeddings"),
    "gpt_neox": Family("decoder-only", "GPTNeoXConfig", "GPTNeoXForCausalLM", "causal", dict(_LM),
                       "in memory lm_head, saved embed_out"),
    "mixtral": Family("decoder-only", "MixtralConfig", "MixtralForCausalLM", "causal",
                      dict(_LM, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2),
                      "MoE: per-expert w1/w3 fused into gate_up_proj, w2 into down_proj; "
                      "block_sparse_moe renamed mlp"),
    "qwen2_moe": Family("decoder-only", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "causal",
                        dict(_LM, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=16),
                        "MoE with a shared expert: per-expert weights fused in memory"),
    "bert": Family("encoder-only", "BertConfig", "BertForSequenceClassification", "seqcls", dict(_ENC)),
    "roberta": Family("encoder-only", "RobertaConfig", "RobertaForMaskedLM", "mlm",
                      dict(_ENC, max_position_embeddings=40), "tied lm_head.decoder"),
    "distilbert": Family("encoder-only", "DistilBertConfig", "DistilBertForSequenceClassification", "seqcls",
                         dict(n_layers=1, dim=16, hidden_dim=32, n_heads=2, max_position_embeddings=32,
                              vocab_size=V, pad_token_id=0)),
    "deberta-v2": Family("encoder-only", "DebertaV2Config", "DebertaV2ForSequenceClassification", "seqcls",
                         dict(_ENC, relative_attention=True, position_buckets=8, max_relative_positions=16,
                              pos_att_type=["p2c", "c2p"])),
    "electra": Family("encoder-only", "ElectraConfig", "ElectraForTokenClassification", "tokcls",
                      dict(_ENC, embedding_size=8), "embeddings projected to the hidden size"),
    "t5": Family("encoder-decoder", "T5Config", "T5ForConditionalGeneration", "seq2seq",
                 dict(num_layers=1, num_decoder_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      decoder_start_token_id=0, vocab_size=V, pad_token_id=0, eos_token_id=2),
                 "tied shared/encoder/decoder embeddings; relative attention bias"),
    "bart": Family("encoder-decoder", "BartConfig", "BartForConditionalGeneration", "seq2seq", dict(_S2S),
                   "final_logits_bias: a saved buffer with no optimizer state"),
    "marian": Family("encoder-decoder", "MarianConfig", "MarianMTModel", "seq2seq",
                     dict(_S2S, decoder_start_token_id=0, decoder_vocab_size=V),
                     "final_logits_bias buffer; sinusoidal positions"),
    "vit": Family("vision", "ViTConfig", "ViTForImageClassification", "image",
                  dict(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       image_size=16, patch_size=8, num_channels=3),
                  "in memory layers.N.q_proj, saved encoder.layer.N.attention.attention.query"),
    "swin": Family("vision", "SwinConfig", "SwinForImageClassification", "image",
                   dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
                        num_channels=3), "renamed attention and MLP; relative position bias table"),
    "convnext": Family("vision", "ConvNextConfig", "ConvNextForImageClassification", "image",
                       dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32, num_channels=3),
                       "convolutions, layer scale"),
    "wav2vec2": Family("speech", "Wav2Vec2Config", "Wav2Vec2ForCTC", "ctc", dict(_CONV),
                       "weight-normed positional convolution (parametrizations)"),
    "hubert": Family("speech", "HubertConfig", "HubertForCTC", "ctc", dict(_CONV)),
    "whisper": Family("speech", "WhisperConfig", "WhisperForConditionalGeneration", "speech2text",
                      dict(encoder_layers=1, decoder_layers=1, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32,
                           encoder_attention_heads=2, decoder_attention_heads=2, num_mel_bins=8,
                           max_source_positions=16, max_target_positions=32, vocab_size=V, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                           suppress_tokens=None),
                      "encoder-decoder speech model; sinusoidal encoder positions"),
}

#: The two experts of every family: data seed, learning rate, steps.
EXPERTS = {"a": {"seed": 1, "learning_rate": 1e-3, "max_steps": 3},
           "b": {"seed": 2, "learning_rate": 3e-3, "max_steps": 5}}


def config_of(fam: str):
    """The family's transformers config."""
    import transformers

    f = FAMILIES[fam]
    return getattr(transformers, f.config)(**f.kwargs)


def model_class(fam: str):
    """The transformers class the family's experts are trained and loaded as."""
    import transformers

    return getattr(transformers, FAMILIES[fam].model)


def example(fam: str, config, g: torch.Generator, *, labels: bool = True) -> dict:
    """One synthetic example (tensors without a batch dim) for the family's task.

    Each expert draws from its own generator, and its labels follow a rule of its
    inputs, so the two experts learn different things.
    """
    kind = FAMILIES[fam].inputs
    if kind in ("causal", "seqcls", "mlm", "tokcls", "seq2seq"):
        ids = torch.randint(3, V, (T,), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.long)}
        if labels:
            out["labels"] = {"causal": ids, "mlm": ids, "seq2seq": ids.flip(0),
                             "tokcls": (ids % 2), "seqcls": (ids[0] % 2)}[kind].clone()
        return out
    if kind == "image":
        size = config.image_size
        pixels = torch.randn(config.num_channels, size, size, generator=g)
        out = {"pixel_values": pixels}
        if labels:
            out["labels"] = (pixels.mean() > 0).long()
        return out
    if kind == "ctc":
        wave = torch.randn(400, generator=g)
        out = {"input_values": wave}
        if labels:
            out["labels"] = torch.randint(3, config.vocab_size, (4,), generator=g)
        return out
    if kind == "speech2text":
        feats = torch.randn(config.num_mel_bins, 2 * config.max_source_positions, generator=g)
        out = {"input_features": feats}
        if labels:
            out["labels"] = torch.randint(3, V, (T,), generator=g)
        return out
    raise KeyError(kind)


def sample_batch(fam: str, config, n: int = 2) -> dict:
    """A fixed batch of inputs (no labels) to run a loaded model on."""
    g = torch.Generator().manual_seed(99)
    items = [example(fam, config, g, labels=False) for _ in range(n)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    if FAMILIES[fam].inputs in ("seq2seq", "speech2text"):
        batch["decoder_input_ids"] = torch.ones(n, 4, dtype=torch.long)
    return batch


class _Data(torch.utils.data.Dataset):
    def __init__(self, fam: str, config, seed: int, n: int):
        g = torch.Generator().manual_seed(seed)
        self.items = [example(fam, config, g) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _capture_callback():
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        """The live optimizer's moments by name, in memory and as saved."""

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            from transformers.core_model_loading import revert_weight_conversion

            live = {n: optimizer.state[p]["exp_avg_sq"].detach().clone()
                    for n, p in model.named_parameters() if p in optimizer.state}
            self.live = live
            # transformers splits and renames the moments exactly as it saves the weights
            self.saved = {k: v.contiguous().clone() for k, v in revert_weight_conversion(model, dict(live)).items()}

    return Capture()


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_family(root: Path, fam: str) -> dict:
    """Base and two Trainer experts of one family under ``root/fam``."""
    from safetensors.torch import save_file
    from transformers import PrinterCallback, Trainer, TrainingArguments

    d = root / fam
    if d.exists():
        shutil.rmtree(d)
    config = config_of(fam)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = model_class(fam)(config)
    base.save_pretrained(d / "base")
    experts = {}
    for e, recipe in EXPERTS.items():
        run = d / f"run_{e}"
        model = model_class(fam).from_pretrained(d / "base")
        capture = _capture_callback()
        args = TrainingArguments(output_dir=str(run), max_steps=recipe["max_steps"],
                                 save_steps=recipe["max_steps"], learning_rate=recipe["learning_rate"],
                                 per_device_train_batch_size=BATCH, weight_decay=0.01, seed=recipe["seed"],
                                 report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True,
                                 save_total_limit=1, dataloader_num_workers=0, warmup_steps=0)
        data = _Data(fam, config, recipe["seed"], BATCH * recipe["max_steps"])
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[capture])
        trainer.remove_callback(PrinterCallback)  # the final metrics line
        trainer.train()
        save_file(capture.live, str(run / LIVE))
        save_file(capture.saved, str(run / LIVE_SAVED))
        experts[e] = (run / f"checkpoint-{recipe['max_steps']}").relative_to(root).as_posix()
    return {"base": (d / "base").relative_to(root).as_posix(), "experts": experts}


def _fingerprint() -> str:
    import transformers

    blob = json.dumps({"v": RECIPE_VERSION, "families": {k: repr(v) for k, v in FAMILIES.items()},
                       "experts": EXPERTS, "batch": BATCH, "transformers": transformers.__version__,
                       "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_all(root, families=None, *, force: bool = False) -> dict:
    """Every family under ``root``, reusing a complete earlier build of the same
    recipe (``families.json`` is written last). Returns ``{fam: {"base": Path,
    "experts": {"a": Path, "b": Path}}, "seconds": float}``."""
    _quiet()
    root = Path(root)
    families = list(families or FAMILIES)
    fp = _fingerprint()
    mf = root / MANIFEST
    manifest = json.loads(mf.read_text()) if mf.is_file() and not force else {}
    if manifest.get("fingerprint") != fp:
        manifest = {"fingerprint": fp, "families": {}, "seconds": {}}
    todo = [f for f in families if f not in manifest["families"]
            or not all((root / p / "optimizer.pt").is_file() for p in manifest["families"][f]["experts"].values())]
    if todo:
        root.mkdir(parents=True, exist_ok=True)
        prev = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            for fam in todo:
                t0 = time.perf_counter()
                manifest["families"][fam] = build_family(root, fam)
                manifest["seconds"][fam] = round(time.perf_counter() - t0, 2)
                tmp = mf.with_suffix(".tmp")
                tmp.write_text(json.dumps(manifest, indent=1))
                tmp.replace(mf)
        finally:
            torch.set_num_threads(prev)
    out = {f: {"base": root / manifest["families"][f]["base"],
               "experts": {e: root / p for e, p in manifest["families"][f]["experts"].items()}}
           for f in families}
    return {"families": out, "seconds": {f: manifest["seconds"].get(f, 0.0) for f in todo}}


if __name__ == "__main__":  # pragma: no cover - a maintenance entry point
    where = Path(sys.argv[1] if len(sys.argv) > 1 else "families-tier")
    t = time.perf_counter()
    built = build_all(where, sys.argv[2:] or None, force=True)
    print(f"built {len(built['families'])} families under {where} in {time.perf_counter() - t:.0f} s")
