import json

import pytest
import torch
import yaml

from curvlens import Checkpoint, CurvlensError, Experts
from curvlens.cli import main
from curvlens.math.methods import get_method
from curvlens.math.methods.registry import _REGISTRY
from curvlens.config.merge import merge
from curvlens.config.merge_config import load_merge_config
from curvlens.passes.thresholds import model_thresholds
from tests.conftest import make_tiny_zoo


@pytest.fixture
def zoo(tiny_zoo):
    base_dir, dirs, weights, moments = tiny_zoo
    return Experts.from_dirs(base_dir, dirs), tiny_zoo


def test_linear_in_memory_is_the_mean(zoo):
    ex, (_, _, weights, _) = zoo
    res = merge(ex, "linear", device="cpu", progress=False)
    for name in ex.tensor_names():
        want = torch.stack([w[name] for w in weights.values()]).mean(0)
        torch.testing.assert_close(res.checkpoint[name], want)
    assert list(res.report.columns[:4]) == ["name", "layer", "role", "numel"]
    assert {"kept_expert0", "all_masked", "delta_norm", "rel_delta"} <= set(res.report.columns)
    assert len(res.report) == len(ex.tensor_names())


def test_written_dir_round_trips_and_is_protected(zoo, tmp_path):
    ex, _ = zoo
    res = merge(ex, "ties", tmp_path / "out", device="cpu", progress=False, density=0.5)
    mem = merge(ex, "ties", device="cpu", progress=False, density=0.5)
    for n in ex.tensor_names():
        assert torch.equal(res.checkpoint[n], mem.checkpoint[n])
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors.index.json", "merge_report.csv", "curvlens_merge.yml"} <= files
    saved = yaml.safe_load((tmp_path / "out" / "curvlens_merge.yml").read_text())
    assert saved["merge_method"] == "ties" and saved["parameters"]["density"] == 0.5
    with pytest.raises(CurvlensError, match="already exists"):
        merge(ex, "linear", tmp_path / "out", device="cpu", progress=False)
    merge(ex, "linear", tmp_path / "out", device="cpu", progress=False, overwrite=True)
    assert yaml.safe_load((tmp_path / "out" / "curvlens_merge.yml").read_text())["merge_method"] == "linear"


def test_output_dtype_defaults_to_experts_and_can_be_set(tmp_path):
    base_dir, dirs, *_ = make_tiny_zoo(tmp_path, n_experts=2, dtype=torch.bfloat16)
    ex = Experts.from_dirs(base_dir, dirs)
    res = merge(ex, "task_arithmetic", device="cpu", progress=False)
    assert all(res.checkpoint.dtype(n) == torch.bfloat16 for n in res.checkpoint)
    res = merge(ex, "task_arithmetic", device="cpu", progress=False, dtype="float32")
    assert all(res.checkpoint.dtype(n) == torch.float32 for n in res.checkpoint)
    with pytest.raises(CurvlensError, match="dtype='float8'"):
        merge(ex, "linear", device="cpu", progress=False, dtype="float8")


def test_ota_ffg_density_becomes_model_wide_thresholds(zoo):
    ex, (_, _, weights, moments) = zoo
    res = merge(ex, "ota", device="cpu", progress=False, ffg_density=0.25, fallback_to_base=True)
    th = res.thresholds
    assert list(th.expert) == ex.names
    # exact model-wide check on this small model: top-25% of all saliencies
    names = ex.tensor_names()
    base = {n: ex.base[n] for n in names}
    for i, e in enumerate(ex.names):
        s = torch.cat([(moments[e][n] * (weights[e][n] - base[n]) ** 2).flatten() for n in names])
        # exact: the top round(0.25 N) scores, ties at the threshold split by the quota
        k = int(0.25 * s.numel() + 0.5)
        assert th.kept[i] == k and th.realized_density[i] == k / s.numel()
        above, equal = int((s > th.threshold[i]).sum()), int((s == th.threshold[i]).sum())
        assert above < k <= above + equal and th.tied[i] == equal
        kept = k
        # the report's kept fractions are the same masks
        r = res.report
        assert abs((r[f"kept_{e}"] * r.numel).sum() / r.numel.sum() - kept / s.numel()) < 1e-9
    # the merge is the per-tensor function with those thresholds
    fn = get_method("ota").fn
    for n in names[:4]:
        ties = [sel.ties(n) for sel in res.extra["selections"]]
        want = fn(base[n], [weights[e][n] for e in ex.names], [moments[e][n] for e in ex.names],
                  ffg_threshold=list(th.threshold), ffg_ties=ties, fallback_to_base=True)
        torch.testing.assert_close(res.checkpoint[n], want)
    # layer/role densities emerge: they differ across tensors
    assert res.report["kept_expert0"].std() > 0


