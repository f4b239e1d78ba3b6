"""``read_chunks``: pieces of a safetensors tensor by pread equal the same pieces of
the whole tensor, in every dtype it reads; a piece outside the tensor, a corrupt
header or a truncated file is a CurvlensError naming the file."""
import pytest
import torch
from safetensors.torch import save_file

from curvlens.errors import CurvlensError
from curvlens.io.partial import gather_chunks, read_chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_chunks_equal_the_whole_tensors_pieces(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, generator=g).to(dtype), "b": (torch.randn(6, 5, generator=g) * 100).to(dtype)}
    f = tmp_path / "m.safetensors"
    save_file(tensors, str(f))
    starts = [0, 3, 25, 27]
    got = read_chunks(f, "b", starts, 3)
    assert got.dtype == dtype and got.shape == (4, 3)
    assert torch.equal(got, gather_chunks(tensors["b"], starts, 3))
    assert torch.equal(got[2], tensors["b"].reshape(-1)[25:28])


def test_a_chunk_outside_the_tensor_is_refused(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, str(f))
    for start in (-1, 2):  # 2..5 runs past a's 4 entries into b's bytes
        with pytest.raises(CurvlensError, match="lies outside the tensor"):
            read_chunks(f, "a", [start], 3)
    with pytest.raises(CurvlensError, match="no readable tensor 'c'"):
        read_chunks(f, "c", [0], 1)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]"])
def test_a_corrupt_header_is_refused(tmp_path, body):
    f = tmp_path / "m.safetensors"
    f.write_bytes(len(body).to_bytes(8, "little") + body + bytes(16))
    with pytest.raises(CurvlensError, match="corrupt safetensors header"):
        read_chunks(f, "w", [0], 1)


def test_a_file_truncated_after_it_was_opened_is_refused(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(f))
    f.write_bytes(f.read_bytes()[:-40])  # the last 10 entries gone
    with pytest.raises(CurvlensError, match="truncated while reading 'w'"):
        read_chunks(f, "w", [60], 4)
