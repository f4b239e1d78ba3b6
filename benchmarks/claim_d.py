"""Why does OTA+FFG lose to TIES on the zoo and win on real experts? Claim (d), measured.

For each seed of a demo zoo (and, with ``--real ROOT``, the MiniLM tier of
``tests/real``), merges the experts with TIES (density 0.5) and OTA+FFG (density
0.3, as the demo), plus the candidates' controls, and reports OTA+FFG - TIES on
the pooled gain kept with its 95% interval (paired bootstrap over items), under:

* ``shared head``: the zoo as the demo merges it: the LM head and the embeddings
  merged like any tensor, every capability read through the merged head;
* ``own head``: the same merged body, each capability scored with its own
  expert's ``lm_head`` and ``embed_tokens`` (as the real tier keeps each task's
  classifier);
* ``normalised v``: OTA+FFG with ``normalise: global`` (each expert's v**p over
  its own mean: the level spread of v taken out);
* real tier ``heads kept`` / ``heads merged``: the MiniLM experts with each
  task's own classifier, and with classifier and pooler merged like any tensor.

and the candidate quantities: relative edit, the level spread of v (largest
over smallest mean v), the share of never-updated entries (v == 0) and of
all-zero rows, and the evaluation size.

    python benchmarks/claim_d.py --zoo quick --seeds 0 1 2 [--real /tmp/real-tier] --out /tmp/claim_d

(``--real`` needs the real tier's extra: ``pip install -e ".[real]"``.)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import curvlens as cl
from curvlens.math.bootstrap import interval
from curvlens.studies.findings_stats import merge_statistics
from curvlens.studies.item_bootstrap import ItemBootstrap, pool_resamples

TIES = ("ties", {"density": 0.5})
FFG = ("ota", {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True})
FFG_NORM = ("ota", {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True, "normalise": "global"})
HEAD_ROLES = ("lm_head", "embed")


def zero_shares(experts) -> dict:
    """Per expert: the share of entries with v == 0, and of 2-D rows whose v is all 0."""
    ent = {e: [0, 0] for e in experts.names}
    rows = {e: [0, 0] for e in experts.names}
    for g in experts.iter_tensors(device="cpu", base=False, progress=False):
        for e, v in zip(experts.names, g.moments):
            ent[e][0] += int((v == 0).sum())
            ent[e][1] += v.numel()
            if v.dim() == 2:
                rows[e][0] += int((v == 0).all(1).sum())
                rows[e][1] += v.shape[0]
    return {"zero_v_share": float(np.mean([a / b for a, b in ent.values()])),
            "zero_row_share": float(np.mean([a / b for a, b in rows.values() if b]))}


def quantities(experts, n_eval: dict) -> dict:
    lev = cl.moment_levels(experts, device="cpu", progress=False)
    rel = cl.relative_edit(cl.edit_norms(experts, device="cpu", progress=False))["relative_edit"]
    return {"relative_edit": f"{rel.min():.3f}-{rel.max():.3f}",
            "v_level_spread": float(lev["mean_v"].max() / lev["mean_v"].min()),
            **zero_shares(experts), "eval_items": f"{min(n_eval.values())}-{max(n_eval.values())}"}


def diff(table: pd.DataFrame, caps: dict, a: str, b: str, boot: ItemBootstrap) -> dict:
    """a - b on the pooled and the worst gain kept, observed and 95% interval."""
    st = merge_statistics(table, caps, [a, b], boot)
    seeds = [k for k in st if k != "left_out"]
    out = {}
    for stat in ("pooled_gain", "worst_gain"):
        per = {s: st[s][a][stat] - st[s][b][stat] for s in seeds}
        lo, hi = interval(pool_resamples(per.values()))
        out[stat] = (float(np.mean([x[0] for x in per.values()])), lo, hi)
    out["a"] = float(np.mean([st[s][a]["pooled_gain"][0] for s in seeds]))
    out["b"] = float(np.mean([st[s][b]["pooled_gain"][0] for s in seeds]))
    return out


def own_head_rows(zoo, experts, merged: dict) -> pd.DataFrame:
    """Each merge scored capability by capability with that capability's expert's head and embeddings."""
    heads = [n for n in experts.tensor_names() if cl.param_role(n)[1] in HEAD_ROLES]
    rows = []
    for label, res in merged.items():
        body = dict(res.checkpoint.items())
        for e, cap in zoo.capabilities.items():
            own = cl.Checkpoint.open(zoo.expert_dirs[e])
            state = {**body, **{n: own[n] for n in heads}}
            df = zoo.evaluate(state, [cap], device="cpu")
            rows += [{"model": label, "capability": r.capability, "accuracy": r.accuracy, "n": r.n,
                      "correct": r.correct} for r in df.itertuples()]
    return pd.DataFrame(rows)


def zoo_seed(name: str, seed: int, boot: ItemBootstrap) -> list[dict]:
    zoo = cl.zoo.build(name, seed=seed, progress=False)
    experts = zoo.experts()
    caps = dict(zoo.capabilities)
    merged = {"TIES": cl.merge(experts, TIES[0], progress=False, **TIES[1]),
              "OTA+FFG": cl.merge(experts, FFG[0], progress=False, **FFG[1]),
              "OTA+FFG normalised v": cl.merge(experts, FFG_NORM[0], progress=False, **FFG_NORM[1])}
    table = zoo.score(merged)
    ref = table[table["model"].isin(["base", *(f"expert: {e}" for e in caps)])]
    own = pd.concat([ref, own_head_rows(zoo, experts, {k: merged[k] for k in ("TIES", "OTA+FFG")})])
    q = quantities(experts, table.groupby("capability")["n"].first().to_dict())
    q_body = quantities(experts.without([f"role:{r}" for r in HEAD_ROLES]),
                        table.groupby("capability")["n"].first().to_dict())
    out = []
    for setting, t, a in (("shared head", table, "OTA+FFG"), ("own head", own, "OTA+FFG"),
                          ("normalised v", table, "OTA+FFG normalised v")):
        d = diff(t, caps, a, "TIES", boot)
        out.append({"experts": f"{name} zoo seed {seed}", "setting": setting, "OTA+FFG": d["a"], "TIES": d["b"],
                    "pooled diff": d["pooled_gain"], "worst diff": d["worst_gain"], **q,
                    "zero_v_share (body)": q_body["zero_v_share"]})
    return out


def real_rows(root: Path, boot: ItemBootstrap) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.real
    from tests.real.minilm import build_experts
    from tests.real.study import open_experts, score

    zoo = build_experts(root)
    tasks = list(zoo["experts"])
    out = []
    for setting, heads, tasks_ in (("heads kept (4 tasks)", False, tasks),
                                   ("heads merged (3 seqcls tasks)", True,
                                    [t for t in tasks if zoo["arch"][t] == "seqcls"]),
                                   ("heads kept (3 seqcls tasks)", False,
                                    [t for t in tasks if zoo["arch"][t] == "seqcls"])):
        experts = open_experts(zoo, tasks_, heads=heads)
        merged = {"TIES": cl.merge(experts, TIES[0], progress=False, **TIES[1]),
                  "OTA+FFG": cl.merge(experts, FFG[0], progress=False, **FFG[1])}
        table = score(zoo, merged, tasks_, own_heads=not heads)
        caps = {t: t for t in tasks_}
        d = diff(table, caps, "OTA+FFG", "TIES", boot)
        q = quantities(experts, {t: 200 for t in tasks_})
        out.append({"experts": "real MiniLM", "setting": setting, "OTA+FFG": d["a"], "TIES": d["b"],
                    "pooled diff": d["pooled_gain"], "worst diff": d["worst_gain"], **q,
                    "zero_v_share (body)": q["zero_v_share"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="quick", choices=["quick", "default"])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--real", type=Path, default=None, help="root of the real tier (built there if absent)")
    ap.add_argument("--out", type=Path, default=Path("claim_d"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    boot = ItemBootstrap()
    rows = []
    for seed in a.seeds:
        t0 = time.perf_counter()
        rows += zoo_seed(a.zoo, seed, boot)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    if a.real is not None:
        rows += real_rows(a.real, boot)
    df = pd.DataFrame(rows)
    fmt = lambda t: f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]"  # noqa: E731
    shown = df.assign(**{c: df[c].map(fmt) for c in ("pooled diff", "worst diff")})
    a.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out / "claim_d.csv", index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(shown.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