def test_thresholds_per_expert_density_and_magnitude(zoo):
    ex, _ = zoo
    th = model_thresholds(ex, [0.1, 0.5, 1.0], criterion="magnitude", device="cpu", progress=False)
    assert list(th.density) == [0.1, 0.5, 1.0]
    assert list(th.kept) == [int(d * t + 0.5) for d, t in zip(th.density, th.total)]
    assert (th.realized_density - th.density).abs().max() <= 0.5 / th.total.min()
    with pytest.raises(CurvlensError, match="density for expert 'expert0' must be in"):
        model_thresholds(ex, 0.0, progress=False)


def test_dare_reproducible_per_seed(zoo):
    ex, _ = zoo
    a = merge(ex, "dare_ties", device="cpu", progress=False, density=0.5, seed=1).checkpoint
    b = merge(ex, "dare_ties", device="cpu", progress=False, density=0.5, seed=1).checkpoint
    c = merge(ex, "dare_ties", device="cpu", progress=False, density=0.5, seed=2).checkpoint
    n = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n])


# arcee_fusion is no average (it keeps only the expert's important edits): not listed;
# its copy rule is tests/math/test_peer_methods.py::test_arcee_fusion
@pytest.mark.parametrize("method", sorted(set(_REGISTRY) - {"arcee_fusion"}))
def test_copies_of_one_expert_return_it(tmp_path, method):
    m = get_method(method)
    base_dir, dirs, weights, _ = make_tiny_zoo(tmp_path, n_experts=1)
    k = min(3, m.max_experts or 3)  # as many copies as the method takes
    # karcher counts a base as one more model in the mean; passthrough takes none
    base = base_dir if m.allows_base and method != "karcher" else None
    ex = Experts.from_dirs(base, dirs * k, names=["a", "b", "c"][:k])
    # parameters under which "N copies" should give the copy back: unnormalised
    # sums take weight 1/N; random drops only in expectation, so density 1;
    # OTA+FFG: kept entries average identical edits, masked ones fall back to the mean
    params = {"task_arithmetic": {"weight": 1 / 3}, "dare_linear": {"density": 1.0, "weight": 1 / 3},
              "dare_ties": {"density": 1.0, "weight": 1 / 3}, "ota": {"ffg_density": 0.5},
              "breadcrumbs": {"weight": 1 / 3}, "breadcrumbs_ties": {"weight": 1 / 3},
              "della_linear": {"weight": 1 / 3}, "slerp": {"t": 1.0}}.get(method, {})
    res = merge(ex, method, device="cpu", progress=False, **params)
    for n in ex.tensor_names():
        torch.testing.assert_close(res.checkpoint[n], weights["expert0"][n], rtol=1e-5, atol=1e-6)


def test_method_needs(zoo, tiny_zoo):
    base_dir, dirs, *_ = tiny_zoo
    no_moments = Experts.from_dirs(base_dir, dirs, moments=False)
    with pytest.raises(CurvlensError, match="'ota' needs second moments; expert\\(s\\) \\['expert0'"):
        merge(no_moments, "ota", progress=False)
    no_base = Experts.from_dirs(None, dirs)
    with pytest.raises(CurvlensError, match="'ties' needs a base model"):
        merge(no_base, "ties", progress=False)
    with pytest.raises(CurvlensError, match="unknown merge method 'soup'.*'linear'"):
        merge(no_base, "soup", progress=False)
    with pytest.raises(CurvlensError, match="unknown parameter 'densty'"):
        merge(no_base, "linear", progress=False, densty=1)


