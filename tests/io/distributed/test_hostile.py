"""Tampered DeepSpeed and DCP checkpoints: each is a CurvlensError naming the file,
rank or tensor and what was expected; nothing is read outside the dir."""
import pickle
import shutil

import pytest
import torch

from curvlens import CurvlensError, Moments

R0, R1 = "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture
def ds_classes(monkeypatch):
    """Plain local classes under DeepSpeed's module paths (fake modules), so a test can
    rewrite a DeepSpeed file without DeepSpeed installed."""
    import enum
    import sys
    import types

    def module(path):
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if not isinstance(sys.modules.get(name), _Fake):
                monkeypatch.setitem(sys.modules, name, _Fake(name))
        return sys.modules[path]

    def plain(path):
        mod, name = path.rsplit(".", 1)
        setattr(module(mod), name, type(name, (), {"__module__": mod, "__qualname__": name}))

    plain("deepspeed.runtime.fp16.loss_scaler.LossScaler")
    plain("deepspeed.utils.tensor_fragment.fragment_address")
    cfg = module("deepspeed.runtime.zero.config")
    cfg.ZeroStageEnum = enum.IntEnum("ZeroStageEnum", {"disabled": 0, "optimizer_states": 1, "gradients": 2,
                                                       "weights": 3}, module=cfg.__name__)


class _Fake(__import__("types").ModuleType):
    pass


def _edit(file, change):
    """Rewrite one of our own fixture copies with ``change(obj)`` applied (a trusted
    test file, so a plain torch.load; DeepSpeed's classes come from ``ds_classes``)."""
    obj = torch.load(file, weights_only=False)
    change(obj)
    torch.save(obj, file)


def _osd(obj):
    return obj["optimizer_state_dict"]


# ------------------------------------------------------------------ missing / extra shards
def test_a_missing_middle_shard_names_the_rank(fixture_copy):
    d = fixture_copy("zero1")
    (d / "global_step3" / R0).unlink()
    with pytest.raises(CurvlensError, match=r"optimizer shard\(s\) of rank\(s\) \[0\] are missing"):
        Moments.open(d)


def test_a_missing_last_shard_is_caught_by_the_world_size_the_files_record(fixture_copy):
    d = fixture_copy("zero3")
    (d / "global_step3" / R1).unlink()
    with pytest.raises(CurvlensError, match=r"says the run had 2 data-parallel ranks, but .* holds optimizer "
                                            r"files for 1"):
        Moments.open(d)


def test_a_missing_model_states_file_is_named(fixture_copy):
    d = fixture_copy("zero1")
    (d / "global_step3" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CurvlensError, match=r"mp_rank_00_model_states\.pt is missing"):
        Moments.open(d)


