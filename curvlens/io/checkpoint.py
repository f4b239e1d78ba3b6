"""``Checkpoint``: a lazy, read-only mapping from parameter name to tensor.

Opening a checkpoint reads only headers (safetensors) or pickled metadata over a
memory map (``torch.load(mmap=True)``), so names, shapes and dtypes are known
without reading tensor data; ``ckpt[name]`` reads exactly one tensor. This is what
lets every pass over a model stream name by name whatever the model's size.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch

from curvlens.errors import CurvlensError
from curvlens.io.lazy import LazyTensors
from curvlens.io.partial import read_chunks
from curvlens.io.paths import contained
from curvlens.roles import param_role

PathLike = Union[str, "os.PathLike[str]"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# safetensors' dtype codes -> torch dtypes (the codes safe_open reports).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it looks like, known without reading it."""

    shape: torch.Size
    dtype: torch.dtype
    file: Path | None  # None for in-memory tensors


def safetensors_infos(file: Path) -> dict[str, TensorInfo]:
    """Read one safetensors header; raise CurvlensError if the file is unusable."""
    from safetensors import safe_open

    if not file.is_file():
        raise CurvlensError(f"{file}: safetensors file not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            infos = {}
            for name in f.keys():
                sl = f.get_slice(name)
                code = sl.get_dtype()
                dtype = SAFETENSORS_DTYPES.get(code)
                if dtype is None:
                    raise CurvlensError(f"{file}: tensor {name!r} has unsupported dtype {code}")
                infos[name] = TensorInfo(torch.Size(sl.get_shape()), dtype, file)
    except CurvlensError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError / OSError
        raise CurvlensError(f"{file}: not a readable safetensors file: truncated or corrupt ({err})") from err
    _check_safetensors_size(file, infos)
    return infos


def _check_safetensors_size(file: Path, infos: dict[str, TensorInfo]) -> None:
    """A truncated file still has a valid header; catch it here rather than on a
    late read deep inside a merge."""
    with open(file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    data = sum(i.shape.numel() * i.dtype.itemsize for i in infos.values())
    expected = 8 + header_len + data
    actual = file.stat().st_size
    if actual < expected:
        raise CurvlensError(
            f"{file}: truncated safetensors file: header promises {expected} bytes, file has {actual}"
        )


def read_safetensor(file: Path, key: str) -> torch.Tensor:
    """Read one tensor, opening the file for just this read.

    safe_open memory-maps the file; a handle kept open keeps every page ever
    touched resident (and counted in RSS) until it closes. Opening per read keeps
    the pages alive only as long as the returned tensor, so a full pass over a
    model holds a few tensors, not the model. Parsing a header costs microseconds.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key)
    except Exception as err:
        raise CurvlensError(f"{file}: could not read tensor {key!r} ({err})") from err


def torch_load(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CurvlensError(f"{file}: file not found")
    try:
        return torch.load(str(file), map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise CurvlensError(
            f"{file}: could not be read with torch.load(mmap=True, weights_only=True) ({err})"
        ) from err


def _tensor_dict(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or the common ``{"state_dict": ...}`` wrapper."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise CurvlensError(f"{file}: expected a state dict of name -> tensor; got "
                            + (f"a {type(obj).__name__}" if not isinstance(obj, Mapping) else
                               "entries that are not str -> tensor"))
    return dict(obj)


class Checkpoint(LazyTensors):
    """A lazy, read-only mapping ``name -> torch.Tensor`` over a model's weights.

    Use :meth:`open`; do not construct directly.

    Examples
    --------
    >>> import torch
    >>> ckpt = Checkpoint.open({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 2)})
    >>> ckpt.shape("model.layers.0.mlp.up_proj.weight")
    torch.Size([4, 2])
    >>> ckpt.describe()[["name", "layer", "role", "numel"]].to_dict("records")
    [{'name': 'model.layers.0.mlp.up_proj.weight', 'layer': 0, 'role': 'up', 'numel': 8}]
    """

    def __init__(
        self,
        infos: dict[str, TensorInfo],
        reader: Callable[[str], torch.Tensor],
        *,
        path: Path | None = None,
        label: str | None = None,
        keeps_order: bool = True,
    ):
        super().__init__(infos, reader)
        self._infos = infos
        self.path = path
        self.label = label or (str(path) if path is not None else "<in-memory state dict>")
        #: Whether iteration follows the order the tensors were saved in (a state
        #: dict's, i.e. the model's); safetensors files sort their names.
        self.keeps_order = keeps_order

    # -- construction -------------------------------------------------------------
    @classmethod
    def open(cls, source: PathLike | Mapping[str, torch.Tensor] | Checkpoint) -> Checkpoint:
        """Open a checkpoint lazily.

        Parameters
        ----------
        source : path, mapping or Checkpoint
            An HF model dir (sharded safetensors with ``model.safetensors.index.json``,
            a single ``model.safetensors``, ``pytorch_model.bin`` or sharded ``.bin``
            with its index); a single ``.safetensors``, ``.pt`` or ``.bin`` file; or an
            in-memory dict of tensors (used as is, not copied).

        Returns
        -------
        Checkpoint

        Raises
        ------
        CurvlensError
            If the path does not exist, holds no recognised weights, an index names a
            missing shard, or a file is truncated or corrupt.
        """
        if isinstance(source, Checkpoint):
            return source
        if isinstance(source, Mapping):
            return cls._from_dict(dict(source))
        if not isinstance(source, (str, Path)) and not hasattr(source, "__fspath__"):
            raise CurvlensError(f"a checkpoint must be a path, a mapping of tensors or a Checkpoint; "
                                f"got {type(source).__name__}")
        path = Path(source)
        if path.is_dir():
            ckpt = cls._from_dir(path)
        elif path.is_file():
            ckpt = cls._from_file(path)
        else:
            raise CurvlensError(f"{path}: no such file or directory")
        if not len(ckpt):
            raise CurvlensError(f"{path}: holds no tensors; expected a model's weights")
        return ckpt

    @classmethod
    def _from_dict(cls, tensors: dict[str, torch.Tensor], path: Path | None = None) -> Checkpoint:
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CurvlensError(f"state dict values must be tensors; not tensors: {bad[:5]}")
        bad = [k for k in tensors if not isinstance(k, str)]
        if bad:
            raise CurvlensError(f"state dict keys must be parameter names (str); got {bad[:5]}")
        infos = {k: TensorInfo(v.shape, v.dtype, path) for k, v in tensors.items()}
        return cls(infos, tensors.__getitem__, path=path)

    @classmethod
    def _from_dir(cls, d: Path) -> Checkpoint:
        def inside(name: str) -> Path:
            return contained(d, name, source=d)

        if inside(SAFETENSORS_INDEX).is_file():
            return cls._from_safetensors(_index_files(d, SAFETENSORS_INDEX), path=d)
        if inside(SAFETENSORS_SINGLE).is_file():
            return cls._from_safetensors({None: d / SAFETENSORS_SINGLE}, path=d)
        if inside(BIN_INDEX).is_file():
            return cls._from_bins(_index_files(d, BIN_INDEX), path=d)
        if inside(BIN_SINGLE).is_file():
            return cls._from_bins({None: d / BIN_SINGLE}, path=d)
        raise CurvlensError(
            f"{d}: no model weights found; expected one of {SAFETENSORS_INDEX}, "
            f"{SAFETENSORS_SINGLE}, {BIN_INDEX}, {BIN_SINGLE}"
        )

    @classmethod
    def _from_file(cls, f: Path) -> Checkpoint:
        if f.suffix == ".safetensors":
            return cls._from_safetensors({None: f}, path=f)
        if f.suffix in (".pt", ".pth", ".bin"):
            return cls._from_bins({None: f}, path=f)
        if f.name.endswith(".index.json"):
            return cls._from_dir(f.parent)
        raise CurvlensError(f"{f}: unknown checkpoint file type; expected .safetensors, .pt, .pth or .bin")

    @classmethod
    def _from_safetensors(cls, files: dict[str | None, Path], path: Path) -> Checkpoint:
        infos: dict[str, TensorInfo] = {}
        for file in dict.fromkeys(files.values()):
            _add_unique(infos, safetensors_infos(file), file)
        _check_index_agrees(files, infos, path)

        def read(name: str) -> torch.Tensor:
            return read_safetensor(infos[name].file, name)

        ckpt = cls(infos, read, path=path, keeps_order=False)
        ckpt._partial = lambda name, starts, length: read_chunks(infos[name].file, name, starts, length)
        return ckpt

    @classmethod
    def _from_bins(cls, files: dict[str | None, Path], path: Path) -> Checkpoint:
        # torch.load(mmap=True) maps the file; tensors carry shape/dtype without
        # their pages being read, so this stays lazy.
        tensors: dict[str, torch.Tensor] = {}
        owner: dict[str, Path] = {}
        for file in dict.fromkeys(files.values()):
            for k, v in _tensor_dict(torch_load(file), file).items():
                if k in owner:
                    raise CurvlensError(f"tensor {k!r} is stored twice, in {owner[k]} and in {file}; "
                                        "expected each tensor in one shard")
                tensors[k] = v
                owner[k] = file
        infos = {k: TensorInfo(v.shape, v.dtype, owner[k]) for k, v in tensors.items()}
        _check_index_agrees(files, infos, path)
        return cls(infos, lambda name: tensors[name].clone(), path=path)

    def __repr__(self) -> str:
        n = sum(i.shape.numel() for i in self._infos.values())
        return f"Checkpoint({self.label!r}, tensors={len(self)}, params={n:,})"

    def shape(self, name: str) -> torch.Size:
        """Shape of tensor ``name`` (no data read)."""
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """dtype of tensor ``name`` (no data read)."""
        return self._info(name).dtype

    def file(self, name: str) -> Path | None:
        """The file holding tensor ``name`` (None when in memory)."""
        return self._info(name).file

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CurvlensError(f"{self.label}: no tensor named {name!r}") from None

    @property
    def numel(self) -> int:
        """Total number of parameters."""
        return sum(i.shape.numel() for i in self._infos.values())

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(i.shape.numel() * i.dtype.itemsize for i in self._infos.values())

    def describe(self):
        """One row per tensor: ``name, layer, role, shape, dtype, numel``; reads no data.

        Returns
        -------
        pandas.DataFrame
        """
        import pandas as pd

        rows = []
        for name, info in self._infos.items():
            layer, role = param_role(name)
            rows.append(
                {
                    "name": name,
                    "layer": layer,
                    "role": role,
                    "shape": tuple(info.shape),
                    "dtype": str(info.dtype).replace("torch.", ""),
                    "numel": info.shape.numel(),
                }
            )
        df = pd.DataFrame(rows, columns=["name", "layer", "role", "shape", "dtype", "numel"])
        df["layer"] = df["layer"].astype("Int64")
        return df


def _add_unique(infos: dict[str, TensorInfo], new: dict[str, TensorInfo], file: Path) -> None:
    for k, info in new.items():
        if k in infos:
            raise CurvlensError(f"tensor {k!r} is stored twice, in {infos[k].file} and in {file}; "
                                "expected each tensor in one shard")
        infos[k] = info


def _no_duplicate_keys(pairs: list) -> dict:
    """JSON objects whose keys repeat (a tensor listed twice) are refused, not
    silently resolved to the last entry."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _index_files(d: Path, index_name: str) -> dict[str, Path]:
    """Read an HF index and return name -> shard path, every shard inside ``d``
    and existing."""
    index_path = d / index_name
    try:
        index = json.loads(index_path.read_text(), object_pairs_hook=_no_duplicate_keys)
    except (OSError, ValueError) as err:
        raise CurvlensError(f"{index_path}: not a readable JSON index ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CurvlensError(f"{index_path}: expected a JSON object with a 'weight_map' of tensor name -> "
                            f"shard file; got {type(weight_map if isinstance(index, dict) else index).__name__}")
    if not weight_map:
        raise CurvlensError(f"{index_path}: 'weight_map' is empty; expected tensor name -> shard file")
    files: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CurvlensError(f"{index_path}: entry {name!r} maps to {shard!r}; expected a shard file name")
        if shard not in checked:
            checked[shard] = contained(d, shard, source=index_path, entry=name)
        files[name] = checked[shard]
    missing = sorted(s for s, f in checked.items() if not f.is_file())
    if missing:
        raise CurvlensError(f"{index_path}: names shard(s) that do not exist: {', '.join(missing)}")
    return files


def _check_index_agrees(files: dict[str | None, Path], infos: dict[str, TensorInfo], path: Path) -> None:
    """An index and its shards must agree both ways; a mismatch means a broken download."""
    if None in files:
        return
    for name, shard in files.items():
        if name not in infos:
            raise CurvlensError(f"index says tensor {name!r} is in {shard}, but that shard lacks it")
        if infos[name].file != shard:
            raise CurvlensError(
                f"index says tensor {name!r} is in {shard}, but it was found in {infos[name].file}"
            )
    extra = [n for n in infos if n not in files]
    if extra:
        raise CurvlensError(f"{path}: shard {infos[extra[0]].file} holds tensor(s) the index does not list: "
                            f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