def write_config(tmp_path, cfg):
    p = tmp_path / "merge.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_mergekit_config_matches_python_api(zoo, tmp_path):
    ex, (base_dir, dirs, *_) = zoo
    cfg = {"merge_method": "ties", "base_model": str(base_dir),
           "models": [{"model": str(base_dir)}]  # the base listed as a model: ignored, as mergekit
           + [{"model": str(d), "parameters": {"weight": w, "density": 0.4}} for d, w in zip(dirs, [1.0, 0.5, 2.0])],
           "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"}
    mc = load_merge_config(write_config(tmp_path, cfg))
    assert mc.names == ("expert0", "expert1", "expert2") and mc.params["weight"] == [1.0, 0.5, 2.0]
    from_cfg = merge(mc.experts(), mc.method, device="cpu", progress=False, dtype=mc.dtype, **mc.params)
    direct = merge(ex, "ties", device="cpu", progress=False, weight=[1.0, 0.5, 2.0], density=0.4)
    for n in ex.tensor_names():
        assert torch.equal(from_cfg.checkpoint[n], direct.checkpoint[n])


def test_ota_fork_config_with_preconditioner_paths(zoo, tmp_path):
    ex, (base_dir, dirs, *_) = zoo
    cfg = {"merge_method": "ota", "base_model": "base",
           "models": [{"model": d.name, "parameters": {
               "preconditioner_path": f"{d.name}/export/exp_avg_sq.safetensors"}} for d in dirs],
           "parameters": {"power": 0.5, "epsilon": 1e-26, "precond_threshold": 1e-7,
                          "fallback_to_base": True, "normalise": "none"},
           "dtype": "float32"}
    path = write_config(base_dir.parent, cfg)  # relative paths resolve against the config
    out = tmp_path / "merged"
    assert main([ "merge", str(path), str(out), "--device", "cpu", "--quiet"]) == 0
    direct = merge(ex, "ota", device="cpu", progress=False, power=0.5, epsilon=1e-26,
                   precond_threshold=1e-7, fallback_to_base=True)
    got = Checkpoint.open(out)
    for n in ex.tensor_names():
        assert torch.equal(got[n], direct.checkpoint[n])
    assert main(["merge", str(path), str(out), "--device", "cpu", "--quiet"]) == 2  # exists


@pytest.mark.parametrize("cfg,match", [
    ({"merge_method": "ties", "models": [{"model": "nope"}]}, "'nope' not found"),
    ({"merge_method": "ties", "modles": []}, "unknown key\\(s\\) \\['modles'\\]"),
    ({"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": []}}]},
     "must be a value, a list of values"),
    ({"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": [{"filtr": "mlp", "value": 1}]}}]},
     r"must be \{filter: SUBSTRING"),
    ({"merge_method": "lineaar", "models": [{"model": "base"}]}, "unknown merge method 'lineaar'"),
    ({"merge_method": "ties", "base_model": "base", "models": [{"model": "base"}]}, "no models left"),
])
def test_bad_configs(tiny_zoo, cfg, match):
    base_dir = tiny_zoo[0]
    with pytest.raises(CurvlensError, match=match):
        load_merge_config(write_config(base_dir.parent, cfg))


def test_merge_result_renders_itself(zoo):
    ex, _ = zoo
    res = merge(ex, "ota", device="cpu", progress=False, ffg_density=0.3)
    s = res.summary()
    assert set(s.index) == {"method", "kept_expert0", "kept_expert1", "kept_expert2", "all_masked", "delta_norm"}
    assert abs(s["kept_expert0"] - res.thresholds.realized_density[0]) < 1e-9
    html = res._repr_html_()
    assert "MergeResult: ota, 21 tensors" in html and "data:image/png;base64," in html
    assert html == res._repr_html_()  # deterministic


@pytest.mark.parametrize("method,params", [("linear", {}), ("task_arithmetic", {"lambda": 0.7}),
                                           ("ties", {"density": 0.3}),
                                           ("dare_ties", {"density": 0.5, "seed": 3}),
                                           ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.1}),
                                           ("della", {"density": 0.5, "epsilon": 0.2, "seed": 3}),
                                           ("fisher", {}), ("ota", {"ffg_density": 0.3}),
                                           ("ota", {"precond_threshold": 1e-7, "fallback_to_base": True})])
