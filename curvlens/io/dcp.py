"""Adam second moments from a ``torch.distributed.checkpoint`` (DCP) dir, with no
process group and without torch's own (``pickle.load``) metadata reader.

FSDP2 (``fully_shard``) and FSDP1 save optimizer states through DCP: a dir with a
``.metadata`` pickle and one ``__R_0.distcp`` file per rank. The metadata lists,
for every flattened key of the saved state dict, its full size and its chunks
(offsets and sizes in the full tensor), and for every chunk the file, byte offset
and length of a ``torch.save`` record; ``planner_data`` maps each flattened key
back to its path in the nested dict, so ``("optim", "state", FQN, "exp_avg_sq")``
names a moment whatever dots the parameter name holds.

Opening unpickles ``.metadata`` with :func:`curvlens.io.safe_unpickle.load_pickle`
(DCP's classes replaced by inert stand-ins), checks that each moment's chunks tile
it exactly and that every byte range lies inside its file, and reads the small
``step`` and ``betas`` records. Reading a moment reads only its chunks' byte
ranges (each a ``torch.save`` record, loaded with ``weights_only=True``).
"""
from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from curvlens.errors import CurvlensError
from curvlens.io.sharded_source import ShardedSource, betas_of, describe, step_count
from curvlens.io.paths import contained
from curvlens.io.safe_unpickle import Record, load_pickle, stand_ins

_MD = "torch.distributed.checkpoint.metadata."
_LAYOUTS = {"torch.strided": torch.strided, "torch.sparse_coo": torch.sparse_coo}


def _layout(name: str) -> torch.layout:
    if name not in _LAYOUTS:
        raise CurvlensError(f"tensor layout {name!r}; expected one of {sorted(_LAYOUTS)}")
    return _LAYOUTS[name]


def _path_text(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


#: What a DCP ``.metadata`` pickle may name: DCP's dataclasses (as inert stand-ins),
#: the memory-format enum, torch's layout lookup (a fixed table here) and the
#: checkpoint id (a path, kept as text).
DCP_CLASSES: dict[str, Any] = {
    **stand_ins([_MD + n for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                   "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta")]
                + ["torch.distributed.checkpoint.filesystem._StorageInfo"],
                ints=[_MD + "_MEM_FORMAT_ENCODING"]),
    "torch.serialization._get_layout": _layout,
    **{f"pathlib.{c}": _path_text for c in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")},
}


def find_dcp_dir(path: Path) -> Path | None:
    """The DCP dir ``path`` means: itself (it holds ``.metadata``), or the one
    ``optimizer*`` DCP dir inside it (accelerate / HF Trainer FSDP ``optimizer_0``),
    or its only DCP subdir; None when there is none."""
    if not path.is_dir():
        return None
    if (path / ".metadata").is_file():
        return path
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / ".metadata").is_file())
    optim = [p for p in subs if p.name.startswith("optim")]
    if len(optim) == 1:
        return optim[0]
    if len(subs) == 1:
        return subs[0]
    if subs:
        raise CurvlensError(f"{path}: holds several torch.distributed.checkpoint dirs "
                            f"{[p.name for p in subs]}; point at the one holding the optimizer state")
    return None


def _field(rec: Any, name: str, label: str) -> Any:
    if not isinstance(rec, Record) or name not in vars(rec):
        raise CurvlensError(f"{label}: malformed .metadata ({type(rec).__name__} without {name!r})")
    return vars(rec)[name]


def _ints(x: Any, what: str, label: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                    for i in x):
        raise CurvlensError(f"{label}: {what} must be a list of sizes; got {x!r}")
    return tuple(x)


