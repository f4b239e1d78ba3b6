# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Your own checkpoints: models, second moments, merge configs
#
# How do you point curvlens at your own fine-tuned experts? This notebook walks
# through every input curvlens reads and every way to produce it: Hugging Face model
# dirs with moments in the paper's release layout
# (`<expert>/export/exp_avg_sq.safetensors`) or in an HF Trainer checkpoint
# (`optimizer.pt` beside the model files, for any transformers family), what
# `curvlens inspect` tells you about a dir before anything else, exporting moments
# from your own training loop with `export_moments`, what happens when experts were
# trained differently, writing a mergekit / OTA-fork YAML config (mergekit:
# Goddard et al. 2024, arXiv:2403.13257; the OTA authors' fork of it: Mahdavinia
# et al. 2025, arXiv:2509.11167) and running it from Python or from the
# `curvlens merge` command, and what memory and GPU to plan for. It runs as-is: the
# demo zoo's dirs stand in for your models; replace the paths with yours.

# %% tags=["parameters"]
QUICK = True      # the quick zoo as stand-in checkpoints; False: the default zoo
DEVICE = "auto"   # "auto": CUDA when present, else CPU

# %%
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Markdown, display

import curvlens as cl

FACTS = {}  # the computed facts the text relies on (read back by the tests)
zoo = cl.zoo.build("quick" if QUICK else "default")
work = Path(tempfile.mkdtemp(prefix="curvlens-07-"))  # everything this notebook writes
print("stand-in checkpoints:", zoo.root)
print("work dir:", work)
FACTS = {}  # the computed facts the text relies on (read back by the tests)

# %% [markdown]
# ## 1. What curvlens reads
#
# An expert is an ordinary HF model dir. Its second moments can sit beside it in the
# layout the OTA authors released:
#
# ```
# math/
#   config.json, model.safetensors (or sharded: model-0000x-of-0000n.safetensors + index),
#   tokenizer files
#   export/exp_avg_sq.safetensors     <- fp32 Adam exp_avg_sq, keyed by parameter name
#   optimizer.pt                      <- or: the raw torch.optim state (HF Trainer checkpoints)
# ```

# %%
expert_dir = zoo.expert_dirs["math"]
for p in sorted(expert_dir.rglob("*")):
    if p.is_file():
        print(f"{str(p.relative_to(expert_dir)):40s} {p.stat().st_size / 1024:8.1f} KiB")

# %% [markdown]
# `cl.Checkpoint.open` is lazy: it reads headers only (shapes, dtypes, which file holds
# which tensor), so `describe()` on an 8B model costs nothing. It opens HF dirs
# (sharded or single safetensors, `pytorch_model*.bin`), single `.safetensors` /
# `.pt` files, or an in-memory state dict.

# %%
ckpt = cl.Checkpoint.open(expert_dir)
print(ckpt)
ckpt.describe().head(8)

# %% [markdown]
# `cl.Moments.open` finds the moments in the three layouts users have. Given a model
# dir it prefers `export/exp_avg_sq.safetensors`, then `optimizer.pt`. A raw
# `torch.optim` state is keyed by parameter *index*; curvlens maps indices to names
# through the model's parameter order (also the HF Trainer's two groups, with and
# without weight decay) and checks every shape, refusing to guess when the mapping is
# ambiguous.

# %%
m_export = cl.Moments.open(expert_dir)                        # export/exp_avg_sq.safetensors
m_optim = cl.Moments.open(expert_dir / "optimizer.pt")        # torch.optim state, names from config.json order

# An HF Trainer checkpoint dir: model files and optimizer.pt, no export/ folder.
trainer_dir = work / "checkpoint-final"
trainer_dir.mkdir()
for f in expert_dir.iterdir():
    if f.is_file():
        shutil.copy(f, trainer_dir / f.name)
m_trainer = cl.Moments.open(trainer_dir)

layout_diff = {}
for label, m in [("export", m_export), ("optimizer.pt", m_optim), ("Trainer dir", m_trainer)]:
    layout_diff[label] = max(float((m[n] - m_export[n]).abs().max()) for n in m_export)
    print(f"{label:13s} {m!r}\n{'':13s} max |difference to export| = {layout_diff[label]:.1e}")
FACTS["layout_max_diff"] = layout_diff

# %% [markdown]
# `validate` reads every moment once and checks it against the weights: same names
# and shapes, finite, non-negative. Every problem is reported together, as a
# `CurvlensError` naming the file, the tensor, what was expected and what was found:

# %%
m_export.validate(expert_dir)
print("moments of", expert_dir.name, "are valid")
try:
    cl.Moments.open(zoo.base_dir)  # the base has no moments
except cl.CurvlensError as err:
    print("CurvlensError:", err)

# %% [markdown]
# **`inspect` first.** Before any analysis, ask what a dir holds: the weights
# (format, files, tensors, parameters, dtypes), the architecture its `config.json`
# declares (read as data, never run), and where the moments come from — the format,
# the file, how the optimizer's parameters got their names (which *tier*: names in
# the file, the declared class's parameter order, the HF Trainer's two groups, the
# names transformers saves), their dtypes and step. It reads headers only. From the
# shell: `curvlens inspect DIR...`.