def test_blocked_merge_equals_whole_tensor(zoo, monkeypatch, method, params):
    from curvlens.math import blocks

    ex, _ = zoo
    whole = merge(ex, method, device="cpu", progress=False, **params)
    monkeypatch.setitem(blocks.BLOCK, "cpu", 7)  # many ragged blocks per tensor
    chunked = merge(ex, method, device="cpu", progress=False, **params)
    # Entrywise methods give the same bits; DARE's rescale divides by L1 norms that
    # are summed per block, which moves the factor by an fp32 rounding at most.
    tol = 1e-5 if method.startswith(("dare", "della")) else 0.0
    for n in ex.tensor_names():
        torch.testing.assert_close(chunked.checkpoint[n], whole.checkpoint[n], rtol=tol, atol=tol / 10)
    cols = [c for c in whole.report.columns if c != "name"]
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(chunked.report[cols], whole.report[cols], rtol=1e-6)


def test_the_saved_config_reruns_to_the_same_tensors(tiny_zoo, tmp_path):
    base_dir, dirs, *_ = tiny_zoo
    ex = Experts.from_dirs(base_dir, dirs)
    first = merge(ex, "ota", tmp_path / "a", device="cpu", progress=False, ffg_density=[0.3, 0.5, 0.3],
                  fallback_to_base=True, dtype="bfloat16")
    saved = yaml.safe_load((tmp_path / "a" / "curvlens_merge.yml").read_text())
    assert saved["base_model"] == str(base_dir) and len(saved["models"]) == 3
    assert saved["models"][1]["parameters"]["ffg_density"] == 0.5 and "ffg_density" not in saved["parameters"]
    assert main(["merge", str(tmp_path / "a" / "curvlens_merge.yml"), str(tmp_path / "b"), "--device", "cpu",
                 "--quiet"]) == 0
    again = Checkpoint.open(tmp_path / "b")
    for n in first.checkpoint:
        assert torch.equal(first.checkpoint[n], again[n]), n


# ------------------------------------------------------------ per-tensor control
def _with_heads(tmp_path, head_rows=(2, 2, 2)):
    """A tiny zoo whose models carry a classifier head (one row count per expert)."""
    from safetensors.torch import load_file, save_file

    base_dir, dirs, weights, moments = make_tiny_zoo(tmp_path, n_experts=len(head_rows))
    g = torch.Generator().manual_seed(5)
    for d, rows, (name, w), m in zip(dirs, head_rows, weights.items(), moments.values()):
        head = torch.randn(rows, 8, generator=g)
        save_file({"classifier.weight": head}, str(d / "head.safetensors"))
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"]["classifier.weight"] = "head.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        mom = load_file(str(d / "export" / "exp_avg_sq.safetensors"))
        mom["classifier.weight"] = torch.rand(rows, 8, generator=g)
        save_file(mom, str(d / "export" / "exp_avg_sq.safetensors"))
        w["classifier.weight"], m["classifier.weight"] = head, mom["classifier.weight"]
    base_head = torch.zeros(head_rows[0], 8)
    save_file({"classifier.weight": base_head}, str(base_dir / "head.safetensors"))
    idx = json.loads((base_dir / "model.safetensors.index.json").read_text())
    idx["weight_map"]["classifier.weight"] = "head.safetensors"
    (base_dir / "model.safetensors.index.json").write_text(json.dumps(idx))
    return base_dir, dirs, weights, moments


