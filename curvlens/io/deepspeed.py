"""Adam second moments from DeepSpeed ZeRO 1, 2 and 3 checkpoints, without DeepSpeed.

``engine.save_checkpoint(DIR)`` (and the HF Trainer under DeepSpeed, into
``checkpoint-N/``) writes ``DIR/latest`` naming a tag dir ``DIR/global_stepN/`` with
one ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank, and the
model states (``mp_rank_00_model_states.pt``; under ZeRO-3 one
``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank) whose ``param_shapes`` list
the parameter names and shapes in the order the optimizer flattened them.

How the moments are laid out:

* **ZeRO 1 and 2**: each param group's parameters are concatenated (in
  ``param_shapes`` order, each followed by its ``param_alignment_paddings`` entry),
  padded at the end to a multiple of the alignment, and cut into ``world_size``
  equal partitions; rank R's optimizer holds one flat ``exp_avg_sq`` per group for
  its partition (the last rank's tail is padding, ``group_paddings``). A parameter
  may straddle ranks. ``param_slice_mappings`` (where saved) give every rank's
  fragment of every parameter and are checked against this.
* **ZeRO 3**: every parameter is partitioned on its own into ``world_size`` pieces
  of ``ceil(numel / world_size)`` (the last padded); rank R's pieces are
  concatenated per sub-group (``sub_group_size``), and the optimizer holds one flat
  ``exp_avg_sq`` per sub-group.

Opening reads only the pickled structure of each file (tensors are memory-mapped,
not read) and checks that every rank agrees; reading a parameter loads just the
ranks holding a piece of it, copies the pieces out and releases the files.
Files are unpickled by :mod:`curvlens.io.safe_unpickle`, DeepSpeed's classes
replaced by inert stand-ins.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from curvlens.errors import CurvlensError
from curvlens.io.sharded_source import ShardedSource, betas_of, describe, step_count
from curvlens.io.paths import contained
from curvlens.io.safe_unpickle import load_torch_file, stand_ins

#: Everything beyond tensors and containers that DeepSpeed's checkpoint files hold.
DEEPSPEED_CLASSES = stand_ins(
    ["deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
     "deepspeed.utils.tensor_fragment.fragment_address"],
    ints=["deepspeed.runtime.zero.config.ZeroStageEnum"])

_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_EXPERT = re.compile(r"^(expp_rank_|layer_\d+_expert_)")


def _optim_files(d: Path) -> list[str]:
    try:
        return [p.name for p in d.iterdir() if _OPTIM.match(p.name)]
    except OSError:
        return []


def find_step_dir(path: Path) -> Path | None:
    """The ``global_stepN`` dir that ``path`` means, or None if it is no DeepSpeed
    checkpoint: a tag dir itself, the ``latest`` file, a dir holding ``latest``,
    or a dir holding exactly one tag dir.

    Raises
    ------
    CurvlensError
        When ``latest`` names no usable tag dir (or one outside the dir), or several
        tag dirs are present and no ``latest`` says which.
    """
    if path.is_file() and path.name == "latest":
        path = path.parent
    if not path.is_dir():
        return None
    if _optim_files(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        step_dir = contained(path, tag, source=latest)
        if not step_dir.is_dir() or not _optim_files(step_dir):
            raise CurvlensError(f"{latest}: names the tag {tag!r}, but {step_dir} holds no "
                                "zero_pp_rank_R_mp_rank_00_optim_states.pt files")
        return step_dir
    tags = sorted(p.name for p in path.iterdir() if p.is_dir() and _optim_files(p))
    if len(tags) > 1:
        raise CurvlensError(f"{path}: holds DeepSpeed checkpoints {tags} and no 'latest' file says which to "
                            "read; point at one of them")
    return path / tags[0] if tags else None


def open_deepspeed(step_dir: Path) -> ShardedSource:
    """Index the ZeRO checkpoint in ``step_dir`` (a ``global_stepN`` dir).

    Returns
    -------
    ShardedSource
        Full fp32 ``exp_avg_sq`` per parameter name, read one parameter at a time.

    Raises
    ------
    CurvlensError
        Naming the file or rank: a class the files may not hold, a missing or
        truncated shard, ranks that disagree (world size, groups, sizes, step,
        betas, paddings), layouts not read (model/pipeline or expert parallel,
        DeepSpeed's bf16 optimizer without ZeRO).
    """
    files = _rank_files(step_dir)
    world = len(files)
    headers = [_header(r, files[r]) for r in range(world)]
    stage = _agree(headers, "stage", step_dir)
    if any(h["world"] != world for h in headers):
        bad = next(h for h in headers if h["world"] != world)
        raise CurvlensError(f"{bad['file']}: says the run had {bad['world']} data-parallel ranks, but "
                            f"{step_dir} holds optimizer files for {world} (ranks 0..{world - 1}); "
                            "a shard is missing or comes from another run")
    groups = _param_shapes(step_dir, stage, world)
    pieces = (_zero3_pieces if stage == 3 else _zero12_pieces)(groups, headers, world)
    shapes = {n: s for g in groups for n, s in g.items()}
    step = _agree(headers, "step", step_dir)
    betas = _agree(headers, "betas", step_dir)
    label = f"{step_dir} (DeepSpeed ZeRO-{stage}, {world} ranks)"

    def read(name: str) -> torch.Tensor:
        return _assemble(name, shapes[name], pieces[name], files, headers, stage == 3)

    meta = describe("deepspeed", step, betas, zero_stage=stage, world_size=world, tag=step_dir.name,
                    ds_version=headers[0]["version"], elastic=headers[0]["elastic"] or None)
    return ShardedSource(shapes, read, label, step_dir, step, betas[1] if betas else None, meta)


def _rank_files(step_dir: Path) -> list[Path]:
    found: dict[int, Path] = {}
    for p in sorted(step_dir.iterdir()):
        m, mm = _OPTIM.match(p.name), _MODEL.match(p.name)
        if _EXPERT.match(p.name):
            raise CurvlensError(f"{p}: DeepSpeed expert-parallel (MoE) checkpoint files are not read; "
                                "export the moments with curvlens.export_moments from the training loop")
        if (m and int(m.group(3)) != 0) or (mm and int(mm.group(2)) != 0):
            raise CurvlensError(f"{p}: a DeepSpeed checkpoint with tensor/pipeline model parallelism "
                                "(mp_rank > 00) is not read; only data-parallel ZeRO checkpoints are")
        if m and m.group(1):
            raise CurvlensError(f"{p}: DeepSpeed's bf16 optimizer without ZeRO (bf16_zero_* files) is not read; "
                                "only ZeRO stage 1, 2 and 3 checkpoints are")
        if m:
            found[int(m.group(2))] = contained(step_dir, p.name, source=step_dir)
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise CurvlensError(f"{step_dir}: optimizer shard(s) of rank(s) {missing} are missing "
                            f"(expected zero_pp_rank_R_mp_rank_00_optim_states.pt for R = 0..{max(found)})")
    return [found[r] for r in range(len(found))]


def _load(file: Path) -> Mapping:
    obj = load_torch_file(file, DEEPSPEED_CLASSES)
    if not isinstance(obj, Mapping):
        raise CurvlensError(f"{file}: expected a DeepSpeed checkpoint dict; got a {type(obj).__name__}")
    return obj


def _get(d: Any, key: str, file: Path, what: type | tuple = object) -> Any:
    if not isinstance(d, Mapping) or key not in d:
        raise CurvlensError(f"{file}: has no {key!r} entry; not a DeepSpeed ZeRO checkpoint file")
    if not isinstance(d[key], what):
        raise CurvlensError(f"{file}: {key!r} must be a {getattr(what, '__name__', what)}; "
                            f"got a {type(d[key]).__name__}")
    return d[key]


def _ints(x: Any, key: str, file: Path) -> list[int]:
    if not isinstance(x, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise CurvlensError(f"{file}: {key!r} must be a list of whole numbers; got {x!r}")
    return list(x)


def _header(rank: int, file: Path) -> dict[str, Any]:
    """What one rank's optimizer file says (tensors stay on disk)."""
    obj = _load(file)
    osd = _get(obj, "optimizer_state_dict", file, Mapping)
    stage = int(_get(osd, "zero_stage", file, int))
    if stage not in (1, 2, 3):
        raise CurvlensError(f"{file}: zero_stage {stage}; expected 1, 2 or 3")
    h: dict[str, Any] = {"file": file, "rank": rank, "stage": stage, "version": osd.get("ds_version", obj.get("ds_version")),
                         "elastic": False}
    pc = _get(osd, "partition_count", file)
    counts = [pc] if stage == 3 else _ints(pc, "partition_count", file)
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts) or len(set(counts)) != 1:
        raise CurvlensError(f"{file}: partition_count {pc!r}; expected one world size for every group")
    h["world"] = counts[0]
    if stage == 3:
        base = _get(osd, "optimizer_state_dict", file, Mapping)
    else:
        base = _get(osd, "base_optimizer_state", file, (Mapping, list))
        h["paddings"] = _ints(_get(osd, "group_paddings", file), "group_paddings", file)
        h["align"] = [_ints(p, "param_alignment_paddings", file) for p in osd.get("param_alignment_paddings") or []]
        h["slices"] = osd.get("param_slice_mappings")
    if isinstance(base, list):  # ZeRO 1/2 "elastic" checkpoints: one lean state per group, no param_groups
        h["elastic"] = True
        states = base
        step = osd.get("base_optimizer_state_step")
        h["betas"] = None
    else:
        state = _get(base, "state", file, Mapping)
        groups = _get(base, "param_groups", file, list)
        order = [i for g in groups for i in _ints(g.get("params") if isinstance(g, Mapping) else None,
                                                  "param_groups[...]['params']", file)]
        if stage != 3 and any(len(g["params"]) != 1 for g in groups):
            raise CurvlensError(f"{file}: every ZeRO-{stage} param group must hold one flat partition; "
                                f"got {[len(g['params']) for g in groups]}")
        missing = [i for i in order if i not in state]
        if missing:
            raise CurvlensError(f"{file}: the optimizer state lacks the partition(s) {missing} its param_groups "
                                "list (saved before the first step?)")
        states = [state[i] for i in order]
        step = None
        h["betas"] = betas_of(groups, str(file))
    sizes, steps = [], set()
    for k, s in enumerate(states):
        v = s.get("exp_avg_sq") if isinstance(s, Mapping) else None
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.dtype.is_floating_point:
            raise CurvlensError(f"{file}: optimizer state {k} has no flat floating-point 'exp_avg_sq' "
                                "(is this an Adam/AdamW run?)")
        sizes.append(v.numel())
        if "step" in s:
            steps.add(step_count(s["step"], f"{file}: state {k}"))
    if step is not None:
        steps.add(step_count(step, f"{file}: base_optimizer_state_step"))
    if len(steps) > 1:
        raise CurvlensError(f"{file}: its param groups record different steps {sorted(steps)}")
    h["step"] = steps.pop() if steps else None
    h["sizes"] = sizes
    return h


