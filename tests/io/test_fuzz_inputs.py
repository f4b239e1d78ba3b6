"""Property-based, by outcome: every generated input is either one that must open
(and then must equal what was written) or one that must be refused naming why.
The generators build valid inputs and plant one defect of a known kind, so the
test knows which; they reach the merge and the analyses, not only the readers.
Hypothesis health checks are on; every example's files live in a temp dir that
is removed afterwards."""
from __future__ import annotations

import json
import math
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from curvlens import Checkpoint, CurvlensError, Experts, Moments, merge
from curvlens.math.methods import get_method
from curvlens.passes.analysis import curvature_overlap, mask_stats
from curvlens.passes.experts import Expert
from curvlens.config.merge_config import load_merge_config

SETTINGS = settings(max_examples=40, deadline=None)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


@contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="curvlens-fuzz-") as d:
        yield Path(d)


@st.composite
def state_dicts(draw, min_size=1):
    """{name: tensor} with varied names, shapes and dtypes (and known values)."""
    names = draw(st.lists(st.from_regex(r"[a-z]{1,6}(\.[a-z0-9]{1,4}){0,2}", fullmatch=True), min_size=min_size,
                          max_size=4, unique=True))
    out = {}
    for i, n in enumerate(names):
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
        dt = draw(st.sampled_from(DTYPES))
        out[n] = (torch.arange(int(torch.Size(shape).numel())) * (i + 1) - 2).reshape(shape).to(dt)
    return out


def _equal(ckpt, want: dict) -> bool:
    return set(ckpt.keys()) == set(want) and all(ckpt[k].dtype == t.dtype and torch.equal(ckpt[k], t)
                                                 for k, t in want.items())


# ------------------------------------------------------------------ index JSON
INDEX_DEFECTS = {
    None: None,
    "not an object": r"expected a JSON object with a 'weight_map'",
    "weight_map not a mapping": r"expected a JSON object with a 'weight_map'",
    "empty weight_map": r"'weight_map' is empty",
    "entry not a file name": r"entry '.*' maps to .*; expected a shard file name",
    "entry outside": r"names '\.\./.*', which resolves outside the model dir",
    "absolute entry": r"names the absolute path",
    "missing shard": r"names shard\(s\) that do not exist",
    "index lists a tensor the shard lacks": r"index says tensor 'zz' is in .*, but that shard lacks it",
    "index misses a tensor": r"holds tensor\(s\) the index does not list",
    "duplicate key": r"not a readable JSON index .*appears twice",
}


@SETTINGS
@given(tensors=state_dicts(min_size=2), defect=st.one_of(st.none(), st.sampled_from(list(INDEX_DEFECTS)[1:])),
       junk=json_values,
       meta=json_values)
def test_an_index_opens_to_its_tensors_or_is_refused_naming_why(tensors, defect, junk, meta):
    shard = "model-00001-of-00001.safetensors"
    names = list(tensors)
    wm = {n: shard for n in names}
    text = None
    if defect == "not an object":
        index = junk if not isinstance(junk, dict) else [junk]
    elif defect == "weight_map not a mapping":
        index = {"weight_map": junk if not isinstance(junk, dict) else [junk]}
    elif defect == "empty weight_map":
        index = {"weight_map": {}}
    elif defect == "entry not a file name":
        index = {"weight_map": {**wm, names[0]: junk if not isinstance(junk, str) else [junk]}}
    elif defect == "entry outside":
        index = {"weight_map": {**wm, names[0]: "../other/" + shard}}
    elif defect == "absolute entry":
        index = {"weight_map": {**wm, names[0]: "/tmp/" + shard}}
    elif defect == "missing shard":
        index = {"weight_map": {**wm, names[0]: "model-00002-of-00002.safetensors"}}
    elif defect == "index lists a tensor the shard lacks":
        index = {"weight_map": {**wm, "zz": shard}}
    elif defect == "index misses a tensor":
        index = {"weight_map": {n: shard for n in names[1:]}}
    elif defect == "duplicate key":
        text = '{"weight_map": {' + ", ".join(f'"{n}": "{shard}"' for n in [names[0], *names]) + "}}"
    else:
        index = {"metadata": meta, "weight_map": wm}
    with scratch() as d:
        (d / "other").mkdir()
        save_file(tensors, str(d / "other" / shard))
        model = d / "model"
        model.mkdir()
        save_file(tensors, str(model / shard))
        (model / "model.safetensors.index.json").write_text(text if text is not None else json.dumps(index))
        event(f"index: {defect or 'opens'}")
        if defect is None:
            assert _equal(Checkpoint.open(model), tensors)
        else:
            with pytest.raises(CurvlensError, match=INDEX_DEFECTS[defect]):
                Checkpoint.open(model)


