"""Make the OTA-fork fixtures: tiny inputs, one config per case, and the tensors
the OTA authors' own code (pmahdavi/ota-merge, a mergekit fork) merges from them.

Run it with the fork installed, in a scratch environment of its own (never
curvlens's; ``make_fixtures.sh`` builds one)::

    python tests/config/ota_fork/make_fixtures.py --fork /path/to/ota-merge

Nothing of the fork is copied here: this script writes inputs and configs, then
calls the fork's ``mergekit.merge.run_merge`` on each config ``fixtures/CASE.yml``
(in a fresh process per case, with ``fixtures/`` as the working dir: the fork
reads relative paths from the working dir, curvlens from the config's dir, so
both read the same files) and keeps its output tensors as
``fixtures/expected/CASE.safetensors``. ``tests/config/test_ota_fork_fixtures.py``
runs each config through ``curvlens merge`` and compares.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
EXPERTS = ("expert0", "expert1", "expert2")
LAYERS, HIDDEN, KV, INTER, VOCAB = 2, 8, 4, 12, 16

#: case -> (top-level parameters, per-expert parameters (or None), config extras)
CASES = {
    # the defaults (power 0.5, epsilon 1e-8, normalise none), the base listed among the models
    "defaults": ({}, None, {"list_base": True}),
    "power_epsilon_global": ({"power": 0.25, "epsilon": 1e-10, "normalise": "global"}, None, {}),
    "power1_global_threshold": ({"power": 1.0, "normalise": "global", "precond_threshold": 1e-6}, None, {}),
    "threshold_fallback_base": ({"precond_threshold": 1e-6, "fallback_to_base": True}, None, {}),
    "threshold_per_model_mean": ({"epsilon": 1e-12},
                                 [{"precond_threshold": 3e-7}, {"precond_threshold": 2e-6}, {}], {}),
    "rank1_approx": ({"precond_threshold": 1e-6, "fallback_to_base": True},
                     [{"rank1_approx": True}, {"rank1_approx": True}, {}], {}),
    "rank": ({"precond_threshold": 5e-7, "fallback_to_base": True},
             [{"rank": 2}, {"rank": 1}, {}], {}),
    "scaling_factor": ({"power": 0.5}, [{"scaling_factor": 0.5}, {"scaling_factor": 2.0}, {}], {}),
    "ties_combine": ({"masked_task_vector_merge_method": "ties", "precond_threshold": 1e-6}, None, {}),
    "ties_density": ({"masked_task_vector_merge_method": "ties", "ties_density": 0.3}, None, {}),
    "linear_rescale": ({"masked_task_vector_merge_method": "linear", "rescale": True,
                        "precond_threshold": 1e-6, "fallback_to_base": True}, None, {}),
    "precond_rescale_relative": ({"rescale": True, "precond_threshold": 2e-6,
                                  "rescale_relative_threshold": 0.5}, None, {}),
    "ties_rescale_density": ({"masked_task_vector_merge_method": "ties", "ties_density": 0.5, "rescale": True,
                              "precond_threshold": 1e-6}, None, {}),
    # no base: the mask is on v alone, and fully masked entries take the plain mean
    "no_base_threshold": ({"precond_threshold": 1e-4}, None, {"base": False}),
    "bfloat16": ({"precond_threshold": 1e-6, "fallback_to_base": True}, None, {"dtype": "bfloat16"}),
}


def llama_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS, "intermediate_size": INTER, "vocab_size": VOCAB,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "torch_dtype": "float32"}


def shapes() -> dict:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
                    p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                    p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                    p + "post_attention_layernorm.weight": (HIDDEN,)})
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def make_inputs(root: Path) -> None:
    """base + three experts (config.json, model.safetensors) and each expert's
    ``export/exp_avg_sq.safetensors``: edits of about 0.1 with some entries left
    at the base, second moments log-normal around 1e-4 with some exact zeros."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(27)
    base = {k: torch.randn(s, generator=g) for k, s in shapes().items()}
    models = {"base": base}
    moments = {}
    for e in EXPERTS:
        w, v = {}, {}
        for k, t in base.items():
            edit = 0.1 * torch.randn(t.shape, generator=g)
            edit[torch.rand(t.shape, generator=g) < 0.1] = 0.0  # entries this expert left alone
            w[k] = t + edit
            m = 1e-4 * torch.exp(2.0 * torch.randn(t.shape, generator=g))
            m[torch.rand(t.shape, generator=g) < 0.05] = 0.0  # never-updated entries
            v[k] = m
        models[e], moments[e] = w, v
    for name, w in models.items():
        d = root / "inputs" / name
        d.mkdir(parents=True)
        save_file({k: t.contiguous() for k, t in w.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(llama_config(), indent=1))
        if name in moments:
            (d / "export").mkdir()
            save_file(moments[name], str(d / "export" / "exp_avg_sq.safetensors"))


def config(case: str) -> dict:
    import copy

    top, per, extra = copy.deepcopy(CASES[case])
    per = per or [{} for _ in EXPERTS]
    models = [{"model": f"inputs/{e}", "parameters": {"weight": 1.0, **p,
                                                        "preconditioner_path": f"inputs/{e}/export/exp_avg_sq.safetensors"}}
              for e, p in zip(EXPERTS, per)]
    cfg = {"merge_method": "ota"}
    if extra.get("base", True):
        cfg["base_model"] = "inputs/base"
        if extra.get("list_base"):
            models = [{"model": "inputs/base"}] + models
    cfg["models"] = models
    cfg["parameters"] = top
    cfg["dtype"] = extra.get("dtype", "float32")
    return cfg


def run_fork_case(case: str) -> None:
    """In this process: the fork's run_merge of ``fixtures/CASE.yml`` (cwd = fixtures/)."""
    import logging

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file, save_file

    logging.disable(logging.WARNING)
    cfg = yaml.safe_load((FIXTURES / f"{case}.yml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        run_merge(MergeConfiguration.model_validate(cfg), tmp,
                  MergeOptions(copy_tokenizer=False, write_model_card=False, lazy_unpickle=False))
        tensors = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
    save_file(tensors, str(FIXTURES / "expected" / f"{case}.safetensors"), metadata={"case": case})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fork", type=Path, help="the ota-merge checkout whose mergekit is installed (recorded)")
    ap.add_argument("--fork-commit", default=None, help="its commit (when the checkout has no .git)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    a = ap.parse_args()
    if a.case:
        os.chdir(FIXTURES)
        run_fork_case(a.case)
        return
    import mergekit
    import torch
    import yaml

    ota = Path(mergekit.__file__).parent / "merge_methods" / "ota.py"
    if not ota.is_file():
        sys.exit(f"the installed mergekit ({mergekit.__file__}) is not the OTA fork: no merge_methods/ota.py")
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    make_inputs(FIXTURES)
    (FIXTURES / "expected").mkdir()
    for case in CASES:
        (FIXTURES / f"{case}.yml").write_text(yaml.safe_dump(config(case), sort_keys=False))
        subprocess.run([sys.executable, __file__, "--case", case], check=True)
        print(f"{case}: done", flush=True)
    commit = a.fork_commit
    if commit is None and a.fork is not None and (a.fork / ".git").exists():
        commit = subprocess.run(["git", "-C", str(a.fork), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    manifest = {"made_by": "python tests/config/ota_fork/make_fixtures.py (see make_fixtures.sh)",
                "fork": "github.com/pmahdavi/ota-merge", "fork_commit": commit,
                "fork_ota_py_sha256": hashlib.sha256(ota.read_bytes()).hexdigest(),
                "fork_mergekit_version": getattr(mergekit, "__version__", None) or _dist_version("mergekit"),
                "torch": torch.__version__, "cases": list(CASES)}
    (FIXTURES / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