def _agree(headers: list[dict], key: str, step_dir: Path) -> Any:
    first = headers[0][key]
    for h in headers[1:]:
        if h[key] != first:
            raise CurvlensError(f"{h['file']}: rank {h['rank']} records {key} {h[key]!r}, rank 0 "
                                f"{first!r}; the ranks of {step_dir} disagree")
    return first


def _param_shapes(step_dir: Path, stage: int, world: int) -> list[dict[str, torch.Size]]:
    """The ``param_shapes`` of the model states (one file; under ZeRO-3 each rank's, which must agree)."""
    names = ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3
             else ["mp_rank_00_model_states.pt"])
    found = None
    for name in names:
        file = contained(step_dir, name, source=step_dir)
        if not file.is_file():
            raise CurvlensError(f"{step_dir}: {name} is missing; it lists the parameter names and shapes "
                                "the optimizer files are cut by")
        raw = _get(_load(file), "param_shapes", file, list)
        groups = []
        for g in raw:
            if not isinstance(g, Mapping) or not all(isinstance(k, str) for k in g):
                raise CurvlensError(f"{file}: 'param_shapes' must be a list of name -> shape dicts")
            groups.append({k: _shape(v, k, file) for k, v in g.items()})
        if found is not None and groups != found:
            raise CurvlensError(f"{file}: its param_shapes differ from {names[0]}'s; the ranks disagree")
        found = groups
    seen: set[str] = set()
    for g in found:
        dup = seen & set(g)
        if dup:
            raise CurvlensError(f"{step_dir}: param_shapes list {sorted(dup)[:3]} in more than one group")
        seen |= set(g)
    return found


