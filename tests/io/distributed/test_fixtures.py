"""Moments read from real DeepSpeed ZeRO 1/2/3 and FSDP2/DCP checkpoints equal the
live optimizer's, bitwise, without DeepSpeed installed (checked-in fixtures)."""
import json

import pytest
import torch

from curvlens import Experts, Moments
from tests.io.distributed.conftest import FIXTURES, LAYOUTS, expected


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_moments_equal_the_live_optimizer_bitwise(layout):
    want, meta = expected(LAYOUTS[layout])
    m = Moments.open(FIXTURES / layout)
    assert set(m) == set(want)
    for name, v in want.items():
        got = m[name]
        assert got.dtype == torch.float32 and got.shape == v.shape, name
        assert torch.equal(got, v), name
    assert m.step == int(meta["step"])
    if layout != "zero2_elastic":  # elastic checkpoints keep no param_groups, so no betas
        assert m.beta2 == json.loads(meta["betas"])[1]


@pytest.mark.parametrize("layout,fields", [
    ("zero1", {"format": "deepspeed", "zero_stage": "1", "world_size": "2", "tag": "global_step3",
               "ds_version": "0.19.8", "step": "3", "betas": "[0.9, 0.999]"}),
    ("zero2_elastic", {"format": "deepspeed", "zero_stage": "2", "world_size": "2", "elastic": "True", "step": "3"}),
    ("zero3", {"format": "deepspeed", "zero_stage": "3", "world_size": "2", "step": "3"}),
    ("fsdp2", {"format": "torch.distributed.checkpoint", "files": "2", "state_key": "optim", "step": "3",
               "betas": "[0.9, 0.999]"}),
    ("same_run/a/dcp", {"format": "torch.distributed.checkpoint", "state_key": "optimizer"}),
])
def test_each_reader_describes_its_source(layout, fields):
    meta = Moments.open(FIXTURES / layout).metadata
    assert {k: meta.get(k) for k in fields} == fields


@pytest.mark.parametrize("entry", ["zero1/latest", "zero1/global_step3", "zero3/global_step3",
                                   "fsdp2/dcp", "same_run/a/dcp/optimizer_0"])
def test_every_entry_point_of_a_layout_opens(entry):
    run = LAYOUTS[entry.split("/global_step")[0].removesuffix("/latest").removesuffix("/dcp")
                  .removesuffix("/optimizer_0")]
    want, _ = expected(run)
    m = Moments.open(FIXTURES / entry)
    assert all(torch.equal(m[n], want[n]) for n in want)


def test_bias_correction_uses_the_step_and_beta2_the_files_record():
    raw, corrected = Moments.open(FIXTURES / "zero3"), Moments.open(FIXTURES / "zero3", bias_correction=True)
    name = "lm_head.weight"
    assert torch.allclose(corrected[name], raw[name] / (1 - 0.999 ** 3))


@pytest.mark.parametrize("layout", ["zero1", "zero3", "fsdp2", "same_run/a/dcp"])
def test_experts_open_from_the_dirs_and_validate(layout):
    d = FIXTURES / layout
    experts = Experts.from_dirs(FIXTURES / "same_run" / "base", [d, FIXTURES / "same_run/b/deepspeed"],
                                names=["x", "y"])
    assert experts.has_moments
    experts.experts[0].moments.validate(d)
    batch = next(iter(experts.iter_tensors(progress=False)))
    assert all(torch.isfinite(v).all() for v in batch.moments)


def test_a_moment_is_read_from_its_pieces_only(monkeypatch):
    """Streaming: reading one ZeRO-1/2 moment that lives on one rank loads that rank's file only."""
    import curvlens.io.deepspeed as ds

    m = Moments.open(FIXTURES / "zero1")
    loaded = []
    real = ds.load_torch_file
    monkeypatch.setattr(ds, "load_torch_file", lambda f, allow: loaded.append(f.name) or real(f, allow))
    m["model.embed_tokens.weight"]  # the first parameter: entirely on rank 0
    assert loaded == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    loaded.clear()
    m["model.layers.0.mlp.gate_proj.weight"]  # straddles the rank boundary
    assert loaded == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_dcp_reads_only_the_byte_ranges_of_the_tensor_asked_for(monkeypatch):
    import builtins

    m = Moments.open(FIXTURES / "fsdp2")
    reads = []
    real_open = builtins.open

    class Spy:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

        def seek(self, n):
            return self.fh.seek(n)

        def read(self, n=-1):
            reads.append(n)
            return self.fh.read(n)

    def spy_open(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        return Spy(fh) if str(file).endswith(".distcp") else fh

    monkeypatch.setattr(builtins, "open", spy_open)
    m["model.norm.weight"]
    assert len(reads) == 2 and all(0 < n < 4096 for n in reads)  # two chunks, one record each
