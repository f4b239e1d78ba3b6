"""The OTA authors' fork's configs run unchanged and give the fork's tensors.

The reference below re-derives the fork's merge (``mergekit/merge_methods/ota.py``
of pmahdavi/ota-merge, newest version) on whole tensors, independently of
curvlens's blocked kernel. The fork's own outputs, made by its own code, are
compared in ``test_ota_fork_fixtures.py`` (checked-in fixtures, no checkout
needed); with ``CURVLENS_OTA_FORK=/path/to/ota-merge`` (a checkout of the fork)
the fork's ``OTAMergeTask`` is also run here, on this module's cases.
"""
import json
import os
import sys
import types

import pytest
import torch
import yaml

from curvlens import Checkpoint, CurvlensError
from curvlens.cli import main
from curvlens.config.merge import merge
from curvlens.config.merge_config import load_merge_config
from tests.conftest import make_tiny_zoo

KW = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork-zoo")
    base, dirs, weights, moments = make_tiny_zoo(root, n_experts=2)
    base_w = dict(Checkpoint.open(base).items())
    return root, base, dirs, weights, moments, base_w


def _config(root, base, dirs, params, per_model=None, **top):
    per_model = per_model or [{} for _ in dirs]
    cfg = {"merge_method": "ota", "base_model": base.name,
           "models": [{"model": base.name}]  # the fork's configs may list the base: left out
           + [{"model": d.name, "parameters": {"weight": 1.0,
                                               "preconditioner_path": f"{d.name}/export/exp_avg_sq.safetensors",
                                               **pm}} for d, pm in zip(dirs, per_model)],
           "parameters": params, "dtype": "float32", **top}
    path = root / f"cfg{abs(hash(repr(cfg)))}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------- the fork, re-derived
def _hybrid(t, name):
    if t.numel() == 0:
        return 0.0
    if name in ("lm_head.weight", "model.embed_tokens.weight"):
        return float(t.norm(dim=0).max() / torch.tensor(float(t.shape[0])).sqrt()) if t.ndim == 2 else float("nan")
    if t.ndim == 2:
        return float(torch.tensor(t.shape[1] / t.shape[0]).sqrt() * torch.linalg.matrix_norm(t, ord=2))
    if t.ndim == 1:
        return float(t.pow(2).mean().sqrt())
    return float("nan")


def fork_tensor(name, base, experts, vs, p, per_model):
    eps, n = float(p.get("epsilon", 1e-8)), len(experts)
    tau = torch.stack([e.float() - base.float() for e in experts])
    W, masks = [], []
    for i, v in enumerate(vs):
        v = v.float()
        r = per_model[i].get("rank")
        if r and v.ndim == 2 and not ("embed_tokens" in name or "lm_head" in name):
            U, S, Vh = torch.linalg.svd(v, full_matrices=False)
            v = torch.relu(U[:, :r] @ torch.diag(S[:r]) @ Vh[:r])
        t = per_model[i].get("precond_threshold", p.get("precond_threshold"))
        m = None if t is None else (v * tau[i] ** 2 >= float(t))
        w = v.pow(float(p.get("power", 0.5))) + eps
        W.append(w if m is None else w * m)
        masks.append(torch.ones_like(v, dtype=torch.bool) if m is None else m)
    W = torch.stack(W)
    den = W.sum(0)
    if p.get("rescale"):
        for i in range(n):
            whole, masked = _hybrid(tau[i], name), tau[i] * masks[i]
            if whole != whole:
                tau[i] = masked
                continue
            part = _hybrid(masked, name)
            tau[i] = masked * (whole / part) if part == part and part > whole * 1e-6 else 0 * tau[i]
    how = p.get("masked_task_vector_merge_method", "precond")
    if how == "linear":
        delta = tau.mean(0)
    elif how == "ties":
        d = p.get("ties_density")
        if d is not None and d < 1:
            for i in range(n):
                k = int(d * tau[i].numel())
                cut = tau[i].abs().flatten().sort(descending=True).values[k - 1] if k else float("inf")
                tau[i] = tau[i] * (tau[i].abs() >= cut)
        sign = torch.sign(tau.sum(0))
        sign[sign == 0] = 1
        delta = (tau * (torch.sign(tau) == sign)).mean(0)
    else:
        delta = (W * tau).sum(0) / den
    out = base.float() + delta
    if any(pm.get("precond_threshold") is not None for pm in per_model) or p.get("precond_threshold") is not None:
        fallback = base.float() if p.get("fallback_to_base") else torch.stack([e.float() for e in experts]).mean(0)
        out = torch.where(den <= n * eps * 1.1, fallback, out)
    return out