# ------------------------------------------------------------------ file bytes
@SETTINGS
@given(tensors=state_dicts(), fmt=st.sampled_from(["safetensors", "pt"]),
       defect=st.one_of(st.none(), st.sampled_from(["truncated", "header length", "not json", "empty"])),
       cut=st.floats(0, 0.99))
def test_a_weights_file_opens_to_its_tensors_or_is_refused_naming_it(tensors, fmt, defect, cut):
    with scratch() as d:
        f = d / f"x.{fmt}"
        if fmt == "safetensors":
            save_file(tensors, str(f))
        else:
            torch.save(tensors, f)
        blob = f.read_bytes()
        if defect == "truncated":
            blob = blob[:int(cut * len(blob))]
        elif defect == "header length":
            blob = (len(blob) + 10).to_bytes(8, "little") + blob[8:]
        elif defect == "not json":
            blob = blob[:8] + b"\xff" + blob[9:]
        elif defect == "empty":
            blob = b""
        f.write_bytes(blob)
        if defect is None or (fmt == "pt" and defect in ("header length", "not json") and _pt_still_loads(f)):
            event(f"{fmt}: opens")
            assert _equal(Checkpoint.open(f), tensors)
        else:
            event(f"{fmt}: refused ({defect})")
            with pytest.raises(CurvlensError, match=re.escape(str(f))):
                Checkpoint.open(f)


def _pt_still_loads(f: Path) -> bool:
    """A zip (.pt) whose first bytes were changed may still be readable: the zip
    directory sits at the end. The oracle then is: it opens and is equal."""
    try:
        torch.load(f, weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - torch's own verdict, used as the oracle's input
        return False


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "m").mkdir()
    with open(tmp_path / "m" / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"a": Evil()}, fh)
    with pytest.raises(CurvlensError, match="pytorch_model.bin"):
        Checkpoint.open(tmp_path / "m")
    assert not marker.exists()


# ------------------------------------------------------------- pickled objects
def _is_state_dict(obj) -> bool:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


objects = st.recursive(st.one_of(scalars, st.builds(torch.zeros, st.integers(0, 3))),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.one_of(st.text(max_size=6), st.integers(0, 3)),
                                                               inner, max_size=3)), max_leaves=8)


@SETTINGS
@given(obj=st.one_of(state_dicts(), state_dicts().map(lambda sd: {"state_dict": sd}), objects))
def test_a_pickled_object_opens_as_weights_iff_it_is_a_state_dict(obj):
    with scratch() as d:
        torch.save(obj, d / "pytorch_model.bin")
        event("pickle: " + ("opens" if _is_state_dict(obj) else "refused"))
        if _is_state_dict(obj):
            want = obj.get("state_dict", obj) if "state_dict" in obj else obj
            assert _equal(Checkpoint.open(d), want)
        else:
            with pytest.raises(CurvlensError, match=r"pytorch_model\.bin: expected a state dict|holds no tensors"):
                Checkpoint.open(d)


OPT_DEFECTS = {
    None: None,
    "no state": r"optimizer",
    "not adam": r"no exp_avg_sq .*non-Adam",
    "wrong shape": r"shape",
    "unknown index": r"optimizer",
    "state not a mapping": r"optimizer",
}