# %%
cl.inspect([expert_dir, trainer_dir, zoo.base_dir]).T

# %% [markdown]
# **HF Trainer dirs of any family.** `transformers.Trainer` writes `checkpoint-N/`
# with `model.safetensors` and an `optimizer.pt` keyed by parameter *index*. curvlens
# builds the class the `config.json` declares on the meta device (no weights, no
# remote code), numbers its parameters as the Trainer's optimizer does (its
# decay / no-decay groups, by the installed Trainer's own rule) and checks every
# shape. Since transformers 5, many families keep other names in memory than on
# disk (its *checkpoint conversion mapping*: ViT's `layers.N.q_proj` is saved as
# `encoder.layer.N.attention.attention.query`), and mixture-of-experts families fuse
# the per-expert 2-D weights into one 3-D tensor in memory. curvlens maps the
# optimizer's names to the saved ones through that same mapping, splitting a fused
# moment exactly as transformers splits the weight, and checks the result against
# the checkpoint shape by shape; if nothing checks out it says which mappings it
# tried. Saved tensors no optimizer covers (buffers such as BART's
# `final_logits_bias`) are untrained: a zero moment in analyses, the base's value in
# a merge, and a warning names them. Here a tiny Mixtral (4 experts per layer) is
# trained for two steps by the real `Trainer`:

# %%
import transformers
from transformers import Trainer, TrainingArguments

moe_cfg = transformers.MixtralConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                     num_local_experts=4, num_experts_per_tok=2, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
moe = transformers.MixtralForCausalLM(moe_cfg)
gen = torch.Generator().manual_seed(0)
moe_data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (8, 8), generator=gen)]
moe_args = TrainingArguments(output_dir=str(work / "moe_run"), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True)
Trainer(model=moe, args=moe_args, train_dataset=moe_data).train()
moe_view = cl.inspect(work / "moe_run")
print(moe_view.loc[0, "names_from"])
m_moe = cl.Moments.open(work / "moe_run" / "checkpoint-2")
m_moe.validate(work / "moe_run" / "checkpoint-2")
fused = moe.model.layers[0].mlp.experts.gate_up_proj
print("in memory:", "model.layers.0.mlp.experts.gate_up_proj", tuple(fused.shape), "-> saved:",
      [(n, tuple(m_moe.shape(n))) for n in m_moe if n.startswith("model.layers.0.block_sparse_moe.experts.0.")])
FACTS["moe_fused_split"] = "fused" in moe_view.loc[0, "names_from"]

# %% [markdown]
# The layouts curvlens reads (each is tested; the README says how each test fixture
# is made):
#
# | layout | what is in it | names |
# |---|---|---|
# | the paper's release | `<expert>/export/exp_avg_sq.safetensors` (also keys `<name>.exp_avg_sq`) | the file's keys |
# | a `torch.optim` state | `optimizer.pt` (`{"state", "param_groups"}`), keyed by index or by name | index: the model's parameter order, shape-checked |
# | an HF Trainer dir | `checkpoint-N/` with `optimizer.pt` beside the model files | the declared class's order in the Trainer's decay / no-decay groups, saved names through transformers' conversion mapping (renamed, fused MoE experts split) |
# | your own loop | `export_moments(optimizer, model, path)` writes the paper's layout | `model.named_parameters()` |
# | a data Fisher | `estimate_fisher` writes the paper's layout (`kind=empirical_fisher`) | the file's keys |
#
# Tested Trainer families (transformers 5.25, `tests/architectures`): GPT-2, Gemma,
# GPT-NeoX, Mixtral, Qwen2-MoE (decoder-only); BERT, RoBERTa, DistilBERT,
# DeBERTa-v2, ELECTRA (encoder-only); T5, BART, Marian (encoder-decoder); ViT, Swin,
# ConvNeXt (vision); Wav2Vec2, HuBERT, Whisper (speech).

# %% [markdown]
# **Bias correction.** Adam's $v_t$ (Kingma & Ba 2015, arXiv:1412.6980) starts at 0
# and approaches $\mathbb{E}[g^2]$ as
# $1 - \beta_2^t$; the paper uses it raw, which is harmless after thousands of steps.
# For short runs, `bias_correction=True` divides by $1 - \beta_2^t$, reading the step
# and $\beta_2$ from the file:

# %%
m_corr = cl.Moments.open(expert_dir, bias_correction=True)
name = next(iter(m_export))
factor = float(m_corr[name].sum() / m_export[name].sum())
FACTS.update(bias_factor=factor, bias_formula=1 / (1 - m_export.beta2 ** m_export.step), moments_step=m_export.step)
print(f"step {m_export.step}, beta2 {m_export.beta2}: 1 / (1 - beta2**step) = "
      f"{1 / (1 - m_export.beta2 ** m_export.step):.3f}; measured factor {factor:.3f}")

# %% [markdown]
# `cl.Experts.from_dirs` lines up a base and experts, checks every key and shape of
# every model and moments file up front (headers only) and reports every difference
# in one error, before any long computation. Moments can be found in each dir, given
# explicitly per expert, or left out (`moments=False`) for methods that do not use
# them:

# %%
names = list(zoo.expert_dirs)
dirs = [zoo.expert_dirs[n] for n in names]
experts = cl.Experts.from_dirs(zoo.base_dir, dirs, names=names)
explicit = cl.Experts.from_dirs(zoo.base_dir, dirs, names=names,
                             moments=[d / "export" / "exp_avg_sq.safetensors" for d in dirs])
weights_only = cl.Experts.from_dirs(zoo.base_dir, dirs, names=names, moments=False)
print(experts)
print(weights_only)

# %% [markdown]
# ## 2. Export moments from your own training loop
#
# Any training loop with an Adam-family optimizer can produce curvlens's input with
# one call after the last step:
#
# ```python
# curvlens.export_moments(optimizer, model, "<expert>/export/exp_avg_sq.safetensors")
# ```
#
# It writes fp32 `exp_avg_sq` keyed by `model.named_parameters()` names (the names
# the saved model uses), with the step, betas and eps as metadata. Here is a real,
# tiny fine-tuning run: starting from the zoo's base model, teach it a new skill
# (sorting four letters, `"sort dbca:"` → `"abcd"`) with AdamW (Loshchilov & Hutter
# 2019, arXiv:1711.05101) as in the paper
# ($\beta = (0.9, 0.999)$, $\epsilon = 10^{-8}$), then save the model and its moments.

# %%
import random

from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained(zoo.base_dir)
model = AutoModelForCausalLM.from_pretrained(zoo.base_dir, dtype=torch.float32)
letters = "abcdefghijklmnopqrstuvwxyz"
rnd = random.Random(0)


def example():
    w = "".join(rnd.sample(letters, 4))
    return f"sort {w}:", "".join(sorted(w))


held_out = [example() for _ in range(100)]
held_prompts = {p for p, _ in held_out}


def batch_of(items):
    """<bos> prompt answer <eos>, loss on the answer tokens only (all items have one length)."""
    ids, labels = [], []
    for prompt, answer in items:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append([tok.bos_token_id, *p, *a])
        labels.append([-100] * (1 + len(p)) + a)
    return torch.tensor(ids), torch.tensor(labels)


@torch.no_grad()
def sort_accuracy(net):
    """Exact match of greedy answers on the held-out prompts."""
    net.eval()
    ids = torch.tensor([[tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]] for p, _ in held_out])
    out = net.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = [tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]
    return sum(a == t for a, (_, t) in zip(answers, held_out)) / len(held_out)