def test_tensor_rules_drop_take_and_report(tmp_path):
    base_dir, dirs, weights, _ = _with_heads(tmp_path)
    ex = Experts.from_dirs(base_dir, dirs)
    body = [n for n in ex.tensor_names() if n != "classifier.weight"]
    full = merge(ex, "ota", device="cpu", progress=False, ffg_density=0.3)
    res = merge(ex, "ota", tmp_path / "out", device="cpu", progress=False, ffg_density=0.3,
                tensors={"classifier": "drop"})
    assert "classifier.weight" not in res.checkpoint
    row = res.report.set_index("name").loc["classifier.weight"]
    assert row["source"] == "drop" and row[["kept_expert0", "delta_norm"]].isna().all()
    # the FFG selection is over the merged tensors only: the head's saliencies no
    # longer take a share of the density
    assert not all(torch.equal(res.checkpoint[n], full.checkpoint[n]) for n in body)
    kept = res.report[res.report.source == "merged"]
    share = (kept["kept_expert0"] * kept["numel"]).sum() / kept["numel"].sum()
    assert share == pytest.approx(0.3, abs=1e-3)
    # taken unchanged from one expert / the base
    took = merge(ex, "linear", device="cpu", progress=False, tensors={"classifier": "expert1"})
    assert torch.equal(took.checkpoint["classifier.weight"], weights["expert1"]["classifier.weight"])
    assert took.report.set_index("name").loc["classifier.weight", "source"] == "expert1"
    took = merge(ex, "linear", device="cpu", progress=False, tensors=[("classifier", "base")])
    assert torch.equal(took.checkpoint["classifier.weight"], torch.zeros(2, 8))
    assert took.report.set_index("name").loc["classifier.weight", "delta_norm"] == 0.0
    # the saved config re-runs to the same tensors, rules included
    saved = yaml.safe_load((tmp_path / "out" / "curvlens_merge.yml").read_text())
    assert saved["tensors"] == [{"filter": "classifier", "action": "drop"}]
    cfg = load_merge_config(tmp_path / "out" / "curvlens_merge.yml")
    again = merge(cfg.experts(), cfg.method, device="cpu", progress=False, tensors=cfg.tensors, **cfg.params)
    for n in body:
        assert torch.equal(again.checkpoint[n], res.checkpoint[n])


def test_heads_of_different_shapes_need_exclusion(tmp_path):
    base_dir, dirs, weights, _ = _with_heads(tmp_path, head_rows=(2, 3, 5))
    with pytest.raises(CurvlensError, match=r"classifier.weight has shape \(3, 8\).*\n?.*|exclude="):
        Experts.from_dirs(base_dir, dirs)
    ex = Experts.from_dirs(base_dir, dirs, exclude="classifier")
    assert "classifier.weight" not in ex.tensor_names()
    assert ex.excluded_names() == ["classifier.weight"]
    res = merge(ex, "ties", device="cpu", progress=False, density=0.5)
    assert "classifier.weight" not in res.checkpoint
    assert res.report.set_index("name").loc["classifier.weight", "source"] == "excluded"
    # one task's head taken although the heads differ in shape
    res = merge(ex, "ties", device="cpu", progress=False, density=0.5, tensors={"classifier": "expert2"})
    assert torch.equal(res.checkpoint["classifier.weight"], weights["expert2"]["classifier.weight"])
    # the same from YAML: a drop rule is enough for the heads not to line up
    text = yaml.safe_dump({"merge_method": "ties", "base_model": str(base_dir),
                           "models": [{"model": str(d)} for d in dirs], "parameters": {"density": 0.5},
                           "tensors": [{"filter": "classifier", "action": str(dirs[1])}]})
    cfg = load_merge_config(text=text)
    assert cfg.tensors == (("classifier", "expert1"),)
    out = merge(cfg.experts(), cfg.method, device="cpu", progress=False, tensors=cfg.tensors, **cfg.params)
    assert torch.equal(out.checkpoint["classifier.weight"], weights["expert1"]["classifier.weight"])
    with pytest.raises(CurvlensError, match="tensors\\[0\\]"):
        load_merge_config(text=text.replace("action: " + str(dirs[1]), "action: [x]"))
    # analyses see the same exclusion
    from curvlens import curvature_overlap
    ov = curvature_overlap(ex, progress=False)
    assert len(ov) and "classifier.weight" not in set(ov["name"])


def test_tensor_rules_errors(tmp_path):
    base_dir, dirs, *_ = _with_heads(tmp_path)
    ex = Experts.from_dirs(base_dir, dirs)
    with pytest.raises(CurvlensError, match="no tensor to merge"):
        merge(ex, "linear", device="cpu", progress=False, tensors={"*": "drop"})
    with pytest.raises(CurvlensError, match="match no tensor"):
        merge(ex, "linear", device="cpu", progress=False, tensors={"score": "drop"})
    with pytest.raises(CurvlensError, match="match no tensor"):
        Experts.from_dirs(base_dir, dirs, exclude="score")