FORK_CASES = [
    ({"epsilon": 1e-24, "fallback_to_base": True, "rescale": True, "approximate_norm": False,
      "masked_task_vector_merge_method": "linear"}, [{"precond_threshold": 3e-5}, {"precond_threshold": 5e-5}]),
    ({"epsilon": 1e-24, "masked_task_vector_merge_method": "ties", "ties_density": 0.3,
      "precond_threshold": 2e-5}, None),
    ({"epsilon": 1e-24, "masked_task_vector_merge_method": "ties"}, None),
    ({"epsilon": 1e-24, "precond_threshold": 1e-6, "fallback_to_base": True}, [{"rank": 2}, {"rank": 2}]),
    ({"precond_threshold": 2e-5, "rescale": True}, None),
]


@pytest.mark.parametrize("params, per_model", FORK_CASES)
def test_fork_configs_give_the_forks_tensors(zoo, params, per_model):
    root, base, dirs, weights, moments, base_w = zoo
    cfg = load_merge_config(_config(root, base, dirs, params, per_model))
    assert cfg.names == ("expert0", "expert1")  # the listed base is left out
    assert any("weight" in n and "ignored" in n for n in cfg.notes)
    res = merge(cfg.experts(), cfg.method, **KW, **{k: v for k, v in cfg.merge_kwargs().items()
                                                   if k not in ("config_text",)})
    pm = per_model or [{}, {}]
    for name, got in res.checkpoint.items():
        want = fork_tensor(name, base_w[name], [weights[e][name] for e in ("expert0", "expert1")],
                           [moments[e][name] for e in ("expert0", "expert1")], params, pm)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7, msg=name)


def test_rank_is_skipped_for_embeddings_and_lm_head(zoo):
    root, base, dirs, *_ = zoo
    params = {"epsilon": 1e-24, "precond_threshold": 1e-6, "fallback_to_base": True}
    with_rank = load_merge_config(_config(root, base, dirs, params, [{"rank": 1}, {"rank": 1}]))
    without = load_merge_config(_config(root, base, dirs, params))
    a = merge(with_rank.experts(), "ota", **KW, **with_rank.params)
    b = merge(without.experts(), "ota", **KW, **without.params)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(a.checkpoint[name], b.checkpoint[name])
    assert not torch.equal(a.checkpoint["model.layers.0.mlp.up_proj.weight"],
                           b.checkpoint["model.layers.0.mlp.up_proj.weight"])


def test_notes_are_at_the_top_of_the_saved_config(zoo, tmp_path):
    root, base, dirs, *_ = zoo
    path = _config(root, base, dirs, {"epsilon": 1e-24, "masked_task_vector_merge_method": "ties"})
    assert main(["merge", str(path), str(tmp_path / "o"), "--device", "cpu", "--quiet"]) == 0
    saved = (tmp_path / "o" / "curvlens_merge.yml").read_text()
    assert saved.startswith("# curvlens: models[1].parameters.weight: ota has no weight; ignored")
    assert yaml.safe_load(saved)["parameters"]["masked_task_vector_merge_method"] == "ties"


@pytest.mark.parametrize("params, match", [
    ({"masked_task_vector_merge_method": "ties", "combine": "linear"}, "not both"),
    ({"ties_density": 0.5}, "needs masked_task_vector_merge_method: ties"),
    ({"masked_task_vector_merge_method": "mean"}, "masked_task_vector_merge_method"),
])
def test_fork_option_errors(zoo, params, match):
    root, base, dirs, *_ = zoo
    with pytest.raises(CurvlensError, match=match):  # when the config is read, or at the latest by merge
        cfg = load_merge_config(_config(root, base, dirs, params))
        merge(cfg.experts(), "ota", **KW, **cfg.params)