@SETTINGS
@given(defect=st.sampled_from(list(OPT_DEFECTS)), step=st.integers(1, 50), scale=st.floats(0.0, 10.0))
def test_an_optimizer_state_gives_its_moments_or_is_refused(defect, step, scale):
    names = {"a": (2, 3), "b": (4,)}
    vs = [torch.arange(6.0).reshape(2, 3) * scale, torch.ones(4) * scale]
    state = {i: {"exp_avg_sq": v, "exp_avg": v, "step": torch.tensor(float(step))} for i, v in enumerate(vs)}
    groups = [{"params": [0, 1], "betas": (0.9, 0.999), "lr": 1e-3}]
    if defect == "no state":
        obj = {"param_groups": groups}
    elif defect == "not adam":
        obj = {"state": {i: {"momentum_buffer": v} for i, v in enumerate(vs)}, "param_groups": groups}
    elif defect == "wrong shape":
        obj = {"state": {**state, 0: {**state[0], "exp_avg_sq": torch.ones(5)}}, "param_groups": groups}
    elif defect == "unknown index":
        obj = {"state": {**state, 7: state[0]}, "param_groups": groups}
    elif defect == "state not a mapping":
        obj = {"state": [1, 2], "param_groups": groups}
    else:
        obj = {"state": state, "param_groups": groups}
    with scratch() as d:
        ckpt = Checkpoint.open({n: torch.zeros(s) for n, s in names.items()})
        torch.save(obj, d / "optimizer.pt")
        if defect is None:
            m = Moments.open(d / "optimizer.pt", checkpoint=ckpt)
            assert torch.equal(m["a"], vs[0]) and torch.equal(m["b"], vs[1]) and m.step == step
        else:
            with pytest.raises(CurvlensError, match=OPT_DEFECTS[defect]) as err:
                Moments.open(d / "optimizer.pt", checkpoint=ckpt)
            assert "optimizer.pt" in str(err.value)


# ------------------------------------------------------------ moments metadata
def _meta_outcome(meta: dict):
    """(expected scale, or a regex of the refusal) under bias_correction=True,
    by Adam's rule, decided without curvlens."""
    step = None
    if "step" in meta:
        try:
            x = float(meta["step"].strip())
        except ValueError:
            return "'step' must be a whole number"
        if not math.isfinite(x) or x != int(x) or x < 0:
            return "'step' must be a whole number >= 0"
        step = int(x)
    beta2, given = None, True
    if "beta2" in meta:
        raw = meta["beta2"]
    elif "betas" in meta:
        try:
            betas = json.loads(meta["betas"])
        except ValueError:
            return "'betas' must be a JSON list"
        if not isinstance(betas, list) or len(betas) != 2:
            return "'betas' must be a list"
        raw = betas[1]
    else:
        given = False
    if given:
        try:
            beta2 = float(raw)
        except (TypeError, ValueError):
            return "beta2 must be a number"
        if not 0.0 <= beta2 < 1.0:
            return r"beta2 must be in \[0, 1\)"
    if step is None or beta2 is None:
        return "needs the optimizer step and beta2"
    if step < 1:
        return "needs step >= 1"
    return 1.0 / (1.0 - beta2 ** step)


@SETTINGS
@given(meta=st.one_of(st.fixed_dictionaries({"step": st.integers(1, 40).map(str),
                                             "beta2": st.floats(0, 0.999).map(repr)}),
                      st.fixed_dictionaries({}, optional={
    "step": st.one_of(st.integers(1, 40).map(str), st.integers(-2, 40).map(str),
                      st.sampled_from(["2.5", "inf", "nan", "", "x", " 7 "])),
    "beta2": st.one_of(st.floats(0, 0.999).map(repr), st.floats(-0.5, 1.5).map(repr),
                       st.sampled_from(["0", "0.999", "one", ""])),
    "betas": st.one_of(st.tuples(st.floats(0, 1), st.floats(-0.5, 1.5)).map(lambda b: json.dumps(list(b))),
                       st.sampled_from(["[0.9]", "{}", "[0.9, \"0.99\"]", "[0.9, null]", "nope"])),
    "format": st.text(max_size=5)})))