class _Dir:
    """A DCP dir's metadata, its byte ranges checked against the files."""

    def __init__(self, d: Path):
        self.dir = d
        self.label = str(d)
        md_file = contained(d, ".metadata", source=d)
        md = load_pickle(md_file.read_bytes(), DCP_CLASSES, str(md_file))
        if not isinstance(md, Record) or md.original != _MD + "Metadata":
            raise CurvlensError(f"{md_file}: expected DCP Metadata; got {getattr(md, 'original', type(md).__name__)}")
        self.items = _field(md, "state_dict_metadata", str(md_file))
        paths = vars(md).get("planner_data")
        storage = _field(md, "storage_data", str(md_file))
        if not isinstance(self.items, Mapping) or not isinstance(storage, Mapping):
            raise CurvlensError(f"{md_file}: state_dict_metadata and storage_data must be dicts")
        if not isinstance(paths, Mapping):
            raise CurvlensError(f"{md_file}: has no planner_data (saved without flatten_state_dict), so parameter "
                                "names cannot be told from nested keys; not read")
        self.paths = {k: tuple(p) for k, p in paths.items() if isinstance(p, (tuple, list))}
        self.version = vars(md).get("version")
        self.where: dict[tuple, tuple[Path, int, int]] = {}
        sizes: dict[Path, int] = {}
        for idx, info in storage.items():
            fqn = _field(idx, "fqn", str(md_file))
            off = vars(idx).get("offset")
            rel = _field(info, "relative_path", str(md_file))
            start, length = _field(info, "offset", str(md_file)), _field(info, "length", str(md_file))
            if vars(info).get("transform_descriptors"):
                raise CurvlensError(f"{md_file}: entry {fqn!r} is stored through transforms "
                                    f"{vars(info)['transform_descriptors']} (e.g. compression); not read")
            file = contained(d, rel, source=md_file, entry=fqn)
            if not isinstance(start, int) or not isinstance(length, int) or start < 0 or length < 0:
                raise CurvlensError(f"{md_file}: entry {fqn!r} has byte range {start!r}+{length!r}")
            if file not in sizes:
                if not file.is_file():
                    raise CurvlensError(f"{md_file}: entry {fqn!r} is in {rel}, which is missing (a rank's shard "
                                        "was not copied?)")
                sizes[file] = file.stat().st_size
            if start + length > sizes[file]:
                raise CurvlensError(f"{file}: truncated: entry {fqn!r} needs bytes {start}..{start + length}, "
                                    f"the file has {sizes[file]}")
            self.where[(fqn, None if off is None else tuple(off))] = (file, start, length)

    def record(self, key: str, offsets: tuple | None) -> Any:
        """One ``torch.save`` record, read from its byte range only."""
        if (key, offsets) not in self.where:
            raise CurvlensError(f"{self.label}/.metadata: no storage entry for {key!r} at {offsets}")
        file, start, length = self.where[(key, offsets)]
        with open(file, "rb") as fh:
            fh.seek(start)
            raw = fh.read(length)
        if len(raw) != length:
            raise CurvlensError(f"{file}: truncated while reading {key!r}")
        try:
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CurvlensError(f"{file}: the record of {key!r} (bytes {start}..{start + length}) is not a "
                                f"readable torch.save record ({err})") from err

    def tensor_meta(self, key: str) -> tuple[torch.Size, torch.dtype, list[tuple[tuple, tuple]]]:
        smd = self.items[key]
        if getattr(smd, "original", "") != _MD + "TensorStorageMetadata":
            raise CurvlensError(f"{self.label}: {key!r} is not stored as a tensor")
        size = torch.Size(_ints(_field(smd, "size", self.label), f"size of {key!r}", self.label))
        props = _field(smd, "properties", self.label)
        state = vars(props).get("state")
        dtype = state[0] if isinstance(state, tuple) and state else vars(props).get("dtype")
        if not isinstance(dtype, torch.dtype):
            raise CurvlensError(f"{self.label}: {key!r} has no dtype in its properties")
        chunks = [(_ints(_field(c, "offsets", self.label), f"chunk offsets of {key!r}", self.label),
                   _ints(_field(c, "sizes", self.label), f"chunk sizes of {key!r}", self.label))
                  for c in _field(smd, "chunks", self.label)]
        _check_tiling(key, size, chunks, self.label)
        return size, dtype, chunks


def _check_tiling(key: str, size: torch.Size, chunks, label: str) -> None:
    """The chunks must tile the tensor: inside it, disjoint, covering every entry."""
    for off, sz in chunks:
        if len(off) != len(size) or len(sz) != len(size) or any(o + s > n for o, s, n in zip(off, sz, size)):
            raise CurvlensError(f"{label}: a chunk of {key!r} at {off} of size {sz} lies outside its "
                                f"shape {tuple(size)}")
    for i, (oa, sa) in enumerate(chunks):
        for ob, sb in chunks[i + 1:]:
            if all(max(a, b) < min(a + x, b + y) for a, x, b, y in zip(oa, sa, ob, sb)) and math.prod(sa) \
                    and math.prod(sb):
                raise CurvlensError(f"{label}: chunks of {key!r} at {oa} and {ob} overlap")
    covered = sum(math.prod(s) for _, s in chunks)
    if covered != size.numel():
        raise CurvlensError(f"{label}: the chunks of {key!r} hold {covered} entries, its shape "
                            f"{tuple(size)} has {size.numel()}; a shard is missing")


