"""Every method parameter, in every form mergekit gives it (a scalar, a gradient, a
list of filter conditions; top level or per model), checked by its outcome:

* a valid value in a form that says "this value for every tensor" (``[x, x]``,
  ``[{filter: "*", value: x}]``) merges exactly as the scalar ``x`` does, and the
  YAML scalar exactly as the Python keyword;
* a split form (``[{filter: mlp, value: x}, {value: y}]``) gives the mlp tensors
  of the ``x`` merge and the others of the ``y`` merge;
* an invalid value anywhere in any form is refused when the config is read,
  naming where (``parameters.<name>[i].value``), before any tensor is read.
"""
from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlens import CurvlensError, Experts, merge
from curvlens.math.methods.registry import _REGISTRY
from curvlens.config.merge_config import load_merge_config
from tests.robustness.pools import DRIVER_SET, accepted_values, refused_values

KW = dict(device="cpu", progress=False)

def _method_params():
    out = []
    for m in _REGISTRY.values():
        if m.name == "passthrough":  # with models: one model; its scale has its own suite (slices)
            continue
        for spec in m.params:
            if spec.name not in DRIVER_SET and accepted_values(spec):
                out.append((m.name, spec.name))
    return out


METHOD_PARAMS = _method_params()


def _experts(zoo, method):
    base, dirs, *_ = zoo
    m = _REGISTRY[method]
    n = m.min_experts if m.max_experts == m.min_experts else 2
    return (base if m.needs_base else None), dirs[:n], m


def _yaml_merge(zoo, method, top=None, per_model=None):
    base, dirs, m = _experts(zoo, method)
    cfg = {"merge_method": method, "models": [{"model": str(d)} for d in dirs],
           "parameters": dict(top or {})}
    if base is not None:
        cfg["base_model"] = str(base)
    if per_model:
        cfg["models"][0]["parameters"] = per_model
    if method == "slerp" and "t" not in cfg["parameters"]:
        cfg["parameters"]["t"] = 0.5
    mc = load_merge_config(text=yaml.safe_dump(cfg))
    return merge(mc.experts(), mc.method, **KW, **mc.merge_kwargs()).checkpoint


def _py_merge(zoo, method, **params):
    base, dirs, m = _experts(zoo, method)
    if method == "slerp":
        params.setdefault("t", 0.5)
    return merge(Experts.from_dirs(base, dirs, moments=m.needs_moments), method, **KW, **params).checkpoint


def _outcome(fn):
    """The tensors, or the CurvlensError's text."""
    try:
        ckpt = fn()
    except CurvlensError as err:
        return str(err)
    return {k: ckpt[k] for k in ckpt.keys()}


def _equal(a, b, names=None) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return False
    names = names if names is not None else set(a) | set(b)
    return all(k in a and k in b and a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in names)


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(METHOD_PARAMS), data=st.data())
def test_every_form_of_a_valid_value_merges_as_the_scalar(zoo, case, data):
    method, name = case
    spec = _REGISTRY[method].param(name)
    model_wide = _REGISTRY[method].model_wide
    x = data.draw(st.sampled_from(accepted_values(spec)), label="x")
    scalar = _outcome(lambda: _yaml_merge(zoo, method, {name: x}))
    py = _outcome(lambda: _py_merge(zoo, method, **{name: x}))
    if isinstance(scalar, str):  # refused by the method's own rules: the same refusal, naming the parameter
        assert isinstance(py, str) and name in scalar, (method, name, x, scalar)
    else:
        assert _equal(scalar, py)
    form = data.draw(st.sampled_from(["gradient", "star", "split"]), label="form")
    if form == "gradient":
        value = [x, x]
    elif form == "star":
        value = [{"filter": "*", "value": x}]
    else:
        y = data.draw(st.sampled_from(accepted_values(spec)), label="y")
        value = [{"filter": "mlp", "value": x}, {"value": y}]
    varied = _outcome(lambda: _yaml_merge(zoo, method, {name: value}))
    # the model-wide selection is one share per expert: never a gradient or filter list (its rank /
    # rank1_approx only with it, and this test gives one parameter at a time)
    if model_wide is not None and name == model_wide.density:
        assert isinstance(varied, str) and name in varied and "model-wide selection" in varied, (method, name, value)
        return
    if isinstance(scalar, str):
        assert isinstance(varied, str) and name in varied, (method, name, value, varied)
        return
    if form != "split":
        assert _equal(varied, scalar), (method, name, value)
        return
    other = _outcome(lambda: _yaml_merge(zoo, method, {name: y}))
    if isinstance(other, str):
        assert isinstance(varied, str) and name in varied, (method, name, value, varied)
        return
    mlp = {k for k in scalar if "mlp" in k}
    assert _equal(varied, scalar, mlp) and _equal(varied, other, set(scalar) - mlp), (method, name, value)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(METHOD_PARAMS), data=st.data())
