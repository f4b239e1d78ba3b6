"""``curvlens fisher``: a data Fisher of one model, in the moments layout.

The examples come from a file: ``.jsonl`` of token ids (``{"input_ids": [...],
"labels": [...]}`` per line) or ``.txt`` (one example per line, tokenized by the
model dir's own tokenizer, no remote code). The output dir holds
``export/exp_avg_sq.safetensors`` (what ``--moments DIR`` of the other
subcommands and ``cl.Experts.from_dirs(..., moments=[DIR])`` read), the per-tensor
``log10 F`` statistics (``fisher_stats.csv``), what was computed
(``fisher_info.json``) and the mean ``log10 F`` by layer x role
(``fisher_heatmap.png`` / ``.html``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from curvlens.cli.options import output_options, report, save_figures
from curvlens.errors import CurvlensError


def examples(a: argparse.Namespace) -> list[dict]:
    """The examples of ``--data`` (JSON lines of token ids, or text lines)."""
    from curvlens.io.architecture import read_config
    from curvlens.io.token_data import read_text_examples, read_token_jsonl

    if not a.data.is_file():
        raise CurvlensError(f"--data {a.data}: not a file")
    vocab = (read_config(a.model) or {}).get("vocab_size") if a.model.is_dir() else None
    vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
    suffix = a.data.suffix.lower()
    if suffix == ".jsonl":
        rows = read_token_jsonl(a.data, vocab_size=vocab)
        return [{k: v[:a.max_length] for k, v in r.items()} for r in rows]
    if suffix == ".txt":
        return read_text_examples(a.data, _tokenizer(a.model), max_length=a.max_length, vocab_size=vocab)
    raise CurvlensError(f"--data {a.data}: expected a .jsonl file of token ids or a .txt file of lines")


def _tokenizer(model_dir: Path):
    if not model_dir.is_dir():
        raise CurvlensError(f"{model_dir}: not a dir; a .txt file is tokenized by the model dir's tokenizer")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CurvlensError(f"{model_dir}: no tokenizer to read a .txt file with (give token ids as .jsonl "
                            f"instead): {err}") from err
    return lambda line: tok(line, add_special_tokens=True)["input_ids"]


def _cmd_fisher(a: argparse.Namespace) -> int:
    from curvlens.io.atomic import AtomicDir
    from curvlens.io.checkpoint import Checkpoint
    from curvlens.io.token_data import padded_batches
    from curvlens.passes.analysis_curvature import curvature_stats
    from curvlens.passes.experts import Expert, Experts
    from curvlens.passes.fisher_estimate import estimate_fisher
    from curvlens.views.heatmaps import layer_role_heatmap, layer_role_heatmap_plotly

    for name, v in (("--batch-size", a.batch_size), ("--max-length", a.max_length)):
        if v < 1:
            raise CurvlensError(f"{name} must be >= 1; got {v}")
    rows = examples(a)
    with AtomicDir(a.out, overwrite=a.overwrite, inputs=[a.model, a.data]) as tmp:
        fisher = estimate_fisher(a.model, padded_batches(rows, a.batch_size), tmp, loss=a.loss,
                                 chunk_size=a.batch_size, max_examples=a.max_examples, device=a.device,
                                 progress=not a.quiet)
        info = {**fisher.fisher_info, "data": str(a.data)}
        (tmp / "fisher_info.json").write_text(json.dumps(info, indent=1) + "\n")
        name = a.model.name or "model"
        stats = curvature_stats(Experts(None, [Expert(name, Checkpoint.open(a.model), fisher)]),
                                device=a.device, progress=not a.quiet)
        stats.to_csv(tmp / "fisher_stats.csv", index=False)
        title = f"mean log10 F of {name}, by layer x role"
        written = [fisher.path, tmp / "fisher_info.json", tmp / "fisher_stats.csv"]
        written += save_figures(tmp, "fisher_heatmap", layer_role_heatmap(stats, "mean_log10", title=title),
                                layer_role_heatmap_plotly(stats, "mean_log10", title=title))
    print(f"empirical Fisher of {a.model} on {info['n_examples']} examples ({info['seconds']:.1f} s) -> {a.out}")
    report(a.out, tmp, written)
    return 0


def add_subcommands(sub, runtime: list) -> None:
    """Add ``fisher`` to ``sub``."""
    f = sub.add_parser("fisher", parents=runtime + [output_options()],
                       help="a data (empirical) Fisher of a model, in the moments layout other commands read")
    f.add_argument("model", type=Path, help="an HF model dir (safetensors; no remote code)")
    f.add_argument("--data", type=Path, required=True,
                   help="examples: .jsonl ({\"input_ids\": [...], \"labels\": [...]} per line) or .txt (one "
                        "example per line, tokenized by the model's tokenizer)")
    f.add_argument("--loss", choices=["causal_lm", "model"], default="causal_lm",
                   help="per-example loss: next-token cross-entropy (default) or the model's own")
    f.add_argument("--batch-size", type=int, default=16, help="examples per padded batch and per vmap chunk")
    f.add_argument("--max-length", type=int, default=512, help="tokens kept per example")
    f.add_argument("--max-examples", type=int, help="stop after this many examples")
    f.set_defaults(fn=_cmd_fisher)
