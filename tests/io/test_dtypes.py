"""dtype names and the written-dtype rule every writer of weights shares."""
import pytest
import torch

from curvlens import CurvlensError
from curvlens.io.dtypes import DTYPES, dtype_overrides, output_dtype, parse_dtype


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_name_parses_and_names_round_trip(name):
    dt = parse_dtype(name)
    assert parse_dtype(name.upper()) is dt and parse_dtype(dt) is dt
    assert parse_dtype(dtype_overrides(dt)["torch_dtype"]) is dt


@pytest.mark.parametrize("bad", ["float8", "int8", "", "bfloat"])
def test_unknown_names_say_what_is_valid(bad):
    with pytest.raises(CurvlensError, match=r"expected one of \['bf16', 'bfloat16'"):
        parse_dtype(bad)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                    torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("requested", [None, torch.bfloat16, torch.float16, torch.float32])
def test_a_requested_dtype_applies_to_floating_tensors_only(stored, requested):
    want = requested if (requested is not None and stored.is_floating_point) else stored
    assert output_dtype(stored, requested) == want
    assert dtype_overrides(requested) == ({} if requested is None else
                                          {"torch_dtype": str(requested)[6:], "dtype": str(requested)[6:]})