def test_an_invalid_value_in_any_form_is_refused_when_read_naming_where(zoo, case, data):
    method, name = case
    spec = _REGISTRY[method].param(name)
    bad = data.draw(st.sampled_from(refused_values(spec)), label="bad")
    good = data.draw(st.sampled_from(accepted_values(spec)), label="good")
    form = data.draw(st.sampled_from(["scalar", "gradient", "filter", "filter_gradient"]), label="form")
    if isinstance(bad, (list, dict)) and form != "scalar":
        form = "scalar"  # a nested list/dict inside a form is a form error, tested below
    value, where = {
        "scalar": (bad, rf"{name}\b"),
        "gradient": ([good, bad], rf"{name}'?\[1\]"),
        "filter": ([{"filter": "nothing-matches", "value": bad}, {"value": good}], rf"{name}'?\[0\]\.value"),
        "filter_gradient": ([{"filter": "mlp", "value": [good, bad]}], rf"{name}'?\[0\]\.value\[1\]"),
    }[form]
    per_model = spec.per_expert and data.draw(st.booleans(), label="per_model")
    base, dirs, _ = _experts(zoo, method)
    cfg = {"merge_method": method, "models": [{"model": str(d)} for d in dirs], "parameters": {}}
    if base is not None:
        cfg["base_model"] = str(base)
    if method == "slerp" and name != "t":
        cfg["parameters"]["t"] = 0.5
    (cfg["models"][0].setdefault("parameters", {}) if per_model else cfg["parameters"])[name] = value
    text = yaml.safe_dump(cfg)
    with pytest.raises(CurvlensError, match=where if not isinstance(bad, (list, dict)) else name):
        load_merge_config(text=text)


@pytest.mark.parametrize("value, match", [
    ([[0.1, 0.2]], r"density.\[0\]: a gradient.s entries are values"),
    ([0.5, {"value": 0.1}], r"density.\[0\]: mix of values and conditions"),
    ([{"filter": "mlp", "value": {"a": 1}}], r"\[0\]\.value must be a value or a gradient"),
    ([{"filter": "mlp"}], "filter: SUBSTRING"),
    ([], "must be a value, a list"),
    ([{"filter": 3, "value": 0.5}], r"\[0\]\.filter must be a string"),
])
def test_malformed_forms_are_refused(zoo, value, match):
    base, dirs, _ = _experts(zoo, "ties")
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(d)} for d in dirs],
           "parameters": {"density": value}}
    with pytest.raises(CurvlensError, match=match):
        load_merge_config(text=yaml.safe_dump(cfg))


def test_slerp_t_as_a_gradient_or_filter_list(zoo):
    """``t`` is required (no default), and a gradient or filter list gives it."""
    grad = _yaml_merge(zoo, "slerp", {"t": [0.0, 1.0]})
    lo, hi = _py_merge(zoo, "slerp", t=0.0), _py_merge(zoo, "slerp", t=1.0)
    # layer 0 of 2 sits at t = 0, layer 1 at t = 1, embeddings / norm / head at t = 0
    for k in grad.keys():
        want = hi if ".layers.1." in k else lo
        assert bool((grad[k] == want[k]).all()), k
    split = _yaml_merge(zoo, "slerp", {"t": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]})
    for k in split.keys():
        want = hi if "mlp" in k else lo
        assert bool((split[k] == want[k]).all()), k
    with pytest.raises(CurvlensError, match=r"tensor '(lm_head|model\.embed_tokens|model\.norm)\.weight': t is required"):
        _yaml_merge(zoo, "slerp", {"t": [{"filter": "mlp", "value": 1.0}]})  # no value for the others


def test_python_tensor_params_for_a_required_parameter(zoo):
    base, dirs, _ = _experts(zoo, "slerp")
    ex = Experts.from_dirs(base, dirs, moments=False)
    res = merge(ex, "slerp", tensor_params=lambda n: {"t": 1.0 if "mlp" in n else 0.0}, **KW)
    one, zero = _py_merge(zoo, "slerp", t=1.0), _py_merge(zoo, "slerp", t=0.0)
    for k in res.checkpoint.keys():
        assert bool((res.checkpoint[k] == (one if "mlp" in k else zero)[k]).all()), k
    with pytest.raises(CurvlensError, match="tensor_params must be a callable"):
        merge(ex, "slerp", tensor_params={"t": 0.5}, **KW)
    with pytest.raises(CurvlensError, match="returned a list"):
        merge(ex, "slerp", tensor_params=lambda n: [0.5], **KW)


@pytest.mark.parametrize("method", sorted(_REGISTRY))
def test_every_method_on_an_empty_tensor_gives_an_empty_tensor(method):
    import torch

    m = _REGISTRY[method]
    n = m.min_experts if m.max_experts == m.min_experts else 2
    xs = [torch.zeros(0, 3) for _ in range(n)]
    base = torch.zeros(0, 3) if m.needs_base else None
    params = {"t": 0.5} if method == "slerp" else {}
    out = m(base, xs, [torch.zeros(0, 3)] * n if m.needs_moments else None, **params)
    assert out.shape == (0, 3) and out.dtype == torch.float32
    assert math.isfinite(float(out.sum()))
