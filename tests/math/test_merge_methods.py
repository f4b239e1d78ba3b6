"""Tests for curvlens.math.methods: registry, parameter resolution, methods.

Hand-made tensors with answers worked out in the comments; property tests are
kept small so the file runs in a few seconds.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlens.errors import CurvlensError
from curvlens.math.methods import registry as mm_registry
from curvlens.math.methods import (
    ParamSpec,
    get_method,
    list_methods,
    method_params,
    register,
    resolve_params,
)

EXPECTED = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "fisher", "ota",
            "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp", "nuslerp",
            "multislerp", "karcher", "sce", "arcee_fusion", "passthrough"}

# Parameters a method cannot run without (mergekit has no default for slerp's t).
_REQUIRED = {"slerp": {"t": 0.5}}


def _fit(name, base, experts, moments=None):
    """The inputs cut to what the method takes: at most ``max_experts`` experts
    (and moments), no base where it refuses one."""
    m = get_method(name)
    hi = m.max_experts or len(experts)
    if moments is not None:
        moments = moments[:hi]
    return (base if m.allows_base else None), experts[:hi], moments


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _call(name, base, experts, moments=None, **params):
    return get_method(name).fn(base, experts, moments, **params)


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------


def test_expected_methods_registered():
    assert EXPECTED <= set(mm_registry._REGISTRY)
    assert get_method("ota").needs_moments and not get_method("ota").needs_base
    assert get_method("fisher").needs_moments
    assert get_method("ties").needs_base and get_method("task_arithmetic").needs_base
    assert not get_method("linear").needs_base
    assert get_method("dare_ties").uses_rng and not get_method("ties").uses_rng


def test_unknown_method_lists_known_names():
    with pytest.raises(CurvlensError) as err:
        get_method("tie")
    msg = str(err.value)
    assert "'tie'" in msg
    for name in EXPECTED:
        assert repr(name) in msg


def test_register_returns_function_unchanged_and_rejects_duplicates():
    def fn(base, experts, moments, p, *, rng, counts):
        return experts[0]

    try:
        assert register("_test_identity", params=(), description="x", needs_base=False)(fn) is fn
        assert get_method("_test_identity").kernel is fn
        # called through the registry: the shared checks run first
        assert torch.equal(get_method("_test_identity")(None, [torch.ones(2)]), torch.ones(2))
        with pytest.raises(CurvlensError, match="experts must be a non-empty sequence"):
            get_method("_test_identity")(None, [])
        with pytest.raises(CurvlensError, match="already registered"):
            register("_test_identity", params=(), description="x", needs_base=False)(fn)
    finally:
        mm_registry._REGISTRY.pop("_test_identity", None)


def test_register_rejects_duplicate_param_names():
    spec = ParamSpec("a", 1, "a")
    with pytest.raises(CurvlensError, match="twice"):
        register("_test_dup", params=(spec, spec), description="x", needs_base=False)


def test_list_methods_lists_methods():
    df = list_methods()
    assert list(df.columns) == ["method", "description", "needs_base", "needs_moments", "random", "params"]
    assert set(df.method) >= EXPECTED and df.method.is_unique
    assert all(isinstance(d, str) and d and "\n" not in d for d in df.description)
    row = df.set_index("method").loc["dare_ties"]
    assert row.needs_base and row.random and not row.needs_moments and "density" in row.params


def test_method_params_is_tidy():
    df = method_params()
    assert list(df.columns) == ["method", "param", "default", "per_expert", "description"]
    assert set(method_params("ota").method) == {"ota"}
    assert set(df.method) >= {m for m in EXPECTED if get_method(m).params}  # arcee_fusion has none
    assert not df.duplicated(["method", "param"]).any()
    row = df[(df.method == "ties") & (df.param == "density")].iloc[0]
    assert row.default == 1.0 and bool(row.per_expert)
    n_params = sum(len(m.params) for m in mm_registry._REGISTRY.values())
    assert len(df) == n_params


# --------------------------------------------------------------------------
# resolve_params
# --------------------------------------------------------------------------


def test_defaults_match_mergekit():
    ta = resolve_params("task_arithmetic", {}, 2)
    assert ta == {"weight": [1.0, 1.0], "lambda": 1.0, "normalize": False, "int8_mask": False}
    t = resolve_params("ties", {}, 2)
    assert t["normalize"] is True and t["rescale"] is False and t["density"] == [1.0, 1.0]
    for name in ("dare_linear", "dare_ties"):
        d = resolve_params(name, {}, 3)
        assert d["normalize"] is False and d["rescale"] is True and d["seed"] == 0
    assert resolve_params("linear", {}, 1) == {"weight": [1.0], "normalize": True}


def test_ota_defaults_match_fork():
    p = resolve_params("ota", {}, 2)
    assert p["power"] == 0.5 and p["epsilon"] == 1e-8 and p["normalise"] == "none"
    assert p["fallback_to_base"] is False and p["combine"] == "precond"
    assert p["precond_threshold"] == [None, None] and p["rank"] == [None, None]
    assert p["scaling_factor"] == [1.0, 1.0] and p["rank1_approx"] == [False, False]


def test_per_expert_broadcast_and_lists():
    p = resolve_params("ties", {"weight": 0.5, "density": [0.2, 1]}, 2)
    assert p["weight"] == [0.5, 0.5]
    assert p["density"] == [0.2, 1.0]


def test_wrong_list_length_names_expected_length():
    with pytest.raises(CurvlensError) as err:
        resolve_params("ties", {"weight": [1, 2, 3]}, 2)
    msg = str(err.value)
    assert "weight" in msg and "length 2" in msg and "length 3" in msg


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(CurvlensError) as err:
        resolve_params("dare_ties", {"densty": 0.5}, 2)
    msg = str(err.value)
    assert "'densty'" in msg
    for name in ("weight", "density", "normalize", "lambda", "rescale", "seed"):
        assert repr(name) in msg


def test_bad_choice_lists_valid_options():
    with pytest.raises(CurvlensError) as err:
        resolve_params("ota", {"normalise": "layer"}, 2)
    assert "'none'" in str(err.value) and "'global'" in str(err.value) and "'layer'" in str(err.value)
    with pytest.raises(CurvlensError) as err:
        resolve_params("ota", {"combine": "mean"}, 2)
    assert all(repr(c) in str(err.value) for c in ("precond", "linear", "ties"))


@pytest.mark.parametrize(
    "method, params, fragment",
    [
        ("ties", {"density": 0.0}, "density[0] must be >"),
        ("ties", {"density": 1.5}, "density[0] must be <= 1"),
        ("ties", {"density": [0.5, -1]}, "density[1]"),
        ("ties", {"normalize": "yes"}, "normalize must be true or false"),
        ("ties", {"lambda": float("inf")}, "lambda must be finite"),
        ("ties", {"weight": True}, "weight[0] must be a real number"),
        ("ties", {"lambda": [1, 2]}, "takes one value for all experts"),
        ("dare_ties", {"seed": -1}, "seed must be an int >= 0"),
        ("ota", {"power": 0}, "power must be >"),
        ("ota", {"epsilon": -1e-8}, "epsilon must be >="),
        ("ota", {"rank": 0}, "rank[0] must be an int >= 1"),
        ("ota", {"scaling_factor": 0}, "scaling_factor[0] must be >"),
        ("ota", {"rescale": "yes"}, "rescale must be true or false"),
        ("ota", {"masked_task_vector_merge_method": "mean"}, "masked_task_vector_merge_method"),
        ("ota", {"preconditioner_path": 3}, "path string"),
        ("fisher", {"weight": -1.0}, "weight[0] must be >= 0"),
    ],
)
def test_bad_values_name_the_parameter(method, params, fragment):
    with pytest.raises(CurvlensError) as err:
        resolve_params(method, params, 2)
    assert fragment in str(err.value)


def test_numeric_strings_from_yaml_are_accepted():
    # PyYAML reads `epsilon: 1e-26` as the string '1e-26'.
    p = resolve_params("ota", {"epsilon": "1e-26", "precond_threshold": ["2.6e-19", None]}, 2)
    assert p["epsilon"] == 1e-26 and p["precond_threshold"] == [2.6e-19, None]


def test_fork_combine_is_its_own_parameter_and_case():
    # the fork's masked_task_vector_merge_method computes as the fork does: not an alias of combine
    p = resolve_params("ota", {"masked_task_vector_merge_method": "Linear", "normalise": "Global"}, 2)
    assert p["combine"] == "precond" and p["masked_task_vector_merge_method"] == "linear"
    assert p["normalise"] == "global"


def test_resolve_is_idempotent_and_does_not_mutate():
    given = {"weight": [1, 2], "density": 0.5}
    snapshot = {"weight": [1, 2], "density": 0.5}
    once = resolve_params("ties", given, 2)
    assert given == snapshot
    assert resolve_params("ties", once, 2) == once


@pytest.mark.parametrize("n", [0, -1, 1.0, True])
def test_bad_n_experts(n):
    with pytest.raises(CurvlensError, match="n_experts"):
        resolve_params("linear", {}, n)


def test_params_must_be_mapping():
    with pytest.raises(CurvlensError, match="mapping"):
        resolve_params("linear", [("weight", 1)], 1)


# --------------------------------------------------------------------------
# properties shared by every method
# --------------------------------------------------------------------------

# Parameters under which merging N copies of one expert must return it: methods
# whose default is a sum rather than a mean get weights summing to 1.
_IDENTITY_PARAMS = {
    "task_arithmetic": lambda n: {"weight": 1.0 / n},
    "dare_linear": lambda n: {"weight": 1.0 / n},
    "dare_ties": lambda n: {"weight": 1.0 / n},
    "breadcrumbs": lambda n: {"weight": 1.0 / n},
    "breadcrumbs_ties": lambda n: {"weight": 1.0 / n},
    "della_linear": lambda n: {"weight": 1.0 / n},
    "slerp": lambda n: {"t": 1.0},  # one expert: t = 1 is the expert
}
# Every method is an average of its experts except arcee_fusion, which keeps only
# the expert's important edits over the base: copies of an expert do not give it
# back, so it is not listed here (its own copy rule, expert == base gives the
# expert, is test_peer_methods.py::test_arcee_fusion).
AVERAGES = sorted(set(mm_registry._REGISTRY) - {"arcee_fusion"})


@pytest.mark.parametrize("shape", [(), (5,), (3, 4)])
@pytest.mark.parametrize("name", AVERAGES)
def test_copies_of_one_expert_return_it(name, shape):
    n = 3
    g = _gen(0)
    base = torch.randn(shape, generator=g)
    expert = base + torch.randn(shape, generator=g)
    moments = [torch.rand(shape, generator=g) + 0.1 for _ in range(n)]
    params = _IDENTITY_PARAMS.get(name, lambda n: {})(n)
    if name == "karcher":  # with a base the base is one more model in the mean; without, copies average to it
        base = None
    base, experts, moments = _fit(name, base, [expert] * n, moments)
    out = _call(name, base, experts, moments, **params)
    assert out.dtype == torch.float32 and out.shape == expert.shape
    torch.testing.assert_close(out, expert, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(mm_registry._REGISTRY))
def test_inputs_are_not_mutated(name):
    g = _gen(1)
    base = torch.randn(4, 3, generator=g)
    experts = [base + torch.randn(4, 3, generator=g) for _ in range(3)]
    moments = [torch.rand(4, 3, generator=g) for _ in range(3)]
    copies = [t.clone() for t in [base, *experts, *moments]]
    params = dict(_REQUIRED.get(name, {}))
    if name in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        params["density"] = 0.5
    if name == "sce":
        params["select_topk"] = 0.5
    if name == "ota":
        params = {"ffg_density": 0.5, "rank1_approx": True, "normalise": "global"}
    out = _call(name, *_fit(name, base, experts, moments), **params)
    for before, after in zip(copies, [base, *experts, *moments]):
        assert torch.equal(before, after)
    assert all(out.data_ptr() != t.data_ptr() for t in [base, *experts, *moments])


@pytest.mark.parametrize("name", sorted(mm_registry._REGISTRY))
def test_low_precision_inputs_give_fp32(name):
    g = _gen(2)
    base = torch.randn(6, generator=g).to(torch.bfloat16)
    experts = [(base.float() + torch.randn(6, generator=g)).to(torch.bfloat16) for _ in range(2)]
    moments = [torch.rand(6, generator=g).to(torch.bfloat16) for _ in range(2)]
    out = _call(name, *_fit(name, base, experts, moments), **_REQUIRED.get(name, {}))
    assert out.dtype == torch.float32 and out.device == base.device


@pytest.mark.parametrize("name", sorted(mm_registry._REGISTRY))
def test_bad_inputs_raise(name):
    base, e, v = torch.zeros(3), torch.ones(3), torch.ones(3)
    with pytest.raises(CurvlensError, match="shape"):
        _call(name, base, [e, torch.ones(4)], [v, v])
    with pytest.raises(CurvlensError, match="non-empty sequence"):
        _call(name, base, [], [])
    with pytest.raises(CurvlensError, match="non-empty sequence"):
        _call(name, base, e, [v])  # a bare tensor, not a list of experts
    with pytest.raises(CurvlensError, match="floating point"):
        _call(name, base, [torch.ones(3, dtype=torch.int64)], [v])
    with pytest.raises(CurvlensError, match="unknown parameter"):
        _call(name, base, [e], [v], not_a_param=1)


def test_needs_base_and_moments():
    e = [torch.ones(2)]
    for name in ("task_arithmetic", "ties", "dare_linear", "dare_ties"):
        with pytest.raises(CurvlensError, match="needs a base"):
            _call(name, None, e)
    for name in ("fisher", "ota"):
        with pytest.raises(CurvlensError, match="second-moment"):
            _call(name, None, e, None)
        with pytest.raises(CurvlensError, match="expected 1 moment"):
            _call(name, None, e, [torch.ones(2), torch.ones(2)])
        with pytest.raises(CurvlensError, match="nonnegative"):
            _call(name, None, e, [torch.tensor([1.0, -1.0])])


# --------------------------------------------------------------------------
# linear and task arithmetic
# --------------------------------------------------------------------------


def test_linear_weights_normalize_and_ignores_base():
    a, b = torch.tensor([0.0, 4.0]), torch.tensor([4.0, 0.0])
    out = get_method("linear")(torch.full((2,), 100.0), [a, b], weight=[1, 3])
    assert torch.equal(out, torch.tensor([3.0, 1.0]))
    out = get_method("linear")(None, [a, b], weight=[1, 3], normalize=False)
    assert torch.equal(out, torch.tensor([12.0, 4.0]))


def test_linear_zero_weight_sum_raises():
    with pytest.raises(CurvlensError, match="sum to 0"):
        get_method("linear")(None, [torch.ones(2), torch.ones(2)], weight=[1, -1])


def test_task_arithmetic_hand_example():
    base = torch.tensor([1.0, 1.0])
    experts = [torch.tensor([2.0, 0.0]), torch.tensor([4.0, 1.0])]  # tau = [1,-1], [3,0]
    # base + lambda * (1*[1,-1] + 2*[3,0]) = [1,1] + 0.5*[7,-1]
    out = get_method("task_arithmetic")(base, experts, weight=[1, 2], **{"lambda": 0.5})
    torch.testing.assert_close(out, torch.tensor([4.5, 0.5]))
    # normalize divides by sum(w) = 3
    out = get_method("task_arithmetic")(base, experts, weight=[1, 2], normalize=True)
    torch.testing.assert_close(out, torch.tensor([1 + 7 / 3, 1 - 1 / 3]))


# --------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------


def test_ties_density_one_agreeing_signs_is_mean():
    base = torch.tensor([1.0, -1.0, 0.0])
    experts = [base + torch.tensor([1.0, -2.0, 0.5]), base + torch.tensor([3.0, -4.0, 1.5])]
    out = get_method("ties")(base, experts)
    torch.testing.assert_close(out, (experts[0] + experts[1]) / 2)


def test_ties_sign_conflicts_hand_example():
    base = torch.zeros(4)
    e1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
    e2 = torch.tensor([2.0, 1.0, -1.0, -0.5])
    # sums [3, -1, 2, 0] elect [+, -, +, +] (a zero sum elects +):
    # [ (1+2)/2, -2/1, 3/1, 0.5/1 ]
    assert torch.equal(get_method("ties")(base, [e1, e2]), torch.tensor([1.5, -2.0, 3.0, 0.5]))
    # weights [1, 3]: weighted deltas [1,-2,3,.5] and [6,3,-3,-1.5], sums [7,1,0,-1]
    # elect [+, +, +, -]: [(1+6)/4, 3/3, 3/1, -1.5/3]
    out = get_method("ties")(base, [e1, e2], weight=[1, 3])
    torch.testing.assert_close(out, torch.tensor([1.75, 1.0, 3.0, -0.5]))


def test_ties_zero_entries_do_not_count():
    base = torch.zeros(2)
    # entry 0: e2 has no edit, so the divisor counts only e1
    out = get_method("ties")(base, [torch.tensor([2.0, 1.0]), torch.tensor([0.0, 3.0])])
    assert torch.equal(out, torch.tensor([2.0, 2.0]))


def test_ties_magnitude_trim_hand_example():
    base = torch.zeros(4)
    e1 = torch.tensor([1.0, -2.0, 3.0, 0.5])  # density 0.5 keeps -2 and 3
    e2 = torch.tensor([0.1, 0.2, 0.3, 4.0])   # density 0.25 keeps 4
    out = get_method("ties")(base, [e1, e2], density=[0.5, 0.25])
    assert torch.equal(out, torch.tensor([0.0, -2.0, 3.0, 4.0]))
    # rescale=True restores each trimmed vector's L1 norm: e1 kept 5 of 6.5
    out = get_method("ties")(base, [e1], density=0.5, rescale=True)
    torch.testing.assert_close(out, torch.tensor([0.0, -2.0, 3.0, 0.0]) * 6.5 / 5)


def test_ties_all_zero_edits_return_base():
    base = torch.tensor([1.0, 2.0])
    assert torch.equal(get_method("ties")(base, [base.clone(), base.clone()]), base)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(0.01, 5.0), min_size=3, max_size=3),
    st.lists(st.floats(0.1, 3.0), min_size=2, max_size=4),
    st.sampled_from([1.0, -1.0]),
)
def test_ties_same_sign_is_weighted_mean(magnitudes, weights, sign):
    base = torch.zeros(3)
    experts = [sign * torch.tensor(magnitudes) * (k + 1) for k in range(len(weights))]
    out = get_method("ties")(base, experts, weight=weights)
    expected = sum(w * e for w, e in zip(weights, experts)) / sum(weights)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------


def _dare_inputs():
    g = _gen(3)
    base = torch.randn(2000, generator=g)
    experts = [base + torch.randn(2000, generator=g) for _ in range(2)]
    return base, experts


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_reproducible_per_seed(name):
    base, experts = _dare_inputs()
    a = _call(name, base, experts, density=0.5, rng=_gen(7))
    b = _call(name, base, experts, density=0.5, rng=_gen(7))
    c = _call(name, base, experts, density=0.5, rng=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # without an rng, `seed` seeds a fresh generator
    assert torch.equal(_call(name, base, experts, density=0.5, seed=7), a)


def test_dare_drops_about_one_minus_density():
    base, experts = _dare_inputs()
    out = get_method("dare_linear")(base, experts[:1], density=0.3, rng=_gen(0))
    kept = float((out != base).float().mean())
    assert abs(kept - 0.3) < 0.05


def test_dare_unbiased_in_expectation():
    base, experts = _dare_inputs()
    target = get_method("task_arithmetic")(base, experts, weight=0.5)
    edit = (target - base).norm()

    def mean_over_seeds(rescale):
        draws = [
            get_method("dare_linear")(base, experts, density=0.5, weight=0.5, rescale=rescale, rng=_gen(s))
            for s in range(300)
        ]
        return torch.stack(draws).mean(dim=0)

    # Each entry's Monte-Carlo error is ~|tau|/sqrt(300); relative error ~0.06.
    assert float((mean_over_seeds(True) - target).norm() / edit) < 0.12
    # Without rescaling the mean is half the edit: the tolerance does fail.
    assert float((mean_over_seeds(False) - target).norm() / edit) > 0.4


@pytest.mark.parametrize("name, same_as", [("dare_linear", "task_arithmetic"), ("dare_ties", "ties")])
def test_dare_density_one_draws_nothing(name, same_as):
    base, experts = _dare_inputs()
    out = _call(name, base, experts, normalize=True)
    torch.testing.assert_close(out, _call(same_as, base, experts, normalize=True))


def test_dare_rng_checks():
    base, experts = _dare_inputs()
    with pytest.raises(CurvlensError, match="torch.Generator"):
        get_method("dare_ties")(base, experts, density=0.5, rng=42)


# --------------------------------------------------------------------------
# Fisher
# --------------------------------------------------------------------------


def test_fisher_hand_example_and_zero_fallback():
    thetas = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([4.0, 4.0, 2.0])]
    fis = [torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])]
    out = get_method("fisher")(None, thetas, fis, weight=[1.0, 2.0])
    # entry 0: (1*2*1 + 2*1*4) / (2 + 2) = 2.5; entry 1: no Fisher -> weighted
    # mean (1 + 8)/3 = 3; entry 2: (0 + 2*3*2) / (1 + 6) = 12/7
    torch.testing.assert_close(out, torch.tensor([2.5, 3.0, 12 / 7]))


def test_fisher_floor():
    thetas = [torch.tensor([0.0]), torch.tensor([3.0])]
    fis = [torch.tensor([0.0]), torch.tensor([2.0])]
    # F = [1, 2] after flooring at 1 -> (0 + 6) / 3
    torch.testing.assert_close(get_method("fisher")(None, thetas, fis, fisher_floor=1.0), torch.tensor([2.0]))


def test_fisher_zero_weights_raise():
    with pytest.raises(CurvlensError, match="must not all be 0"):
        get_method("fisher")(None, [torch.ones(1)], [torch.ones(1)], weight=0.0)


# --------------------------------------------------------------------------
# OTA
# --------------------------------------------------------------------------


def _ota_inputs(shape=(4, 3), n=3, seed=4):
    g = _gen(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + torch.randn(shape, generator=g) for _ in range(n)]
    moments = [torch.rand(shape, generator=g) + 0.05 for _ in range(n)]
    return base, experts, moments


def test_ota_equal_moments_is_plain_mean_of_task_vectors():
    base, experts, _ = _ota_inputs()
    v = torch.rand(4, 3, generator=_gen(9))
    out = get_method("ota")(base, experts, [v, v, v])
    expected = base + sum(e - base for e in experts) / 3
    torch.testing.assert_close(out, expected)


def test_ota_without_base_is_curvature_weighted_average():
    thetas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    vs = [torch.tensor([4.0, 1.0]), torch.tensor([1.0, 9.0])]
    # W = sqrt(v): [2, 1] and [1, 3] -> [(2 + 3)/3, (2 + 18)/4]
    out = get_method("ota")(None, thetas, vs, epsilon=0.0)
    torch.testing.assert_close(out, torch.tensor([5 / 3, 5.0]))


def test_ota_power_one_without_base_equals_fisher():
    base, experts, moments = _ota_inputs()
    out = get_method("ota")(None, experts, moments, power=1.0, epsilon=0.0)
    torch.testing.assert_close(out, get_method("fisher")(None, experts, moments))


def test_ota_with_base_matches_formula():
    base, experts, moments = _ota_inputs()
    out = get_method("ota")(base, experts, moments, power=0.25, epsilon=1e-6)
    w = [v.pow(0.25) + 1e-6 for v in moments]
    expected = base + sum(wi * (e - base) for wi, e in zip(w, experts)) / sum(w)
    torch.testing.assert_close(out, expected)


def test_ota_ffg_one_expert_full_edit_and_fallback():
    base = torch.zeros(3)
    experts = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 4.0, 5.0])]
    v = [torch.ones(3), torch.ones(3)]
    # saliency: [1, 4, 9] and [9, 16, 25]; thresholds 5 and 10 keep
    # expert 1: [F, F, T], expert 2: [F, T, T]
    on = get_method("ota")(base, experts, v, ffg_threshold=[5.0, 10.0], fallback_to_base=True)
    # entry 0 masked by both -> base; entry 1 kept by expert 2 only -> its full
    # edit 4; entry 2 kept by both with equal curvature -> mean 4
    torch.testing.assert_close(on, torch.tensor([0.0, 4.0, 4.0]))
    off = get_method("ota")(base, experts, v, ffg_threshold=[5.0, 10.0], fallback_to_base=False)
    torch.testing.assert_close(off, torch.tensor([2.0, 4.0, 4.0]))  # entry 0: plain mean


def test_ota_one_expert_gets_full_edit_despite_tiny_curvature():
    base = torch.zeros(2)
    experts = [torch.tensor([5.0, 1.0]), torch.tensor([-7.0, 1.0])]
    v = [torch.tensor([1e-12, 1.0]), torch.tensor([1.0, 1.0])]
    # expert 2 masked on entry 0 (threshold above its saliency 49); expert 1
    # keeps entry 0 with saliency 2.5e-11 >= 1e-11, and its weight 1e-6 >> epsilon
    out = get_method("ota")(base, experts, v, ffg_threshold=[1e-11, 100.0], epsilon=1e-26)
    torch.testing.assert_close(out, torch.tensor([5.0, 1.0]))


def test_ota_precond_threshold_follows_the_fork():
    base = torch.zeros(2)
    experts = [torch.tensor([1.0, 10.0]), torch.tensor([3.0, 0.0])]
    v = [torch.tensor([4.0, 1.0]), torch.tensor([1.0, 1.0])]
    # with a base: saliency [4, 100] and [9, 0] >= 5 keeps [F, T], [T, F]
    out = get_method("ota")(base, experts, v, precond_threshold=5.0)
    torch.testing.assert_close(out, torch.tensor([3.0, 10.0]))
    # without a base: the raw moments [4, 1] and [1, 1] >= 2 keep [T, F], [F, F]
    out = get_method("ota")(None, experts, v, precond_threshold=2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, 5.0]))  # entry 1 -> plain mean
    # per-expert thresholds, None meaning "no mask for that expert"
    out = get_method("ota")(base, experts, v, precond_threshold=[5.0, None], epsilon=0.0)
    # entry 0: only expert 2 (weight 1) -> 3; entry 1: both, weights 1 and 1 -> 5
    torch.testing.assert_close(out, torch.tensor([3.0, 5.0]))


def test_ota_ffg_density_standalone_is_per_tensor_topk():
    base = torch.zeros(4)
    experts = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([4.0, 3.0, 2.0, 1.0])]
    v = [torch.ones(4), torch.ones(4)]
    out = get_method("ota")(base, experts, v, ffg_density=0.5, fallback_to_base=True)
    # expert 1 keeps entries 2, 3; expert 2 keeps entries 0, 1: each entry one edit
    torch.testing.assert_close(out, torch.tensor([4.0, 3.0, 3.0, 4.0]))
    # the driver's threshold form gives the same merge
    by_t = get_method("ota")(base, experts, v, ffg_density=0.5, ffg_threshold=[9.0, 9.0], fallback_to_base=True)
    torch.testing.assert_close(by_t, out)


def test_ota_combines():
    base = torch.zeros(3)
    experts = [torch.tensor([2.0, 1.0, 3.0]), torch.tensor([4.0, -3.0, 0.1])]
    v = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([9.0, 1.0, 1.0])]
    t = [0.5, 0.5]  # saliency [4, 1, 9] and [144, 9, 0.01]: expert 2 drops entry 2
    # precond: entry 0 weights 1, 3 -> (2 + 12)/4; entry 1 -> (1 - 3)/2; entry 2 -> 3
    pre = get_method("ota")(base, experts, v, ffg_threshold=t, epsilon=0.0)
    torch.testing.assert_close(pre, torch.tensor([3.5, -1.0, 3.0]))
    # linear: mean over all experts of the masked edits
    lin = get_method("ota")(base, experts, v, ffg_threshold=t, combine="linear")
    torch.testing.assert_close(lin, torch.tensor([3.0, -1.0, 1.5]))
    # ties: entry 1 sums to -2, elects -, keeps only -3
    ties = get_method("ota")(base, experts, v, ffg_threshold=t, combine="ties")
    torch.testing.assert_close(ties, torch.tensor([3.0, -3.0, 3.0]))


def test_ota_mask_conflicts_raise():
    base, experts, moments = _ota_inputs()
    with pytest.raises(CurvlensError, match="not both"):
        get_method("ota")(base, experts, moments, precond_threshold=1.0, ffg_density=0.5)
    with pytest.raises(CurvlensError, match="need a base"):
        get_method("ota")(None, experts, moments, ffg_density=0.5)
    with pytest.raises(CurvlensError, match="needs a base"):
        get_method("ota")(None, experts, moments, combine="ties")
    with pytest.raises(CurvlensError, match="choose one"):
        get_method("ota")(base, experts, moments, rank1_approx=True, rank=2)


def test_ota_rank1_and_rank_r_exact_cases_change_nothing():
    base, experts, _ = _ota_inputs()
    g = _gen(5)
    moments = [torch.outer(torch.rand(4, generator=g) + 0.1, torch.rand(3, generator=g) + 0.1)
               for _ in range(3)]
    plain = get_method("ota")(base, experts, moments)
    torch.testing.assert_close(get_method("ota")(base, experts, moments, rank1_approx=True), plain)
    torch.testing.assert_close(get_method("ota")(base, experts, moments, rank=3), plain, atol=1e-4, rtol=1e-4)
    # on 1-D and 0-D tensors compression is a no-op
    b1, e1, v1 = _ota_inputs(shape=(5,))
    torch.testing.assert_close(get_method("ota")(b1, e1, v1, rank1_approx=True, rank=None), get_method("ota")(b1, e1, v1))
    b0, e0, v0 = _ota_inputs(shape=())
    torch.testing.assert_close(get_method("ota")(b0, e0, v0, rank=[1, None, 2]), get_method("ota")(b0, e0, v0))


def test_ota_rank1_changes_a_full_rank_moment():
    base, experts, moments = _ota_inputs()
    assert not torch.allclose(get_method("ota")(base, experts, moments, rank1_approx=True),
                              get_method("ota")(base, experts, moments))


def test_ota_scaling_and_global_normalise():
    base, experts, moments = _ota_inputs()
    scaled = get_method("ota")(base, experts, moments, scaling_factor=[1.0, 50.0, 1.0])
    assert not torch.allclose(scaled, get_method("ota")(base, experts, moments))
    # global normalise divides each expert's v**p * scaling by its own mean,
    # which cancels a per-expert scaling factor
    g1 = get_method("ota")(base, experts, moments, normalise="global")
    g2 = get_method("ota")(base, experts, moments, normalise="global", scaling_factor=[1.0, 50.0, 1.0])
    torch.testing.assert_close(g1, g2)
    means = [m.sqrt().mean() for m in moments]
    w = [m.sqrt() / (mu + 1e-8) + 1e-8 for m, mu in zip(moments, means)]
    expected = base + sum(wi * (e - base) for wi, e in zip(w, experts)) / sum(w)
    torch.testing.assert_close(g1, expected)


def test_ota_zero_weight_without_mask_gives_mean_not_nan():
    thetas = [torch.tensor([1.0]), torch.tensor([3.0])]
    out = get_method("ota")(None, thetas, [torch.zeros(1), torch.zeros(1)], epsilon=0.0)
    torch.testing.assert_close(out, torch.tensor([2.0]))


def test_ota_zero_d_tensor():
    out = get_method("ota")(torch.tensor(0.0), [torch.tensor(1.0), torch.tensor(3.0)],
                 [torch.tensor(1.0), torch.tensor(9.0)], epsilon=0.0)
    # weights 1 and 3 -> (1 + 9) / 4
    torch.testing.assert_close(out, torch.tensor(2.5))


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(mm_registry._REGISTRY))
def test_cuda_matches_cpu(name):
    base, experts, moments = _ota_inputs()
    params = {"density": 0.5} if name == "ties" else dict(_REQUIRED.get(name, {}))
    if name == "ota":
        params = {"ffg_density": 0.5, "rank1_approx": True, "normalise": "global"}
    base, experts, moments = _fit(name, base, experts, moments)
    cpu = _call(name, base, experts, moments, **params)
    cuda = _call(
        name, None if base is None else base.cuda(), [e.cuda() for e in experts],
        [v.cuda() for v in moments], **params
    )
    assert cuda.device.type == "cuda" and cuda.dtype == torch.float32
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=1e-5)
    if get_method(name).uses_rng:
        with pytest.raises(CurvlensError, match="rng is on cpu"):
            _call(name, base.cuda(), [e.cuda() for e in experts], None,
                  density=0.5, rng=torch.Generator())


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(0, 10_000),
    st.sampled_from([0.25, 0.5, 1.0]),
    st.sampled_from(["none", "global"]),
    st.booleans(),
)
def test_ota_is_a_convex_combination_of_the_experts(n, seed, power, normalise, with_base):
    base, experts, moments = _ota_inputs(shape=(6,), n=n, seed=seed)
    out = get_method("ota")(base if with_base else None, experts, moments, power=power, normalise=normalise)
    stacked = torch.stack(experts)
    assert bool((out >= stacked.min(dim=0).values - 1e-5).all())
    assert bool((out <= stacked.max(dim=0).values + 1e-5).all())


@pytest.mark.parametrize("name, params", [
    ("task_arithmetic", {"weight": [0.3, 1.2, 0.7], "lambda": 0.8}),
    ("ties", {"density": [0.2, 0.5, 1.0]}),
    ("ties", {"density": 0.3, "rescale": True, "normalize": False}),
    ("dare_linear", {"density": [0.4, 1.0, 0.7]}),
    ("dare_ties", {"density": 0.5, "rescale": False}),
])
def test_block_size_does_not_change_the_result(name, params, monkeypatch):
    """The TA family runs in cache-sized blocks with a first pass for top-k
    thresholds, L1 norms and random draws: tiny blocks (with ties at the k-th
    magnitude straddling them) give the whole-tensor answer bit for bit."""
    from curvlens.math import blocks
    from curvlens.math.methods import sparsify

    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 11, generator=g).to(torch.bfloat16)
    experts = [(base.float() + torch.round(torch.randn(37, 11, generator=g) * 3) / 8).to(torch.bfloat16)
               for _ in range(3)]
    fn = get_method(name).fn
    rng = (lambda: torch.Generator().manual_seed(11)) if name.startswith("dare") else (lambda: None)
    whole = fn(base, experts, None, rng=rng(), **params)
    assert whole.dtype == torch.float32
    monkeypatch.setitem(blocks.BLOCK, "cpu", 5)
    assert torch.equal(fn(base, experts, None, rng=rng(), **params), whole)
    if name.startswith("dare"):  # masks redrawn from the saved state, not stored
        monkeypatch.setattr(sparsify, "DARE_MASK_BUDGET", 0)
        assert torch.equal(fn(base, experts, None, rng=rng(), **params), whole)
    # and the bf16 inputs were cast exactly as an fp32 caller would
    f32 = fn(base.float(), [e.float() for e in experts], None, rng=rng(), **params)
    assert torch.equal(f32, whole)


_OTA_BLOCK_CASES = [  # (params, exact, with_base); masks on v*tau**2 and combines need a base
    ({}, True, True), ({}, True, False),
    ({"ffg_density": [0.3, 0.6, 1.0], "fallback_to_base": True}, True, True),
    ({"ffg_threshold": 0.05, "combine": "ties"}, True, True),
    ({"precond_threshold": 0.5, "combine": "linear"}, True, True),
    ({"precond_threshold": 0.5}, True, False),
    ({"normalise": "global", "power": 1.0, "scaling_factor": [1.0, 2.0, 0.5]}, False, True),
    ({"normalise": "global", "power": 1.0, "scaling_factor": [1.0, 2.0, 0.5]}, False, False),
    ({"rank1_approx": True}, True, True), ({"rank1_approx": True}, True, False),
]


@pytest.mark.parametrize("params, exact, with_base", _OTA_BLOCK_CASES)
def test_ota_block_size_does_not_change_the_result(params, exact, with_base, monkeypatch):
    from curvlens.math import blocks

    g = torch.Generator().manual_seed(4)
    base = torch.randn(23, 9, generator=g).to(torch.bfloat16)
    experts = [(base.float() + torch.randn(23, 9, generator=g) / 4).to(torch.bfloat16) for _ in range(3)]
    moments = [torch.rand(23, 9, generator=g) ** 3 for _ in range(3)]
    b = base if with_base else None
    whole = get_method("ota")(b, experts, moments, **params)
    monkeypatch.setitem(blocks.BLOCK, "cpu", 8)
    blocked = get_method("ota")(b, experts, moments, **params)
    if exact:
        assert torch.equal(blocked, whole)
    else:  # the global mean is summed per block: the same up to rounding
        torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, params", [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}),
                                          ("task_arithmetic", {}), ("linear", {}), ("fisher", {}),
                                          ("ota", {"ffg_density": 0.5}), ("ota", {"normalise": "global"})])
def test_empty_tensors_merge_to_empty(name, params):
    base, experts, moments = torch.zeros(0, 4), [torch.zeros(0, 4)] * 2, [torch.ones(0, 4)] * 2
    m = get_method(name)
    out = m.fn(base, experts, moments if m.needs_moments else None, **params)
    assert out.shape == (0, 4) and out.dtype == torch.float32


@pytest.mark.parametrize("xdt, bdt", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                      (torch.float32, torch.float64), (torch.bfloat16, torch.float64)])
@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_around_a_base_of_any_dtype_is_the_fp32_formula(xdt, bdt, flatten):
    """Its task vectors and the base added back are made in place: the bits of
    ``b + pair(x0 - b, x1 - b)`` on fp32 copies, whatever the stored dtypes (an fp64
    base is rounded to fp32 first, as ``.float()`` does), and no input is written."""
    from curvlens.math.methods.spherical import _nuslerp_pair

    g = _gen(9)
    b = (torch.randn(6, 40, generator=g, dtype=torch.float64)).to(bdt)
    xs = [(b.double() + torch.randn(6, 40, generator=g, dtype=torch.float64) * 0.1).to(xdt) for _ in range(2)]
    keep = [t.clone() for t in (b, *xs)]
    out = get_method("nuslerp")(b, xs, weight=[0.3, 0.9], nuslerp_flatten=flatten)
    bf = b.float()
    want = bf + _nuslerp_pair(0.9 / 1.2, xs[0].float() - bf, xs[1].float() - bf, flatten, False)
    assert out.dtype == torch.float32 and torch.equal(out, want)
    assert all(torch.equal(a, k) for a, k in zip((b, *xs), keep))