def test_a_shard_from_a_run_of_another_world_size_is_refused(fixture_copy):
    d = fixture_copy("zero1")
    shutil.copy(d / "global_step3" / R1, d / "global_step3" / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    with pytest.raises(CurvlensError, match="says the run had 2 data-parallel ranks, but .* files for 3"):
        Moments.open(d)


@pytest.mark.parametrize("name,why", [
    ("zero_pp_rank_0_mp_rank_01_optim_states.pt", "model parallelism"),
    ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16 optimizer without ZeRO"),
    ("expp_rank_0_mp_rank_00_optim_states.pt", "expert-parallel"),
])
def test_layouts_not_read_are_refused_by_name(fixture_copy, name, why):
    d = fixture_copy("zero1")
    shutil.copy(d / "global_step3" / R0, d / "global_step3" / name)
    with pytest.raises(CurvlensError, match=why):
        Moments.open(d)


# ------------------------------------------------------------------ latest / tag dirs
def test_latest_naming_a_dir_outside_is_refused(fixture_copy, tmp_path):
    d = fixture_copy("zero1")
    shutil.copytree(d / "global_step3", tmp_path / "elsewhere")
    (d / "latest").write_text("../elsewhere")
    with pytest.raises(CurvlensError, match="latest names '../elsewhere', which resolves outside"):
        Moments.open(d)


def test_latest_naming_no_checkpoint_is_refused(fixture_copy):
    d = fixture_copy("zero1")
    (d / "latest").write_text("global_step99")
    with pytest.raises(CurvlensError, match="names the tag 'global_step99', but .* holds no"):
        Moments.open(d)


def test_several_tags_and_no_latest_is_not_guessed(fixture_copy):
    d = fixture_copy("zero1")
    (d / "latest").unlink()
    shutil.copytree(d / "global_step3", d / "global_step6")
    with pytest.raises(CurvlensError, match=r"holds DeepSpeed checkpoints \['global_step3', 'global_step6'\]"):
        Moments.open(d)


# ------------------------------------------------------------------ ranks that disagree
@pytest.mark.parametrize("change,match", [
    (lambda o: _osd(o).__setitem__("partition_count", [3, 3]), "says the run had 3 data-parallel ranks"),
    (lambda o: [s.__setitem__("step", torch.tensor(7.0)) for s in _osd(o)["base_optimizer_state"]["state"].values()],
     "rank 1 records step 7, rank 0 3"),
    (lambda o: _osd(o)["base_optimizer_state"]["state"][0].__setitem__("step", torch.tensor(7.0)),
     r"its param groups record different steps \[3, 7\]"),
    (lambda o: _osd(o)["base_optimizer_state"]["param_groups"][1].__setitem__("betas", (0.9, 0.95)),
     "rank 1 records betas"),
    (lambda o: _osd(o)["base_optimizer_state"]["state"][0].__setitem__(
        "exp_avg_sq", torch.ones(383)), "group 0 partitions differ in size across ranks"),
    (lambda o: _osd(o).__setitem__("group_paddings", [0, 3]), r"group_paddings\[0\] is 0, .* leave 1 "
                                                              "padding entries on rank 1; padding/numel mismatch"),
    (lambda o: setattr(_osd(o)["param_slice_mappings"][0]["lm_head.weight"], "start", 149),
     "param_slice_mappings of group 0 disagree .*lm_head.weight"),
    (lambda o: _osd(o)["base_optimizer_state"]["param_groups"].pop(), "holds 1 param group"),
    (lambda o: _osd(o).__setitem__("zero_stage", 2), "records stage 2, rank 0 1"),
    (lambda o: _osd(o).__setitem__("zero_stage", 3), "partition_count .*expected one world size"),
])
def test_ranks_that_disagree_are_refused_naming_the_rank_file(fixture_copy, ds_classes, change, match):
    d = fixture_copy("zero1")
    _edit(d / "global_step3" / R1, change)
    with pytest.raises(CurvlensError, match=match) as err:
        Moments.open(d)
    assert R1 in str(err.value) or "rank 1" in str(err.value)


def test_zero3_sub_group_sizes_that_do_not_fit_the_shapes_are_refused(fixture_copy, ds_classes):
    d = fixture_copy("zero3")
    _edit(d / "global_step3" / R0, lambda o: _osd(o)["optimizer_state_dict"]["state"][1].__setitem__(
        "exp_avg_sq", torch.ones(121)))  # noqa: E128
    with pytest.raises(CurvlensError, match=r"rank_0_.*sub-group 1 holds 121 .* need 120; padding/numel mismatch"):
        Moments.open(d)


def test_zero3_ranks_whose_param_shapes_disagree_are_refused(fixture_copy):
    d = fixture_copy("zero3")
    f = d / "global_step3" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    obj = torch.load(f, weights_only=True)
    obj["param_shapes"][0]["model.embed_tokens.weight"] = torch.Size([34, 7])
    torch.save(obj, f)
    with pytest.raises(CurvlensError, match="rank_1_mp_rank_00_model_states.pt: its param_shapes differ"):
        Moments.open(d)


def test_shapes_that_do_not_fit_the_flat_partitions_are_refused(fixture_copy):
    d = fixture_copy("zero1")
    f = d / "global_step3" / "mp_rank_00_model_states.pt"
    obj = torch.load(f, weights_only=True)
    obj["param_shapes"][0]["lm_head.weight"] = torch.Size([40, 7])
    torch.save(obj, f)
    with pytest.raises(CurvlensError, match="group 0 holds 2 x 382 moment entries, but its parameters need 812"):
        Moments.open(d)


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("value,what", [(float("nan"), "1 non-finite"), (-1.0, "1 negative")])
def test_non_finite_or_negative_moments_name_the_rank_file_and_tensor(fixture_copy, ds_classes, value, what):
    d = fixture_copy("zero1")

    def poison(o):
        _osd(o)["base_optimizer_state"]["state"][0]["exp_avg_sq"][-2] = value  # lm_head's last entry ([-1]: padding)

    _edit(d / "global_step3" / R1, poison)
    m = Moments.open(d)
    with pytest.raises(CurvlensError, match=rf"{R1} \(rank 1\): tensor 'lm_head.weight' has .*"):
        m["lm_head.weight"]
    assert torch.isfinite(m["model.embed_tokens.weight"]).all()


# ------------------------------------------------------------------ DCP
def test_a_missing_dcp_shard_is_named(fixture_copy):
    d = fixture_copy("fsdp2")
    (d / "dcp" / "__1_0.distcp").unlink()
    with pytest.raises(CurvlensError, match=r"is in __1_0\.distcp, which is missing"):
        Moments.open(d)


def test_a_truncated_dcp_shard_is_named_at_open(fixture_copy):
    d = fixture_copy("fsdp2")
    f = d / "dcp" / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CurvlensError, match=r"__0_0\.distcp: truncated: entry .* needs bytes"):
        Moments.open(d)