def _rank(file: Path) -> str:
    m = re.match(r"__(\d+)_", file.name)
    return f" (rank {m.group(1)})" if m else ""


def open_dcp_moments(d: Path) -> ShardedSource:
    """Index the optimizer state in the DCP dir ``d``.

    Raises
    ------
    CurvlensError
        For a metadata pickle naming a class not admitted, a dir with no (or
        more than one) optimizer state, chunks that do not tile a moment, a
        missing or truncated shard, a transformed (compressed) record.
    """
    dcp = _Dir(d)
    found: dict[tuple, dict[str, str]] = {}
    for key, path in dcp.paths.items():
        if len(path) >= 3 and path[-1] == "exp_avg_sq" and path[-3] == "state" and isinstance(path[-2], str):
            found.setdefault(path[:-3], {})[path[-2]] = key
    if not found:
        held = sorted({p[0] for p in dcp.paths.values() if p})
        raise CurvlensError(f"{d}: this torch.distributed.checkpoint holds no optimizer exp_avg_sq "
                            f"(top-level entries {held}); is it a model-only checkpoint, or a non-Adam optimizer?")
    if len(found) > 1:
        raise CurvlensError(f"{d}: holds optimizer states under {sorted('.'.join(map(str, p)) for p in found)}; "
                            "expected one")
    prefix, keys = next(iter(found.items()))
    by_path = {p: k for k, p in dcp.paths.items()}
    metas = {}
    for name, key in keys.items():
        size, dtype, chunks = dcp.tensor_meta(key)
        if not dtype.is_floating_point:
            raise CurvlensError(f"{d}: the exp_avg_sq of {name!r} has dtype {dtype}; expected floating point")
        metas[name] = (key, size, chunks)
    steps = {step_count(_scalar(dcp, by_path[p]), f"{d}: step of {p[-2]!r}")
             for p in (prefix + ("state", n, "step") for n in keys) if p in by_path}
    step = steps.pop() if len(steps) == 1 else None
    groups = [{"betas": _value(dcp, k)} for p, k in sorted(by_path.items(), key=lambda kv: str(kv[0]))
              if len(p) == len(prefix) + 3 and p[:len(prefix) + 1] == prefix + ("param_groups",)
              and p[-1] == "betas"]
    betas = betas_of(groups, f"{d}: param_groups") if groups else None

    def read(name: str) -> torch.Tensor:
        key, size, chunks = metas[name]
        out = torch.empty(size, dtype=torch.float32)
        for off, sz in chunks:
            if math.prod(sz) == 0:
                continue
            t = dcp.record(key, off)
            file = dcp.where[(key, off)][0]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != sz:
                raise CurvlensError(f"{file}{_rank(file)}: the chunk of {name!r} at {off} should be a tensor of "
                                    f"shape {sz}; got {getattr(t, 'shape', type(t).__name__)}")
            n_bad, n_neg = int((~torch.isfinite(t)).sum()), int((t < 0).sum())
            if n_bad or n_neg:
                raise CurvlensError(f"{file}{_rank(file)}: tensor {name!r} has {n_bad} non-finite and {n_neg} "
                                    "negative second-moment values")
            out[tuple(slice(o, o + s) for o, s in zip(off, sz))] = t
        return out

    world = len({f for f, _, _ in dcp.where.values()})
    meta = describe("torch.distributed.checkpoint", step, betas, files=world, dcp_version=dcp.version,
                    state_key=".".join(map(str, prefix)) or None)
    return ShardedSource({n: m[1] for n, m in metas.items()}, read, f"{d} (torch.distributed.checkpoint)", d,
                        step, betas[1] if betas else None, meta)


def _value(dcp: _Dir, key: str) -> Any:
    if getattr(dcp.items.get(key), "original", "") == _MD + "BytesStorageMetadata":
        return dcp.record(key, None)
    return _scalar(dcp, key)


def _scalar(dcp: _Dir, key: str) -> Any:
    smd = dcp.items.get(key)
    if getattr(smd, "original", "") == _MD + "BytesStorageMetadata":
        return dcp.record(key, None)
    size, _, chunks = dcp.tensor_meta(key)
    if size.numel() != 1 or len(chunks) != 1:
        raise CurvlensError(f"{dcp.label}: {key!r} should be a single number; has shape {tuple(size)}")
    return dcp.record(key, chunks[0][0])