def test_moments_metadata_gives_adams_bias_correction_or_a_refusal(meta):
    want = _meta_outcome(meta)
    event("metadata: " + ("bias-corrected" if isinstance(want, float) else "refused"))
    with scratch() as d:
        save_file({"w": torch.tensor([1.0, 2.0])}, str(d / "v.safetensors"), metadata=meta)
        if isinstance(want, float):
            got = Moments.open(d / "v.safetensors", bias_correction=True)["w"]
            assert torch.allclose(got, torch.tensor([1.0, 2.0]) * want, rtol=1e-6)
            assert torch.equal(Moments.open(d / "v.safetensors")["w"], torch.tensor([1.0, 2.0]))  # raw without it
        else:
            with pytest.raises(CurvlensError, match=want):
                Moments.open(d / "v.safetensors", bias_correction=True)


# ------------------------------------------------- YAML configs, through the merge
@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    from tests.conftest import make_tiny_zoo

    return make_tiny_zoo(tmp_path_factory.mktemp("fuzz-zoo"), n_experts=2)


GOOD = {"linear": {"weight": [0.3, 1.0], "normalize": [True, False]},
        "task_arithmetic": {"weight": [0.5, 1.0], "lambda": [0.5, 1.0, 2.0], "normalize": [True, False]},
        "ties": {"density": [0.3, 0.8, 1.0], "weight": [0.5, 1.0], "lambda": [1.0, 0.7]},
        "dare_ties": {"density": [0.5, 0.9], "seed": [0, 3], "rescale": [True, False]},
        "fisher": {"weight": [1.0, 2.0], "fisher_floor": [0.0, 1e-6]},
        "ota": {"power": [0.5, 1.0], "epsilon": [1e-8, "1e-26"], "ffg_density": [0.3, 0.7],
                "fallback_to_base": [True, False], "normalise": ["none", "global", "Global"]}}
YAML_DEFECTS = {
    None: None,
    "unknown parameter": (lambda c: c["parameters"].update(densty=0.5), r"unknown parameter 'densty'"),
    "wrong type": (lambda c: c["parameters"].update(weight="heavy"), r"weight.* must be a real number"),
    "non-finite": (lambda c: c["parameters"].update(weight=float("inf")), r"weight.* must be finite"),
    "unknown key": (lambda c: c.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    "no models": (lambda c: c.update(models=[]), r"'models' must be a non-empty list"),
    "bad dtype": (lambda c: c.update(dtype="int8"), r"dtype='int8' is not valid"),
    "dtype not a string": (lambda c: c.update(dtype=16), r"dtype/out_dtype must be a string"),
    "model not a path": (lambda c: c["models"][0].update(model=[1]), r"models\[0\]\.model must be a path"),
    "unknown method": (lambda c: c.update(merge_method="nope"), r"unknown merge method 'nope'"),
    "bad filter value": (lambda c: c["parameters"].update(weight=[{"filter": "mlp", "value": "x"}]),
                         r"weight.*\[0\]\.value must be a real number"),
}


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(sorted(GOOD)), data=st.data(),
       defect=st.one_of(st.none(), st.sampled_from(list(YAML_DEFECTS)[1:])),
       dtype=st.sampled_from([None, "float32", "bfloat16"]))
def test_a_merge_config_merges_as_the_python_call_or_is_refused_naming_why(small_zoo, method, data, defect, dtype):
    base, dirs, *_ = small_zoo
    params = {k: data.draw(st.sampled_from(v), label=k) for k, v in GOOD[method].items() if data.draw(st.booleans())}
    cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(d)} for d in dirs],
           "parameters": dict(params)}
    if method in ("linear", "fisher"):
        cfg["base_model_role"] = "reference" if method == "linear" else None
        cfg = {k: v for k, v in cfg.items() if v is not None}
    if dtype is not None:
        cfg["dtype"] = dtype
    if defect is not None:
        if method == "ota" and defect in ("wrong type", "non-finite", "bad filter value"):
            defect = "unknown parameter"  # ota has no weight
        YAML_DEFECTS[defect][0](cfg)
    text = yaml.safe_dump(cfg)

    def run():
        mc = load_merge_config(text=text)
        return merge(mc.experts(), mc.method, device="cpu", progress=False, **mc.merge_kwargs()).checkpoint

    event(f"config: {'merged' if defect is None else 'refused: ' + defect}")
    if defect is not None:
        with pytest.raises(CurvlensError, match=YAML_DEFECTS[defect][1]):
            run()
        return
    m = get_method(method)
    ex = Experts.from_dirs(base if method != "fisher" else None, dirs, moments=m.needs_moments)
    py = {k: (float(v) if k == "epsilon" else v) for k, v in params.items()}
    want = merge(ex, method, device="cpu", progress=False, dtype=dtype, input_dtype=dtype, **py).checkpoint
    got = run()
    assert set(got.keys()) == set(want.keys())
    for k in want.keys():
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        assert torch.isfinite(got[k].float()).all()


