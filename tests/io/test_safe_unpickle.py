"""The restricted unpickler admits the fixed list of plain classes and refuses any
pickle that would run code, naming the file and class, with nothing run."""
import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from curvlens import CurvlensError, Moments
from curvlens.io.dcp import DCP_CLASSES
from curvlens.io.deepspeed import DEEPSPEED_CLASSES
from curvlens.io.safe_unpickle import IntRecord, Record, load_pickle, load_torch_file
from tests.io.distributed.conftest import FIXTURES, fixture_copy  # noqa: F401 (a fixture)


class _RunsCode:
    """Unpickling this would call os.system, writing a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_torch_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    f = tmp_path / "evil_optim_states.pt"
    torch.save({"optimizer_state_dict": {"x": _RunsCode(marker)}, "w": torch.ones(2)}, f)
    with pytest.raises(CurvlensError, match=r"evil_optim_states\.pt: refusing to unpickle it: it names "
                                            r"(posix|os|nt)\.system"):
        load_torch_file(f, DEEPSPEED_CLASSES)
    assert not marker.exists()


def test_a_deepspeed_dir_whose_shard_would_run_code_is_refused(fixture_copy, tmp_path):
    d = fixture_copy("zero1")
    marker = tmp_path / "ran"
    shard = d / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, shard)
    with pytest.raises(CurvlensError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: refusing .*system"):
        Moments.open(d)
    assert not marker.exists()


def test_a_plain_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(CurvlensError, match=r"meta: refusing to unpickle it: it names (posix|os|nt)\.system"):
        load_pickle(pickle.dumps(_RunsCode(marker)), DCP_CLASSES, "meta")
    assert not marker.exists()


def test_a_dcp_metadata_that_would_run_code_is_refused(fixture_copy, tmp_path):
    d = fixture_copy("fsdp2")
    marker = tmp_path / "ran"
    (d / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CurvlensError, match=r"\.metadata: refusing to unpickle it: it names .*system"):
        Moments.open(d)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["builtins.eval", "builtins.getattr", "subprocess.Popen", "torch.load",
                                  "deepspeed.runtime.engine.DeepSpeedEngine", "collections.defaultdict"])
def test_globals_off_the_list_are_refused_by_name(name):
    module, attr = name.rsplit(".", 1)
    data = b"\x80\x02c" + module.encode() + b"\n" + attr.encode() + b"\n)R."
    with pytest.raises(CurvlensError, match=f"it names {name}"):
        load_pickle(data, DCP_CLASSES, "meta")


def test_stand_ins_hold_data_and_run_nothing():
    scaler = DEEPSPEED_CLASSES["deepspeed.runtime.fp16.loss_scaler.LossScaler"]
    stage = DEEPSPEED_CLASSES["deepspeed.runtime.zero.config.ZeroStageEnum"]
    s = scaler.__new__(scaler)
    s.__setstate__({"cur_scale": 1.0})
    assert isinstance(s, Record) and s.cur_scale == 1.0 and type(s).original.endswith("LossScaler")
    assert isinstance(stage(3), IntRecord) and stage(3) == 3


def test_reading_deepspeed_files_never_imports_deepspeed():
    import subprocess
    import sys

    code = ("import sys, curvlens as cl; m = cl.Moments.open(sys.argv[1]); m['lm_head.weight']; "
            "print(any(k == 'deepspeed' or k.startswith('deepspeed.') for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(FIXTURES / "zero3")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_a_truncated_torch_file_is_refused(fixture_copy):
    d = fixture_copy("zero3")
    shard = d / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CurvlensError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: not a readable "
                                            r"torch\.save file \(truncated or corrupt"):
        Moments.open(d)


def test_a_zip_that_is_not_a_torch_file_is_refused(tmp_path):
    f = tmp_path / "x.pt"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("archive/readme.txt", "hi")
    with pytest.raises(CurvlensError, match=r"x\.pt: not a readable torch\.save file"):
        load_torch_file(f, DEEPSPEED_CLASSES)


def test_a_persistent_id_in_a_plain_pickle_is_refused():
    buf = io.BytesIO()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage" if isinstance(obj, list) else None

    P(buf).dump({"a": [1]})
    with pytest.raises(CurvlensError, match="persistent reference"):
        load_pickle(buf.getvalue(), DCP_CLASSES, "meta")
