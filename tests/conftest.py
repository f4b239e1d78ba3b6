"""Shared fixtures: tiny hand-made checkpoints on disk and the quick demo zoo.

The quick zoo is built once per test session (about a minute on 2 CPU cores) in a
session temp dir, unless ``CURVLENS_TEST_CACHE`` names a persistent cache dir
(handy locally: the zoo is then reused across runs).
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


def tiny_llama_shapes(hidden=8, layers=2, inter=12, vocab=16, kv=4):
    """Llama parameter names and shapes, small enough to check by hand."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def make_tiny_zoo(root: Path, n_experts: int = 3, seed: int = 0, dtype=torch.float32):
    """Write base + experts (sharded safetensors) + export/exp_avg_sq.safetensors.

    Returns ``(base_dir, [expert_dirs], {expert: {name: tensor}}, {expert: moments})``.
    """
    from safetensors.torch import save_file

    from curvlens.io.writer import write_model

    g = torch.Generator().manual_seed(seed)
    shapes = tiny_llama_shapes()
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    write_model(base, root / "base", max_shard_size=600)
    dirs, weights, moments = [], {}, {}
    for e in range(n_experts):
        name = f"expert{e}"
        w = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()}
        m = {k: torch.rand(v.shape, generator=g) * 1e-3 for k, v in base.items()}
        d = write_model(w, root / name, max_shard_size=600)
        (d / "export").mkdir()
        save_file(m, str(d / "export" / "exp_avg_sq.safetensors"))
        dirs.append(d)
        weights[name], moments[name] = w, m
    return root / "base", dirs, weights, moments


@pytest.fixture
def tiny_zoo(tmp_path):
    return make_tiny_zoo(tmp_path)


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory):
    """The quick demo zoo, built once per session."""
    zoo = pytest.importorskip("curvlens.zoo")
    cache = os.environ.get("CURVLENS_TEST_CACHE") or tmp_path_factory.mktemp("zoo-cache")
    return zoo.build("quick", cache_dir=cache, progress=False)


def pytest_runtest_setup(item):
    # one rule for every CUDA test: marked `cuda`, skipped (with the reason) without a device
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (benchmarks/gpu_check.py runs these on a GPU machine)")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="session")
def plain_c_build(tmp_path_factory):
    """The C kernels built without -mavx2/-mfma (the portable C loops), in a cache
    of their own: what a machine without AVX2 runs, to compare with this one's
    AVX2 build bit for bit. Skips where the kernels are not built with AVX2."""
    from curvlens.math import native

    if native.lib() is None:
        pytest.skip(f"no C kernels: {native.reason()}")
    if "-mavx2" not in native._flags():
        pytest.skip("this machine's kernels are built without AVX2 already")
    with pytest.MonkeyPatch.context() as mp:  # undone before the tests run
        mp.setenv("CURVLENS_CACHE", str(tmp_path_factory.mktemp("plain")))
        mp.setattr(native, "_flags", lambda f=native._flags: [x for x in f() if x not in ("-mavx2", "-mfma")])
        return native._build()