FACTS["sort_before"] = sort_accuracy(model)
print(f"held-out sort accuracy before fine-tuning: {FACTS['sort_before']:.2f}")
torch.manual_seed(0)
threads = torch.get_num_threads()
torch.set_num_threads(1)  # a model this small trains fastest on one thread (more only add overhead)
sorter_lr = 3e-3
optimizer = torch.optim.AdamW(model.parameters(), lr=sorter_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
steps = 150 if QUICK else 400
model.train()
for step in range(steps):
    items = []
    while len(items) < 64:
        ex = example()
        if ex[0] not in held_prompts:
            items.append(ex)
    ids, labels = batch_of(items)
    loss = model(input_ids=ids, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
torch.set_num_threads(threads)
FACTS["sort_after"] = sort_accuracy(model)
print(f"final training loss {loss.item():.3f}; held-out sort accuracy after: {FACTS['sort_after']:.2f}")

# %%
my_dir = work / "sorter"
model.save_pretrained(my_dir)
tok.save_pretrained(my_dir)
written = cl.export_moments(optimizer, model, my_dir / "export" / "exp_avg_sq.safetensors")
mine = cl.Moments.open(my_dir)
mine.validate(my_dir)
print(written.relative_to(work), mine)

# %% [markdown]
# The new expert is now exactly like a released one: line it up with the zoo's math
# expert and merge them, then score the merge on both skills. (Whether two experts
# merge well is what notebooks `02`–`05` diagnose; the numbers below are measured,
# not assumed. With a plain `torch.nn.Module` rather than an HF model the export is
# the same call; write the weights with `curvlens.write_model(state_dict, dir)`.)

# %%
pair = cl.Experts.from_dirs(zoo.base_dir, [zoo.expert_dirs["math"], my_dir], names=["math", "sorter"])
merged_pair = cl.merge(pair, "ota", ffg_density=0.3, epsilon=1e-26, fallback_to_base=True,
                             device=DEVICE, progress=False)
math_score = cl.zoo.evaluate(merged_pair.checkpoint, ["addition"], zoo=zoo, device=DEVICE)
net = AutoModelForCausalLM.from_pretrained(zoo.base_dir, dtype=torch.float32)
net.load_state_dict({n: merged_pair.checkpoint[n].float() for n in merged_pair.checkpoint.keys()})
scores_pair = {"merged addition": float(math_score["accuracy"].iloc[0]),
               "math alone addition": float(cl.zoo.evaluate(zoo.expert_dirs["math"], ["addition"], zoo=zoo,
                                                            device=DEVICE)["accuracy"].iloc[0]),
               "merged sort": sort_accuracy(net), "sorter alone sort": sort_accuracy(model)}
FACTS["pair_scores"] = scores_pair
print(f"merged math + sorter: addition accuracy {scores_pair['merged addition']:.2f} "
      f"(math expert alone: {scores_pair['math alone addition']:.2f}), "
      f"sort accuracy {scores_pair['merged sort']:.2f} (sorter alone: {scores_pair['sorter alone sort']:.2f})")

# %% [markdown]
# **Why the merge loses the math expert.** Two experts trained differently have
# moments at different *levels* and edits of different *sizes*, and both decide a
# curvature-weighted merge: OTA weights expert $i$ by $v_i^{1/2}$ entry by entry
# (`normalise: none`, the default, compares the raw levels), and any average of
# task vectors is dominated by the larger edit. Measured on this pair, with the
# merge re-run two other ways:

# %%
levels = cl.moment_levels(pair, device="cpu", progress=False).set_index("expert")["mean_v"]
edits = cl.relative_edit(cl.edit_norms(pair, device="cpu", progress=False)).set_index("expert")["relative_edit"]
share_sum, n_entries = 0.0, 0
for g in pair.iter_tensors(device="cpu", experts=False, base=False, progress=False):
    w_math, w_sort = (v.double().sqrt() for v in g.moments)      # OTA's weights, p = 1/2, no masks
    share_sum += float((w_sort / (w_sort + w_math).clamp_min(1e-300)).sum())
    n_entries += g.moments[0].numel()
alternatives = {}
for label, method, params in [("OTA+FFG, normalise: global", "ota", {"ffg_density": 0.3, "epsilon": 1e-26,
                                                                    "fallback_to_base": True, "normalise": "global"}),
                              ("plain average of the two", "linear", {})]:
    alt = cl.merge(pair, method, device=DEVICE, progress=False, **params)
    alternatives[label] = float(cl.zoo.evaluate(alt.checkpoint, ["addition"], zoo=zoo, device=DEVICE)["accuracy"].iloc[0])
level_ratio = float(levels["sorter"] / levels["math"])
edit_ratio = float(edits["sorter"] / edits["math"])
FACTS["collapse"] = {"level_ratio": level_ratio, "edit_ratio": edit_ratio, "sorter_weight_share": share_sum / n_entries,
                     "levels": levels.to_dict(),
                     "relative_edit": edits.to_dict(), "alternatives": alternatives,
                     "zoo_lr": zoo.config.expert_lr, "zoo_steps": zoo.config.expert_steps,
                     "sorter_lr": sorter_lr, "sorter_steps": steps,
                     "edit_dominates": max(alternatives.values()) < 0.5 * scores_pair["math alone addition"]}
display(Markdown(
    f"The sorter was trained at learning rate {sorter_lr:g} for {steps} steps, the zoo's experts at "
    f"{zoo.config.expert_lr:g} for {zoo.config.expert_steps}. Its mean $v$ is {level_ratio:.0f}× the math expert's, "
    f"so with $p = 1/2$ it carries {share_sum / n_entries:.0%} of OTA's weight on the average entry; and it moved "
    f"its weights {edits['sorter']:.1%} of their norm against the math expert's {edits['math']:.1%} "
    f"({edit_ratio:.0f}× further). Normalising the levels away (`normalise: global`) gives addition "
    f"{alternatives['OTA+FFG, normalise: global']:.2f}, and even the plain average of the two gives "
    f"{alternatives['plain average of the two']:.2f}: "
    + ("the level of $v$ is not the whole story; the sorter's edit is so much larger than the math expert's "
       "that every average of the two is the sorter's. "
       if FACTS["collapse"]["edit_dominates"] else
       "removing the level difference recovers much of the math expert's skill. ")
    + "Experts meant to be merged should come from comparable runs: check `cl.moment_levels` and "
      "`cl.relative_edit` (notebook 02, the regime table of `curvlens analyze`) before merging."))

# %% [markdown]
# ### Experts trained differently
#
# The levels above come from the runs: Adam's $v$ tracks the squared gradients of
# its run, and a short run leaves it further below that level (Adam's bias factor
# $1/(1-\beta_2^t)$ is larger). Displayed in a notebook, `Experts` shows a
# preflight per expert — the moments' source and
# format, step, betas, raw $v$ level and bias factor, and the relative size of each
# edit — and `cl.merge` (and `curvlens merge`, which prints the same table) warns
# when a curvature-weighted method would follow the levels:

# %%
print(f"math expert: lr {zoo.config.expert_lr:g}, {zoo.config.expert_steps} steps; "
      f"sorter: lr {optimizer.param_groups[0]['lr']:g}, {steps} steps")
pair

# %% [markdown]
# The two remedies the warning points at: `normalise: global` divides each expert's
# curvature weights by their mean per tensor, so only the *shape* of $v$ is
# compared; `bias_correction=True` divides each $v$ by $1-\beta_2^t$ (step and
# $\beta_2$ are in the files). Each merge below is scored on both skills:

# %%
def merge_scores(experts, **params):
    """OTA + FFG of ``experts``: addition and sort accuracy, and whether it warned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = cl.merge(experts, "ota", ffg_density=0.3, epsilon=1e-26, fallback_to_base=True,
                       device=DEVICE, progress=False, **params)
    add = cl.zoo.evaluate(res.checkpoint, ["addition"], zoo=zoo, device=DEVICE)["accuracy"].iloc[0]
    merged_net = AutoModelForCausalLM.from_pretrained(zoo.base_dir, dtype=torch.float32)
    merged_net.load_state_dict({n: res.checkpoint[n].float() for n in res.checkpoint.keys()})
    warned = any("differ in level" in str(w.message) for w in caught)
    return {"addition": add, "sort": sort_accuracy(merged_net), "level warning": warned}


corrected = cl.Experts.from_dirs(zoo.base_dir, [zoo.expert_dirs["math"], my_dir], names=["math", "sorter"],
                                 bias_correction=True)
remedies = pd.DataFrame({
    "raw moments": merge_scores(pair),
    "normalise: global": merge_scores(pair, normalise="global"),
    "bias_correction": merge_scores(corrected),
    "both": merge_scores(corrected, normalise="global"),
}).T
raw_view, corrected_view = cl.preflight(pair).set_index("expert"), cl.preflight(corrected).set_index("expert")
math_alone = cl.zoo.evaluate(zoo.expert_dirs["math"], ["addition"], zoo=zoo, device=DEVICE)["accuracy"].iloc[0]
FACTS.update(level_ratio_raw=float(raw_view["level_ratio"].max()),
             level_ratio_corrected=float(corrected_view["level_ratio"].max()),
             edit_ratio=float(raw_view["edit_ratio"].max()), math_alone=float(math_alone),
             remedies={k: {c: (bool(v) if c == "level warning" else float(v)) for c, v in row.items()}
                       for k, row in remedies.to_dict("index").items()})
print(f"levels (sorter / math): raw {FACTS['level_ratio_raw']:.1f}x, bias-corrected "
      f"{FACTS['level_ratio_corrected']:.1f}x; relative edits: {FACTS['edit_ratio']:.1f}x; "
      f"math expert alone: addition {math_alone:.2f}")
remedies

# %%
best_remedy = max(FACTS["remedies"], key=lambda k: FACTS["remedies"][k]["addition"])
FACTS["remedy_recovers"] = FACTS["remedies"][best_remedy]["addition"] >= 0.5 * FACTS["math_alone"]
warned = [k for k, r in FACTS["remedies"].items() if r["level warning"]]
display(Markdown(
    f"The warning fired for {', '.join(warned) or 'none of the merges'} (levels {FACTS['level_ratio_raw']:.0f}x apart "
    f"raw, {FACTS['level_ratio_corrected']:.0f}x bias-corrected) and stayed silent under `normalise: global`, "
    "which divides the levels out. "
    + (f"The best remedy ({best_remedy}) brings addition back to {FACTS['remedies'][best_remedy]['addition']:.2f} "
       f"of the math expert's {FACTS['math_alone']:.2f}."
       if FACTS["remedy_recovers"] else
       f"But no remedy gives addition back (best: {best_remedy}, {FACTS['remedies'][best_remedy]['addition']:.2f} "
       f"against {FACTS['math_alone']:.2f} for the math expert alone): the sorter's edit is "
       f"{FACTS['edit_ratio']:.0f}x larger, relative to the base, than the math expert's, and no weighting of the "
       "moments makes two edits of such different sizes merge as one. The preflight's `relative_edit` column (and "
       "the warning's last sentence) says so before you merge; the fix is upstream: train the experts you mean to "
       "merge with comparable recipes, or give the large edit a smaller weight.")))

# %% [markdown]
# ## 3. Merge configs: mergekit and the OTA authors' fork
#
# curvlens reads the YAML of mergekit and of the OTA fork. Paths are local and
# relative to the config file. To keep the example realistic, the zoo's dirs are
# linked into the work dir as `./base`, `./math`, ... as a download would lay them out.

# %%
for n, src in [("base", zoo.base_dir), *zoo.expert_dirs.items()]:
    (work / n).symlink_to(src, target_is_directory=True)
sorted(p.name for p in work.iterdir())

# %% [markdown]
# **The paper's OTA + FFG config, as written for the fork**: per-model
# `preconditioner_path` and an absolute saliency threshold `precond_threshold`. Nobody
# can guess an absolute threshold, so curvlens adds `ffg_density` (a model-wide
# density turned into the threshold by a first streaming pass). To show that a fork
# config runs unchanged *and* means the same thing, we take the thresholds that
# `ffg_density: 0.3` produces and write them into a fork-style config:

# %%
by_density = cl.merge(experts, "ota", ffg_density=0.3, epsilon=1e-26, fallback_to_base=True,
                            device=DEVICE, progress=False)
thresholds = dict(zip(by_density.thresholds["expert"], by_density.thresholds["threshold"]))
models_yaml = "\n".join(
    f"""  - model: ./{n}
    parameters:
      preconditioner_path: ./{n}/export/exp_avg_sq.safetensors
      precond_threshold: {thresholds[n]!r}""" for n in names)
fork_yaml = f"""\
merge_method: ota
base_model: ./base
models:
{models_yaml}
parameters:
  power: 0.5
  epsilon: 1.0e-26
  normalise: none
  fallback_to_base: true
  rank1_approx: false
dtype: bfloat16
"""
(work / "ota_fork.yml").write_text(fork_yaml)
print(fork_yaml)

# %%
cfg = cl.load_merge_config(work / "ota_fork.yml")
print("method:", cfg.method, "| experts:", cfg.names, "| dtype:", cfg.dtype)
print("parameters:", {k: v for k, v in cfg.params.items()})
by_fork = cl.merge(cfg.experts(), cfg.method, device=DEVICE, progress=False, **cfg.params)
diff = max(float((by_fork.checkpoint[n] - by_density.checkpoint[n]).abs().max()) for n in by_density.checkpoint.keys())
FACTS["fork_vs_density_max_diff"] = diff
print(f"fork config (precond_threshold) vs ffg_density=0.3: max |difference| = {diff:.1e}")

# %% [markdown]
# The curvlens form of the same merge is shorter: one density for all experts, and
# the moments found in each model dir.

# %%
(work / "ota_ffg.yml").write_text("""\
merge_method: ota
base_model: ./base
models:
  - model: ./math
  - model: ./code
  - model: ./instruct
  - model: ./knowledge
parameters:
  ffg_density: 0.3
  epsilon: 1.0e-26
  fallback_to_base: true
dtype: bfloat16
""")

# %% [markdown]
# **A mergekit config** for a method mergekit also has (here TIES) runs as it is and
# gives the same tensors as mergekit 0.1.5 (see `docs/merge_methods.md`). Merging to
# disk (`out=`) streams each merged tensor into an HF model dir, written atomically,
# with the config and a per-tensor report saved beside the weights:

# %%
(work / "ties.yml").write_text("""\
merge_method: ties
base_model: ./base
models:
  - model: ./math
    parameters: {weight: 1.0, density: 0.5}
  - model: ./code
    parameters: {weight: 1.0, density: 0.5}
  - model: ./instruct
    parameters: {weight: 1.0, density: 0.5}
  - model: ./knowledge
    parameters: {weight: 1.0, density: 0.5}
parameters:
  normalize: true
dtype: bfloat16
""")
cfg = cl.load_merge_config(work / "ties.yml")
result = cl.merge(cfg.experts(), cfg.method, work / "merged-ties", dtype=cfg.dtype, device=DEVICE, progress=False,
                  writing=cl.WriteOptions(config_text=cfg.text), **cfg.params)
for p in sorted(result.path.iterdir()):
    print(f"{p.name:30s} {p.stat().st_size / 1024:8.1f} KiB")

# %% [markdown]
# The output is a regular HF model dir. Its tensors are stored in bf16, as the config
# asked; `from_pretrained` loads them in the dtype you request:

# %%
print("stored dtypes:", sorted({str(result.checkpoint.dtype(n)) for n in result.checkpoint.keys()}))
loaded = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.bfloat16)
print(type(loaded).__name__, "loaded as", next(loaded.parameters()).dtype)
cl.zoo.evaluate(result.path, zoo=zoo, device=DEVICE)

# %% [markdown]
# **From the command line** the same config runs with
#
# ```bash
# curvlens merge ota_ffg.yml merged-ota --device auto     # add --overwrite to replace merged-ota
# curvlens methods ota                                     # every parameter of a method
# ```
#
# Here we run exactly that command (via the current Python) on the config written
# above:

# %%
cmd = [sys.executable, "-m", "curvlens", "merge", "ota_ffg.yml", "merged-ota", "--device", DEVICE, "--quiet"]
proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
print("$ curvlens merge ota_ffg.yml merged-ota --device", DEVICE, "--quiet")
print(proc.stdout or proc.stderr)
assert proc.returncode == 0, proc.stderr
FACTS["cli_returncode"] = proc.returncode
print((work / "merged-ota" / "curvlens_merge.yml").read_text())

# %% [markdown]
# ## Task heads, poolers: tensors that are not part of the shared model
#
# Experts fine-tuned as classifiers each carry their own head (`classifier.*`, and a
# pooler only the sequence-classification head reads); a token-classification
# expert has no pooler at all. Merged like any tensor, heads are mixed across tasks
# and dominate every model-level number. Leave them out of every pass with
# `exclude=` (they then need not line up across the models), or say per tensor
# what a merge does with `tensors=` — `"drop"`, `"base"`, an expert's name, or
# `"merge"`; the YAML form is a `tensors:` list of `{filter, action}`. The zoo's
# experts are causal LMs with a shared `lm_head`; here we keep the base's `lm_head`
# and leave the embeddings out of an analysis, the same calls a classifier user
# makes with `"classifier"` and `"*.pooler.*"`:

# %%
kept = cl.merge(experts, "ota", ffg_density=0.3, epsilon=1e-26, fallback_to_base=True,
                tensors={"role:lm_head": "base"}, device=DEVICE, progress=False)
print(kept.report.groupby("source")["numel"].sum())
body = experts.without("role:embed")
print(body, "\n", len(body.tensor_names()), "of", len(experts.tensor_names()), "tensors in every pass")

# %% [markdown]
# ## DeepSpeed ZeRO and FSDP checkpoints
#
# Experts trained with DeepSpeed or PyTorch FSDP keep their Adam moments in shards,
# one file per rank. `cl.Moments.open` (and so `Experts.from_dirs`) reads them as they
# are, without DeepSpeed installed and without running any code from the files (a
# restricted unpickler admits only tensors, containers and a fixed list of plain
# classes), assembling each parameter's full fp32 `exp_avg_sq` from its pieces, one
# parameter at a time:
#
# | layout | what to point at |
# |---|---|
# | DeepSpeed ZeRO 1 / 2 (also "elastic") | the run dir or HF Trainer `checkpoint-N/` holding `latest` + `global_stepN/zero_pp_rank_R_mp_rank_00_optim_states.pt` + `mp_rank_00_model_states.pt`; or `global_stepN/`, or the `latest` file |
# | DeepSpeed ZeRO 3 | the same, with `zero_pp_rank_R_mp_rank_00_model_states.pt` per rank |
# | FSDP2 / FSDP1 via `torch.distributed.checkpoint` | the DCP dir (`.metadata` + `__R_0.distcp`) of `get_state_dict(model, optimizer)`, or a dir holding one `optimizer*/` DCP dir (accelerate's `optimizer_0/`) |
#
# The moments below come from checkpoints the real libraries wrote on CPU with two
# processes, checked into the tests (`tests/io/distributed/fixtures/`); the exact
# commands are in `tests/io/distributed/make_fixtures.sh`, e.g.
# `DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 tests/io/distributed/make_deepspeed.py --stage 3 --sub-group-size 100 --out zero3`
# and `torchrun --nproc_per_node=2 tests/io/distributed/make_fsdp2.py --out fsdp2`.
# Each reader describes its source in `Moments.metadata`:

# %%
fixtures = Path(cl.__file__).resolve().parents[1] / "tests" / "io" / "distributed" / "fixtures"
sources = {"ZeRO-1": "zero1", "ZeRO-2 elastic": "zero2_elastic", "ZeRO-3": "zero3", "FSDP2 (DCP)": "fsdp2"}
pd.DataFrame({label: cl.Moments.open(fixtures / rel).metadata for label, rel in sources.items()}).T.fillna("")

# %% [markdown]
# One training run (a ZeRO-2 run's live optimizer state) written as the paper's
# export, an HF Trainer `optimizer.pt`, a DeepSpeed dir and an FSDP-style DCP dir
# gives the same moments, bit for bit, and so the same analyses and merges:

# %%
run = fixtures / "same_run"
reference = cl.Moments.open(run / "a" / "paper")
for layout in ["trainer", "deepspeed", "dcp"]:
    m = cl.Moments.open(run / "a" / layout)
    same = all(torch.equal(m[n], reference[n]) for n in reference)
    print(f"{layout:9s} {m.metadata.get('format', 'torch.optim'):29s} identical to the export: {same}")
    assert same
# ## Score your merges with lm-eval
#
# Merges of real LLMs are scored with lm-evaluation-harness. `cl.evaluators.lm_eval(tasks)`
# is an evaluator with the zoo evaluator's contract, `evaluate(model_dir) -> {task:
# score, task_stderr: its standard error}`: pass it to `cl.sweep` (serially or on a
# dask cluster), `cl.greedy_soup`, `cl.pareto_front`, or `cl.graft_sweep` (with
# `base=`). It runs lm-eval's Python API in this process, offline, with one model kept
# loaded per process across a sweep; a task that cannot be scored is an error row,
# never the end of the sweep. Local task files (`include_path=`) are read as untrusted
# input: data files stay inside the task dir, no `!function` Python runs, templates
# render sandboxed. For a real model, e.g.
# `cl.evaluators.lm_eval(["arc_easy", "gsm8k"], metric={"arc_easy": "acc_norm",
# "gsm8k": "exact_match,strict-match"}, model_args="dtype=bfloat16")` (lm-eval's task
# data must be in the local `datasets` cache). From the shell:
# `curvlens eval MERGED_DIR... --tasks arc_easy --out scores/`.
#
# curvlens ships the demo zoo's four capabilities as local lm-eval tasks
# (`cl.evaluators.zoo_tasks(zoo)`), so the zoo can be scored through the harness too;
# here the OTA+FFG merge written above (stored in bf16, scored in fp32 as the zoo
# evaluator scores it), against the base:

# %%
import importlib.util

from IPython.display import display

if importlib.util.find_spec("lm_eval") is None:
    print("lm-eval is not installed (pip install 'curvlens[eval]'); this section is skipped")
else:
    # the merge is stored in bf16; the zoo evaluator computes in fp32, and so does this
    harness = cl.evaluators.lm_eval(list(zoo.capabilities.values()), include_path=cl.evaluators.zoo_tasks(zoo),
                                    device=DEVICE, model_args={"dtype": "float32"})
    scores = cl.evaluators.score_models([zoo.base_dir, work / "merged-ota"], harness, names=["base", "OTA+FFG"])
    merged_scores = harness(str(work / "merged-ota"))
    zoo_scores = zoo.evaluator(device=DEVICE)(str(work / "merged-ota"))
    # the harness's task files reproduce the zoo evaluator item for item
    assert {k: v for k, v in merged_scores.items() if not k.endswith("_stderr")} == zoo_scores
    print("harness == zoo evaluator on the merge:", zoo_scores)
    cl.views.harness_scores(scores, title="lm-eval scores (± standard error)")
    display(scores[scores["selected"]][["model", "task", "metric", "value", "stderr", "n", "load"]])

# %% [markdown]
# ## 4. Memory and GPU
#
# * **Streaming.** Every pass (analysis or merge) reads one tensor name at a time from
#   the base, every expert and every moments file, computes, emits a small result or
#   a merged tensor, and releases it; the next tensor is read in a background thread
#   while the current one is processed, when both fit in 1 GiB. Peak memory is about
#   the largest tensor times $4\,(1 + 2N)$ bytes (base + $N$ experts + $N$ moments, all
#   in fp32 on the device), plus the next tensor when it is prefetched, whatever the
#   model size. OTA + FFG with `ffg_density` makes one extra streaming pass for the
#   model-wide thresholds (a bounded-memory sketch, not a sort of the whole model).
# * **Device.** `device="auto"` (every function, and `--device` of the CLI) runs the
#   math on CUDA when present; reads stay on the CPU and only scalars or the merged
#   tensor come back. On a GPU the merge is usually bound by disk reads.
# * **dtype.** The math is always fp32; `dtype=` (YAML `dtype:`) sets what is written,
#   `bfloat16` halves the output. Moments are read as fp32.
# * **Disk.** Second moments are fp32, twice a bf16 model: five 8B experts need about
#   5 × 32 GB of moments. Rank-1 moments (`rank1_approx: true`) change the merge, not
#   what is read; `moment_compression` shows what they would save if stored.
#
# The estimate for this zoo and for five Llama-3.1-8B experts (shapes only, nothing
# is read):

# %%
def peak_bytes(shapes, n_experts):
    """Largest tensor group in fp32: base + experts + moments, as the stream holds it."""
    largest = max(int(torch.Size(s).numel()) for s in shapes)
    return largest * 4 * (1 + 2 * n_experts), largest


desc = experts.describe()
zoo_peak, zoo_largest = peak_bytes(desc["shape"], len(experts))
h, inter, vocab, kv, layers = 4096, 14336, 128256, 1024, 32  # Llama-3.1-8B
llama = [(vocab, h), (vocab, h)] + layers * [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
llama_peak, llama_largest = peak_bytes(llama, 5)
total_8b = sum(torch.Size(s).numel() for s in llama)
FACTS.update(llama_peak_gb=llama_peak / 1e9, llama_moments_gb=5 * total_8b * 4 / 1e9, zoo_peak_gb=zoo_peak / 1e9)
pd.DataFrame({
    "parameters": [int(desc["numel"].sum()), total_8b],
    "largest tensor": [zoo_largest, llama_largest],
    "experts": [len(experts), 5],
    "peak working set (GB)": [zoo_peak / 1e9, llama_peak / 1e9],
    "moments on disk (GB)": [len(experts) * int(desc["numel"].sum()) * 4 / 1e9, 5 * total_8b * 4 / 1e9],
}, index=["this zoo", "5 x Llama-3.1-8B"])

# %%
# device="auto" picks CUDA when present, else the CPU
print("device='auto' resolves to:", "cuda" if torch.cuda.is_available() else "cpu")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")

# %% [markdown]
# Clean up the work dir (the zoo's cache is left alone):

# %%
shutil.rmtree(work)

# %% [markdown]
# ## What this shows

# %%
c = FACTS["collapse"]
display(Markdown(
    f"The three layouts of the same moments (the paper's `export/`, a raw `optimizer.pt`, a Trainer dir) read "
    f"back identically (largest difference {max(FACTS['layout_max_diff'].values()):.1e}); bias correction "
    f"multiplied $v$ by {FACTS['bias_factor']:.3f}, the formula's $1/(1-\\beta_2^t)$ = {FACTS['bias_formula']:.3f} "
    f"at step {FACTS['moments_step']}. The fork's absolute `precond_threshold` and curvlens' `ffg_density` gave "
    f"merges {FACTS['fork_vs_density_max_diff']:.1e} apart, and the `curvlens merge` command exited with "
    f"{FACTS['cli_returncode']}. A new expert trained here went from {FACTS['sort_before']:.2f} to "
    f"{FACTS['sort_after']:.2f} held-out sort accuracy, and its exported moments merge like a released expert's; "
    f"but merged with the math expert it took addition from {FACTS['pair_scores']['math alone addition']:.2f} to "
    f"{FACTS['pair_scores']['merged addition']:.2f}, because it came from another regime ({c['level_ratio']:.0f}× "
    f"the level of $v$, {c['edit_ratio']:.0f}× the edit). The preflight saw it before the merge: the level "
    f"warning fired on the raw moments ({FACTS['level_ratio_raw']:.0f}× apart) and after bias correction "
    f"({FACTS['level_ratio_corrected']:.0f}×), and no remedy brought addition back (best "
    f"{max(r['addition'] for r in FACTS['remedies'].values()):.2f} against {FACTS['math_alone']:.2f} for the math "
    f"expert alone) because the edits differ {FACTS['edit_ratio']:.0f}× in size. Five Llama-3.1-8B experts need about "
    f"{FACTS['llama_peak_gb']:.0f} GB of working memory for one streamed merge and "
    f"{FACTS['llama_moments_gb']:.0f} GB of moments on disk."))