def test_ota_without_base_refuses_fork_task_vector_options(zoo):
    root, base, dirs, *_ = zoo
    cfg = {"merge_method": "ota", "models": [{"model": d.name} for d in dirs],
           "parameters": {"rescale": True}}
    (root / "nobase.yml").write_text(yaml.safe_dump(cfg))
    mc = load_merge_config(root / "nobase.yml")
    with pytest.raises(CurvlensError, match="need a base tensor"):
        merge(mc.experts(), "ota", **KW, **mc.params)


# ------------------------------------------------- the fork's own code, optional
def _fork_task_class(src):
    sys.path.insert(0, src)
    pkg = types.ModuleType("mergekit.merge_methods")
    pkg.__path__ = [os.path.join(src, "mergekit", "merge_methods")]  # skip its __init__ (all methods)
    sys.modules["mergekit.merge_methods"] = pkg
    from mergekit.architecture import WeightInfo
    from mergekit.common import ImmutableMap, ModelReference
    from mergekit.merge_methods.ota import OTAMergeTask

    return OTAMergeTask, WeightInfo, ImmutableMap, ModelReference


@pytest.mark.skipif(not os.environ.get("CURVLENS_OTA_FORK"), reason="set CURVLENS_OTA_FORK to a checkout of the fork")
@pytest.mark.parametrize("params, per_model", FORK_CASES)
def test_against_the_forks_own_code(zoo, params, per_model):
    OTAMergeTask, WeightInfo, ImmutableMap, ModelReference = _fork_task_class(os.environ["CURVLENS_OTA_FORK"])
    root, base, dirs, weights, moments, base_w = zoo
    cfg = load_merge_config(_config(root, base, dirs, params, per_model))
    res = merge(cfg.experts(), "ota", **KW, **cfg.params)
    pm = per_model or [{}, {}]
    refs = [ModelReference.parse(str(d)) for d in dirs]
    bref = ModelReference.parse(str(base))
    tp = ImmutableMap(data={r: ImmutableMap(data={"preconditioner_path": str(d / "export/exp_avg_sq.safetensors"),
                                                  **x}) for r, d, x in zip(refs, dirs, pm)})
    for name, got in res.checkpoint.items():
        task = OTAMergeTask.model_construct(
            gather_tensors=None, tensor_parameters=tp, epsilon=float(params.get("epsilon", 1e-8)),
            normalise_mode="none", precond_power=0.5, precond_threshold=params.get("precond_threshold"),
            weight_info=WeightInfo(name=name, is_embed=name in ("lm_head.weight", "model.embed_tokens.weight")),
            base_model_ref=bref, fallback_to_base=params.get("fallback_to_base", False),
            rescale=params.get("rescale", False), approximate_norm=False, rescale_relative_threshold=1e-6,
            masked_task_vector_merge_method=params.get("masked_task_vector_merge_method", "precond"),
            ties_density=params.get("ties_density"))
        task.model_post_init(None)
        tensors = {r: weights[e][name] for r, e in zip(refs, ("expert0", "expert1"))}
        tensors[bref] = base_w[name]
        assert torch.equal(got, task.execute(tensors)), name


def test_tokenizer_source_union_of_one_vocabulary(zoo, tmp_path):
    root, base, dirs, *_ = zoo
    vocab = {f"t{i}": i for i in range(16)}
    for d in [base, *dirs]:
        (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                      "added_tokens": []}))
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    path = _config(root, base, dirs, {"epsilon": 1e-24}, tokenizer_source="union")
    assert main(["merge", str(path), str(tmp_path / "o"), "--device", "cpu", "--quiet"]) == 0
    assert json.loads((tmp_path / "o" / "tokenizer.json").read_text())["model"]["vocab"] == vocab


def test_model_wide_density_with_rank_skips_embeddings_in_both_passes(zoo):
    # the selection pass and the merge must see the same (uncompressed) embedding moments,
    # else the merge's tie quotas do not add up and it raises
    root, base, dirs, *_ = zoo
    cfg = load_merge_config(_config(root, base, dirs, {"ffg_density": 0.3, "fallback_to_base": True},
                                    [{"rank": 1}, {"rank": 1}]))
    res = merge(cfg.experts(), "ota", **KW, **cfg.params)
    assert list(res.thresholds.kept) == [int(0.3 * n + 0.5) for n in res.thresholds.total]
    r = res.report
    for e, k in zip(res.thresholds.expert, res.thresholds.kept):  # the merge's masks keep exactly those
        assert round((r[f"kept_{e}"] * r.numel).sum()) == k
