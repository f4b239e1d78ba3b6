"""estimate_fisher: known answers, chunking, the moments layout and safe outputs."""
import pytest
import torch
from safetensors import safe_open

import curvlens as cl
from curvlens.errors import CurvlensError


class _Linear(torch.nn.Module):
    """y_hat = w.x + b, called as model(input=x)."""

    def __init__(self, w, b):
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(w, dtype=torch.float32))
        self.b = torch.nn.Parameter(torch.tensor(float(b)))

    def forward(self, input):
        return input @ self.w + self.b


def _mse(out, ex):
    return 0.5 * (out[0] - ex["labels"]) ** 2


def _data(n=11, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, generator=g)


def _closed_form(x, y, w, b):
    r = x.double() @ torch.as_tensor(w).double() + b - y.double()  # residual per example
    return {"w": (r[:, None] * x.double()).pow(2).mean(0), "b": r.pow(2).mean()}


def test_linear_regression_mse_exact_values(tmp_path):
    x, y = _data()
    w, b = [0.5, -1.0, 2.0, 0.25], 0.3
    f = cl.estimate_fisher(_Linear(w, b), [{"input": x, "labels": y}], tmp_path / "fisher", loss=_mse,
                           device="cpu", progress=False)
    exp = _closed_form(x, y, w, b)
    torch.testing.assert_close(f["w"].double(), exp["w"], rtol=1e-5, atol=0)
    torch.testing.assert_close(f["b"].double(), exp["b"], rtol=1e-5, atol=0)
    assert f.path == tmp_path / "fisher" / "export" / "exp_avg_sq.safetensors"
    with safe_open(str(f.path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["kind"] == "empirical_fisher" and meta["n_examples"] == "11"
    assert meta["dtype"] == "float32" and meta["loss"].startswith("callable")
    assert "step" not in meta and "beta2" not in meta  # no Adam bias correction possible
    assert f.fisher_info["n_examples"] == "11"


@pytest.mark.parametrize("vectorize", [True, False])
def test_chunk_size_and_batching_do_not_change_the_result(vectorize):
    x, y = _data(n=13)
    model = _Linear([1.0, 0.0, -1.0, 0.5], -0.2)
    ref = cl.estimate_fisher(model, [{"input": x, "labels": y}], loss=_mse, chunk_size=13,
                             device="cpu", progress=False)
    for chunk in (1, 4):
        batches = [{"input": x[:5], "labels": y[:5]}, {"input": x[5:], "labels": y[5:]}]
        f = cl.estimate_fisher(model, batches, loss=_mse, chunk_size=chunk, vectorize=vectorize,
                               device="cpu", progress=False)
        for k in ("w", "b"):
            torch.testing.assert_close(f[k], ref[k], rtol=1e-6, atol=1e-9)
    first = cl.estimate_fisher(model, [{"input": x, "labels": y}], loss=_mse, max_examples=6,
                               device="cpu", progress=False)
    exp = _closed_form(x[:6], y[:6], [1.0, 0.0, -1.0, 0.5], -0.2)
    torch.testing.assert_close(first["w"].double(), exp["w"], rtol=1e-5, atol=0)
    assert first.fisher_info["n_examples"] == "6"
    assert model.training  # the caller's mode is restored


def test_bad_inputs_and_outputs_are_refused(tmp_path):
    x, y = _data(n=4)
    model = _Linear([1.0, 0.0, 0.0, 0.0], 0.0)
    est = lambda batches, out=None, **kw: cl.estimate_fisher(model, batches, out, loss=_mse, device="cpu",  # noqa: E731
                                                              progress=False, **kw)
    with pytest.raises(CurvlensError, match="no examples"):
        est([])
    with pytest.raises(CurvlensError, match="disagree"):
        est([{"input": x, "labels": y[:2]}])
    with pytest.raises(CurvlensError, match="chunk_size"):
        est([{"input": x, "labels": y}], chunk_size=0)
    out = tmp_path / "f.safetensors"
    est([{"input": x, "labels": y}], out)
    with pytest.raises(CurvlensError, match="already exists"):
        est([{"input": x, "labels": y}], out)
    est([{"input": x, "labels": y}], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]  # no partial file left
    with pytest.raises(CurvlensError, match="causal_lm"):
        cl.estimate_fisher(model, [{"input": x}], device="cpu", progress=False)


def _zoo_batches(zoo, n=12, width=None):
    from curvlens.zoo.fisher_study import training_batches

    return training_batches(zoo, "math", n_examples=n, batch_size=5)


def test_zoo_llama_fisher_is_read_back_and_taken_by_experts(quick_zoo, tmp_path):
    batches = _zoo_batches(quick_zoo)
    d = quick_zoo.expert_dirs["math"]
    f = cl.estimate_fisher(d, batches, tmp_path / "fisher-math", chunk_size=4, device="cpu", progress=False)
    ckpt = cl.Checkpoint.open(d)
    assert set(f) == set(ckpt.keys())
    f.validate(ckpt)
    m = cl.Moments.open(tmp_path / "fisher-math")  # the moments reader finds the layout in a dir
    assert m.step is None and torch.equal(m["lm_head.weight"], f["lm_head.weight"])
    ex = cl.Experts.from_dirs(quick_zoo.base_dir, [d, d], names=["adam", "fisher"],
                              moments=[d, tmp_path / "fisher-math"])
    overlap = cl.curvature_overlap(ex, progress=False, device="cpu")
    assert len(overlap) == len(ckpt.keys()) and overlap["cosine"].between(0, 1).all()
    # known answer: the model's own HF loss, one example at a time with plain autograd
    from transformers import AutoModelForCausalLM

    from curvlens.runtime import torch_threads

    model = AutoModelForCausalLM.from_pretrained(d).eval()
    sq = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    with torch_threads(1):  # two threads on a busy 2-core machine: many times slower
        for b in batches:
            for i in range(b["input_ids"].shape[0]):
                model.zero_grad()
                model(**{k: v[i:i + 1] for k, v in b.items()}, use_cache=False).loss.backward()
                for n, p in model.named_parameters():
                    sq[n] += p.grad ** 2
                count += 1
    for n in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(f[n], sq[n] / count, rtol=1e-4, atol=1e-9)
    # the model's own loss with its 2-D mask cannot be vmapped: falls back, same numbers
    with pytest.warns(UserWarning, match="one example at a time"):
        g = cl.estimate_fisher(d, batches, loss="model", chunk_size=4, device="cpu", progress=False)
    assert g.fisher_info["per_example"] == "loop"
    torch.testing.assert_close(g["lm_head.weight"], f["lm_head.weight"], rtol=1e-4, atol=1e-9)


def test_zoo_output_never_beside_the_weights(quick_zoo, tmp_path):
    d = quick_zoo.expert_dirs["math"]
    with pytest.raises(CurvlensError, match="beside the weights"):
        cl.estimate_fisher(d, [], d / "fisher.safetensors", device="cpu", progress=False)
    with pytest.raises(CurvlensError, match="already exists"):  # the Adam moments stay
        cl.estimate_fisher(d, [], d, device="cpu", progress=False)


def test_fisher_vs_adam_known_answers(quick_zoo, tmp_path):
    experts = quick_zoo.experts().subset(["math", "code"])
    # Adam v given as the "Fisher": every same-expert agreement is exact
    same = {n: quick_zoo.expert_dirs[n] for n in experts.names}
    seen = []

    def evaluate(ckpt):
        seen.append(float(sum(ckpt[n].double().sum() for n in ckpt.keys())))
        return __import__("pandas").DataFrame({"capability": ["addition"], "accuracy": [0.5]})

    df = cl.fisher_vs_adam(experts, same, density=0.2, evaluate=evaluate, device="cpu", progress=False)
    assert list(df.columns) == ["analysis", "curvature", "expert_a", "expert_b", "method", "metric", "value"]
    ident = df[df["curvature"] == "adam~fisher"]
    assert set(ident["expert_a"]) == {"math", "code"}
    for m in ("cosine", "pearson_log", "spearman_log", "jaccard_top1", "jaccard_top10", "jaccard@0.2"):
        assert ident.loc[ident["metric"] == m, "value"].tolist() == pytest.approx([1.0, 1.0], abs=1e-5), m
    pairs = df[df["curvature"].isin(["adam", "fisher"]) & (df["analysis"] == "curvature_overlap")]
    a = pairs[pairs["curvature"] == "adam"]["value"].to_numpy()
    f = pairs[pairs["curvature"] == "fisher"]["value"].to_numpy()
    assert len(a) == 5 and a == pytest.approx(f)
    assert seen[0] == seen[1]  # the same curvature gives the same OTA+FFG merge
    assert len(df[df["analysis"] == "merge_score"]) == 2
    with pytest.raises(CurvlensError, match="no Fisher"):
        cl.fisher_vs_adam(experts, {"math": same["math"]}, device="cpu", progress=False)