def test_undecodable_config_file(tmp_path):
    (tmp_path / "c.yml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CurvlensError, match="c.yml"):
        load_merge_config(tmp_path / "c.yml")


# ---------------------------------------------------------- through the analyses
@st.composite
def expert_sets(draw):
    """2-3 experts of 1-3 tensors (bf16 or fp32, with exact zeros and ties), their
    moments (with zeros), a base; maybe one bad moment planted."""
    n_t = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))) for _ in range(n_t)]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n_t)]

    def tensor(shape, zeros=False):
        t = torch.randn(shape, generator=g)
        if zeros:
            t = torch.where(torch.rand(shape, generator=g) < 0.3, 0.0, t.round(decimals=1))
        return t.to(dtype)

    base = {n: tensor(s) for n, s in zip(names, shapes)}
    n_e = draw(st.integers(2, 3))
    experts = []
    for e in range(n_e):
        w = {n: tensor(s, zeros=draw(st.booleans())) for n, s in zip(names, shapes)}
        v = {n: torch.rand(s, generator=g) * (torch.rand(s, generator=g) > 0.2) for n, s in zip(names, shapes)}
        experts.append((f"e{e}", w, v))
    bad = draw(st.sampled_from([None, None, float("nan"), float("inf"), -1.0]))
    where = (draw(st.integers(0, n_e - 1)), draw(st.integers(0, n_t - 1))) if bad is not None else None
    if where is not None:
        experts[where[0]][2][names[where[1]]].reshape(-1)[0] = bad
    return base, experts, bad, where, names


@settings(max_examples=30, deadline=None)
@given(case=expert_sets(), density=st.sampled_from([0.1, 0.3, 0.5, 1.0]))
def test_analyses_measure_any_experts_or_refuse_the_bad_moment(case, density):
    base, experts, bad, where, names = case
    event("analyses: " + ("measured" if bad is None else "refused"))
    ex = Experts(Checkpoint.open(base), [Expert(n, Checkpoint.open(w), Moments.open(v)) for n, w, v in experts])
    if bad is not None:
        label = {float("nan"): "NaN", float("inf"): "Inf", -1.0: "negative"}.get(bad, "NaN")
        who = rf"expert '{experts[where[0]][0]}', tensor '{re.escape(names[where[1]])}': 1 {label}"
        with pytest.raises(CurvlensError, match=who):
            curvature_overlap(ex, device="cpu", progress=False)
        with pytest.raises(CurvlensError, match=f"expert '{experts[where[0]][0]}'"):
            mask_stats(ex, densities=[density], criteria=["fisher"], device="cpu", progress=False)
        return
    ov = curvature_overlap(ex, device="cpu", progress=False)
    n_e = len(experts)
    assert len(ov) == n_e * (n_e - 1) // 2 * len(names)
    assert ov["cosine"].dropna().between(-1 - 1e-6, 1 + 1e-6).all()
    ms = mask_stats(ex, densities=[density], criteria=["fisher", "magnitude"], device="cpu", progress=False)
    total = sum(t.numel() for t in base.values())
    want = math.floor(density * total + 0.5)  # densities are exact, model-wide
    for (e, c), grp in ms.groupby(["expert", "criterion"]):
        kept = (grp["kept_frac"] * grp["numel"]).sum()
        assert round(float(kept)) == want, (e, c, float(kept), want)