def test_a_corrupt_dcp_record_is_named_when_read(fixture_copy):
    d = fixture_copy("fsdp2")
    md_file = d / "dcp" / ".metadata"
    md = pickle.loads(md_file.read_bytes())  # real DCP classes (torch): our own test file
    key = "optim.state.lm_head.weight.exp_avg_sq"
    info = next(v for k, v in md.storage_data.items() if k.fqn == key)
    f = d / "dcp" / info.relative_path
    raw = bytearray(f.read_bytes())
    raw[info.offset: info.offset + 16] = b"\0" * 16
    f.write_bytes(bytes(raw))
    m = Moments.open(d)
    with pytest.raises(CurvlensError, match=r"the record of 'optim.state.lm_head.weight.exp_avg_sq' .* not a "
                                            r"readable torch\.save record"):
        m["lm_head.weight"]


def test_dcp_chunks_that_leave_a_gap_are_refused(fixture_copy):
    d = fixture_copy("fsdp2")
    md_file = d / "dcp" / ".metadata"
    md = pickle.loads(md_file.read_bytes())
    md.state_dict_metadata["optim.state.model.norm.weight.exp_avg_sq"].chunks.pop()
    md_file.write_bytes(pickle.dumps(md))
    with pytest.raises(CurvlensError, match=r"chunks of 'optim.state.model.norm.weight.exp_avg_sq' hold 4 "
                                            r"entries, its shape \(7,\) has 7; a shard is missing"):
        Moments.open(d)


def test_dcp_chunks_that_overlap_are_refused(fixture_copy):
    d = fixture_copy("fsdp2")
    md_file = d / "dcp" / ".metadata"
    md = pickle.loads(md_file.read_bytes())
    chunks = md.state_dict_metadata["optim.state.model.norm.weight.exp_avg_sq"].chunks
    chunks[1].offsets = torch.Size([3])
    md_file.write_bytes(pickle.dumps(md))
    with pytest.raises(CurvlensError, match="overlap"):
        Moments.open(d)


def test_a_dcp_entry_naming_a_file_outside_is_refused(fixture_copy, tmp_path):
    d = fixture_copy("fsdp2")
    shutil.copy(d / "dcp" / "__1_0.distcp", tmp_path / "stolen.distcp")
    md_file = d / "dcp" / ".metadata"
    md = pickle.loads(md_file.read_bytes())
    for info in md.storage_data.values():
        if info.relative_path == "__1_0.distcp":
            info.relative_path = "../../stolen.distcp"
    md_file.write_bytes(pickle.dumps(md))
    with pytest.raises(CurvlensError, match="resolves outside the model dir"):
        Moments.open(d)


def test_a_model_only_dcp_dir_says_it_holds_no_optimizer_state(fixture_copy):
    d = fixture_copy("fsdp2")
    md_file = d / "dcp" / ".metadata"
    md = pickle.loads(md_file.read_bytes())
    md.planner_data = {k: v for k, v in md.planner_data.items() if v[0] == "model"}
    md_file.write_bytes(pickle.dumps(md))
    with pytest.raises(CurvlensError, match=r"holds no optimizer exp_avg_sq \(top-level entries \['model'\]\)"):
        Moments.open(d)


def test_a_compressed_dcp_record_is_refused_by_name(fixture_copy):
    d = fixture_copy("fsdp2")
    md_file = d / "dcp" / ".metadata"
    md = pickle.loads(md_file.read_bytes())
    next(iter(md.storage_data.values())).transform_descriptors = ["zstd"]
    md_file.write_bytes(pickle.dumps(md))
    with pytest.raises(CurvlensError, match=r"stored through transforms \['zstd'\]"):
        Moments.open(d)