def _shape(v: Any, name: str, file: Path) -> torch.Size:
    if not isinstance(v, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in v):
        raise CurvlensError(f"{file}: param_shapes gives {name!r} the shape {v!r}; expected a list of sizes")
    return torch.Size(v)


Piece = tuple[int, int, int, int]  # rank, slot (flat group or sub-group), start, length


def _zero12_pieces(groups, headers, world) -> dict[str, list[Piece]]:
    h0 = headers[0]
    if len(h0["sizes"]) != len(groups) or any(len(h["sizes"]) != len(groups) for h in headers):
        bad = next((h for h in headers if len(h["sizes"]) != len(groups)), h0)
        raise CurvlensError(f"{bad['file']}: holds {len(bad['sizes'])} param group(s); the model states list "
                            f"{len(groups)}")
    out: dict[str, list[Piece]] = {}
    for g, shapes in enumerate(groups):
        pads = h0["align"][g] if h0["align"] else [0] * len(shapes)
        if any(h["align"] != h0["align"] for h in headers) or len(pads) != len(shapes):
            raise CurvlensError(f"{h0['file']}: param_alignment_paddings of group {g} do not fit its "
                                f"{len(shapes)} parameters (or the ranks disagree)")
        # every rank's flat partition: its stored entries plus the padding stripped from them
        part = [h["sizes"][g] + (h["paddings"][g] if h["elastic"] else 0) for h in headers]
        odd = next((h for h, n in zip(headers, part) if n != part[0]), None)
        if odd is not None:
            raise CurvlensError(f"{odd['file']}: group {g} partitions differ in size across ranks "
                                f"({part}); expected equal partitions")
        p = part[0]
        starts, off = [], 0
        for (name, shape), pad in zip(shapes.items(), pads):
            starts.append(off)
            off += shape.numel() + pad
        if world * p < off:
            raise CurvlensError(f"{h0['file']}: group {g} holds {world} x {p} moment entries, but its "
                                f"parameters need {off}; padding/numel mismatch")
        for h in headers:
            r = h["rank"]
            want = min(p, max(0, (r + 1) * p - off))
            if h["paddings"][g] != want:
                raise CurvlensError(f"{h['file']}: group_paddings[{g}] is {h['paddings'][g]}, but the "
                                    f"parameters leave {want} padding entries on rank {r}; padding/numel mismatch")
        for (name, shape), s in zip(shapes.items(), starts):
            e = s + shape.numel()
            out[name] = [(r, g, max(s, r * p) - r * p, min(e, (r + 1) * p) - max(s, r * p))
                         for r in range(s // p, (e - 1) // p + 1)] if e > s else []
        _check_slices(g, shapes, out, headers)
    return out


def _check_slices(g: int, shapes, out, headers) -> None:
    """DeepSpeed's own per-rank fragment table must agree with the layout computed."""
    for h in headers:
        table = h["slices"]
        if not table:
            continue
        if not isinstance(table, list) or len(table) <= g or not isinstance(table[g], Mapping):
            raise CurvlensError(f"{h['file']}: param_slice_mappings has no table for group {g}")
        got = {}
        for name, addr in table[g].items():
            numel, start = getattr(addr, "numel", None), getattr(addr, "start", None)
            if not isinstance(numel, int) or not isinstance(start, int):
                raise CurvlensError(f"{h['file']}: param_slice_mappings[{g}][{name!r}] is not a fragment address")
            got[name] = (start, numel)
        want = {n: (st, ln) for n in shapes for r, _, st, ln in out[n] if r == h["rank"]}
        if got != want:
            diff = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
            raise CurvlensError(f"{h['file']}: param_slice_mappings of group {g} disagree with the layout of "
                                f"param_shapes and paddings for {diff[:3]} (file: {[got.get(n) for n in diff[:3]]}, "
                                f"layout: {[want.get(n) for n in diff[:3]]}); padding/numel mismatch")


def _zero3_pieces(groups, headers, world) -> dict[str, list[Piece]]:
    out: dict[str, list[Piece]] = {}
    for h in headers:
        if len(h["sizes"]) != len(groups):
            raise CurvlensError(f"{h['file']}: holds {len(h['sizes'])} sub-group partition(s); the model states "
                                f"list {len(groups)}")
    for s, shapes in enumerate(groups):
        off = 0
        for name, shape in shapes.items():
            part = math.ceil(shape.numel() / world)
            out[name] = [(r, s, off, part) for r in range(world)]
            off += part
        for h in headers:
            if h["sizes"][s] != off:
                raise CurvlensError(f"{h['file']}: sub-group {s} holds {h['sizes'][s]} moment entries; its "
                                    f"{len(shapes)} parameters partitioned {world} ways need {off}; "
                                    "padding/numel mismatch")
    return out


def _flat(obj: Mapping, file: Path, slot: int, elastic: bool, zero3: bool) -> torch.Tensor:
    osd = obj["optimizer_state_dict"]
    if zero3:
        base = osd["optimizer_state_dict"]
    else:
        base = osd["base_optimizer_state"]
    if elastic:
        return base[slot]["exp_avg_sq"]
    order = [i for g in base["param_groups"] for i in g["params"]]
    return base["state"][order[slot]]["exp_avg_sq"]


def _assemble(name: str, shape: torch.Size, pieces: list[Piece], files: list[Path], headers, zero3: bool):
    parts = []
    for rank, slot, start, length in pieces:
        file = files[rank]
        try:
            flat = _flat(_load(file), file, slot, headers[rank]["elastic"], zero3)
        except (KeyError, IndexError, TypeError) as err:
            raise CurvlensError(f"{file}: changed since it was opened ({err})") from err
        if flat.numel() < start + length:
            raise CurvlensError(f"{file}: partition {slot} holds {flat.numel()} entries; tensor {name!r} needs "
                                f"entries {start}..{start + length}")
        piece = flat.narrow(0, start, length).to(torch.float32, copy=True)
        del flat  # releases the file's memory map
        n_bad = int((~torch.isfinite(piece)).sum())
        n_neg = int((piece < 0).sum())
        if n_bad or n_neg:
            raise CurvlensError(f"{file} (rank {rank}): tensor {name!r} has {n_bad} non-finite and {n_neg} "
                                "negative second-moment values")
        parts.append(piece)
    flat = torch.cat(parts) if parts else torch.zeros(0)
    return flat[: shape.numel()].reshape(shape) if zero3 else flat.reshape(shape)
