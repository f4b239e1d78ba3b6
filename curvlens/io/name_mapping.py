"""How a transformers model's parameters in memory become the tensors it saves.

transformers 5 renames modules when it loads a checkpoint and writes the old
names back when it saves one (its *checkpoint conversion mapping*); for
mixture-of-experts families that mapping also fuses the per-expert 2-D weights
into one 3-D tensor in memory. An optimizer's state follows the model in memory,
the checkpoint beside it follows the saved layout. :class:`SavedLayout` is that
correspondence for one architecture, read from the installed transformers on the
meta device (no weights, no remote code): which saved tensors each in-memory
parameter becomes, their shapes, and the function that splits (or renames) a
second moment exactly as transformers splits the weight. Candidates are checked
against the checkpoint shape by shape; a reader never guesses.
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from curvlens.errors import CurvlensError

#: transformers' conversion operations that only move entries (stack, split,
#: concatenate, transpose, permute, reshape): applied to a second moment they
#: give the moment of each saved tensor. Any other operation (dequantisation,
#: padding) is refused by name.
REARRANGING_OPS = frozenset({
    "Chunk", "Split", "Concatenate", "Interleave", "MergeModulelist", "SplitModulelist", "Transpose",
    "Conv3dToLinear", "LinearToConv3d", "PermuteForRope", "VisionFuseAndPermuteForRope",
    "VisionUnfuseAndPermuteForRope", "ErnieFuseAndSplitTextVisionExperts", "ErnieSplitAndDecoupleTextVisionExperts",
})

IDENTITY = "saved as in memory"


@dataclass(frozen=True)
class SavedLayout:
    """The saved tensors of one architecture's in-memory parameters and buffers.

    Parameters a model never saves (its ``_keys_to_ignore_on_save``, e.g.
    Marian's fixed sinusoidal positions) have no saved tensor, hence no entry.

    Attributes
    ----------
    label : str
        How the names were mapped (``"saved as in memory"`` or transformers'
        conversion mapping, with what it renames and fuses).
    sources : dict
        Saved name -> the in-memory parameter names it is built from (one, or a
        fused group).
    shapes : dict
        Saved name -> shape, for every saved tensor of a parameter.
    buffers : dict
        Saved name -> shape of the persistent buffers (saved, never in an
        optimizer: untrained).
    aliases : dict
        Saved name of a tied parameter's second name -> the saved name whose
        tensor it shares (``lm_head.weight`` -> ``model.embed_tokens.weight``).
    split : callable or None
        ``split({in-memory name: tensor})`` -> ``{saved name: tensor}`` for one
        group of :attr:`sources`; None when names map one to one, unchanged.
    """

    label: str
    sources: dict[str, tuple[str, ...]]
    shapes: dict[str, torch.Size]
    buffers: dict[str, torch.Size] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    split: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    @property
    def renames(self) -> bool:
        """Whether any saved name differs from its parameter's name in memory."""
        return any(srcs != (n,) for n, srcs in self.sources.items())

    def problems(self, saved: Mapping[str, tuple[torch.Size, bool]]) -> list[str]:
        """Every disagreement with a checkpoint's ``{name: (shape, is_floating)}``,
        headers only: a parameter's saved tensor missing or of another shape, a
        saved floating tensor that is neither a parameter, a buffer nor a tied
        name of this architecture."""
        out = []
        for name, shape in self.shapes.items():
            if name not in saved:
                out.append(f"no saved tensor {name!r}" + _from(self.sources[name], name))
            elif tuple(saved[name][0]) != tuple(shape):
                out.append(f"{name!r}{_from(self.sources[name], name)} has shape {tuple(shape)}, "
                           f"the checkpoint {tuple(saved[name][0])}")
        for name, (shape, floating) in saved.items():
            if name in self.shapes or not floating:
                continue
            if name in self.buffers:
                if tuple(shape) != tuple(self.buffers[name]):
                    out.append(f"buffer {name!r} has shape {tuple(self.buffers[name])}, the checkpoint {tuple(shape)}")
            elif name in self.aliases:
                if tuple(shape) != tuple(self.shapes[self.aliases[name]]):
                    out.append(f"tied {name!r} has shape {tuple(self.shapes[self.aliases[name]])}, "
                               f"the checkpoint {tuple(shape)}")
            else:
                out.append(f"the checkpoint's {name!r} is neither a parameter nor a buffer")
        return out

    def saved_moments(self, read: Callable[[str], torch.Tensor], have, never, saved: Mapping[str, tuple],
                      label: str):
        """Moments keyed by saved names over ``read`` (in-memory name -> moment).

        Parameters
        ----------
        read : callable
            In-memory parameter name -> its second moment.
        have : collection of str
            The in-memory names ``read`` knows.
        never : collection of str
            Those of them the optimizer never stepped.
        saved : mapping
            The checkpoint's ``{name: (shape, is_floating)}``.
        label : str
            For errors.

        Returns
        -------
        shapes : dict
            Saved name -> shape, buffers included.
        reader : callable
            Saved name -> moment; a buffer's is zero (never trained).
        untrained : tuple of str
            The checkpoint's floating buffers, which no optimizer state covers.
        never_saved : tuple of str
            The saved names built only from parameters never stepped.
        """
        have = set(have)
        shapes = {k: s for k, s in self.shapes.items() if set(self.sources[k]) <= have}
        shapes.update({a: shapes[t] for a, t in self.aliases.items() if a in saved and t in shapes})
        untrained = {b: s for b, s in self.buffers.items() if b in saved and saved[b][1]}
        inner = self.reader(read, label)

        def reader(name: str) -> torch.Tensor:
            return torch.zeros(untrained[name]) if name in untrained else inner(name)

        never = set(never)
        never_saved = tuple(k for k in shapes if set(self.sources[self.aliases.get(k, k)]) <= never)
        return {**shapes, **untrained}, reader, tuple(untrained), never_saved

    def renamed(self, rename: Callable[[str], str], label: str) -> SavedLayout | None:
        """The same layout with every saved name passed through ``rename`` (None
        when two names would become one)."""
        names = [*self.shapes, *self.buffers, *self.aliases]
        if len({rename(n) for n in names}) != len(set(names)):
            return None
        inner = self.split

        def split(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = inner(tensors) if inner is not None else tensors
            return {rename(k): v for k, v in out.items()}

        return SavedLayout(label, {rename(k): v for k, v in self.sources.items()},
                           {rename(k): v for k, v in self.shapes.items()},
                           {rename(k): v for k, v in self.buffers.items()},
                           {rename(k): rename(v) for k, v in self.aliases.items()}, split)

    def reader(self, read: Callable[[str], torch.Tensor], label: str) -> Callable[[str], torch.Tensor]:
        """A reader of saved names over ``read`` (in-memory name -> moment).

        A fused group is split once and its pieces kept until each is read (up
        to a few groups), so a pass in saved order converts every group once and
        holds a few tensors, not the model.
        """
        if self.split is None:
            def plain(name: str) -> torch.Tensor:
                return read(self.aliases.get(name, name))
            return plain
        pending: OrderedDict[tuple[str, ...], dict[str, torch.Tensor]] = OrderedDict()
        lock = threading.Lock()

        def mapped(name: str) -> torch.Tensor:
            name = self.aliases.get(name, name)
            group = self.sources[name]
            with lock:
                pieces = pending.get(group)
                if pieces is None or name not in pieces:
                    pieces = self._split_group(group, read, label)
                    pending[group] = pieces
                    while len(pending) > 4:  # a pass out of order recomputes, never accumulates
                        pending.popitem(last=False)
                out = pieces.pop(name)
                if not pieces:
                    pending.pop(group, None)
            return out

        return mapped

    def _split_group(self, group: tuple[str, ...], read, label: str) -> dict[str, torch.Tensor]:
        given = {n: read(n) for n in group}
        out = {k: v.contiguous().clone() for k, v in self.split(given).items()}
        want = {k for k, srcs in self.sources.items() if srcs == group}
        if set(out) != want:
            raise CurvlensError(f"{label}: transformers' conversion of {list(group)} gave {sorted(out)}, "
                                f"expected {sorted(want)}")
        # a rearrangement keeps every entry once: the count and the sum say so
        n_in, n_out = sum(t.numel() for t in given.values()), sum(t.numel() for t in out.values())
        s_in = sum(float(t.double().sum()) for t in given.values())
        s_out = sum(float(t.double().sum()) for t in out.values())
        if n_in != n_out or abs(s_in - s_out) > 1e-9 * max(abs(s_in), 1e-300):
            raise CurvlensError(f"{label}: transformers' conversion of {list(group)} does not only move entries "
                                f"({n_in} entries summing to {s_in!r} became {n_out} summing to {s_out!r})")
        return out


def _from(srcs: tuple[str, ...], name: str) -> str:
    if srcs == (name,):
        return ""
    return f" (from {srcs[0]!r})" if len(srcs) == 1 else f" (from {len(srcs)} parameters, e.g. {srcs[0]!r})"


def saved_layouts(model: torch.nn.Module) -> tuple[list[SavedLayout], list[str]]:
    """The candidate saved layouts of a model built on the meta device.

    Returns
    -------
    layouts : list of SavedLayout
        First the names as in memory; then, when transformers' conversion
        mapping changes any name for this model, the layout ``save_pretrained``
        writes through it; then each of those with transformers' legacy names
        (``LayerNorm.gamma``, ``weight_g``), which ``save_pretrained`` writes back
        for a model loaded from a checkpoint that had them.
    notes : list of str
        Why the conversion layout is not offered (an operation that does more
        than move entries, a transformers without conversion mappings).
    """
    # save_pretrained leaves out the keys a model lists as not to save (Marian's
    # fixed sinusoidal positions, parameters that never train)
    unsaved = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    every = dict(model.named_parameters())
    params = {n: p for n, p in every.items() if n not in unsaved}
    buffer_names = {n for n, _ in model.named_buffers()}
    state = {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in unsaved}
    buffers = {n: t.shape for n, t in state.items() if n in buffer_names}
    canon = {id(p): n for n, p in params.items()}
    aliases = {n: canon[id(t)] for n, t in state.items()
               if n not in every and n not in buffers and id(t) in canon}
    identity = SavedLayout(IDENTITY, {n: (n,) for n in params}, {n: p.shape for n, p in params.items()},
                           buffers, aliases)
    notes: list[str] = []
    converted = _conversion_layout(model, params, buffers, aliases, notes)
    layouts = [identity] + ([converted] if converted is not None else [])
    return layouts + _legacy_layouts(layouts), notes


def _legacy_layouts(layouts: list[SavedLayout]) -> list[SavedLayout]:
    """Each layout with transformers' legacy renamings reverted, where they change a name."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return []
    legacy = [c.reverse_transform() for c in (get_checkpoint_conversion_mapping("legacy") or [])[::-1]]
    renamings = [c for c in legacy if isinstance(c, WeightRenaming)]
    out = []

    def rename(name: str) -> str:
        return apply_renamings(name, renamings)

    for layout in layouts:
        new = layout.renamed(rename, f"{layout.label}, with transformers' legacy names")
        if new is not None and (set(new.shapes) != set(layout.shapes) or set(new.buffers) != set(layout.buffers)):
            out.append(new)
    return out


def _conversion_layout(model, params, buffers, aliases, notes: list[str]) -> SavedLayout | None:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (PrefixChange, WeightConverter, apply_converters,
                                                     revert_weight_conversion)
    except ImportError:
        notes.append("this transformers has no checkpoint conversion mapping (transformers < 5)")
        return None
    # what save_pretrained reverts for a model built from its config: the model's
    # conversions without the legacy renamings and prefix changes
    try:
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
    except Exception as err:  # transformers refuses its own mapping for this model
        notes.append(f"transformers' conversion mapping for {type(model).__name__} fails ({err})")
        return None
    if not conversions:
        return None
    ops = sorted({type(op).__name__ for c in conversions for op in getattr(c, "operations", [])})
    odd = [o for o in ops if o not in REARRANGING_OPS]
    if odd:
        notes.append(f"transformers' conversion mapping for {type(model).__name__} uses {odd}, which do more "
                     "than move entries; a second moment cannot be converted with it")
        return None
    meta = {n: torch.empty(p.shape, device="meta") for n, p in params.items()}

    def split(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return revert_weight_conversion(model, tensors)

    try:
        converters = [c.reverse_transform() for c in conversions[::-1]]
        converters = [c for c in converters if isinstance(c, WeightConverter)]
        groups: dict[str, list[str]] = {}
        for n in params:  # a converter gathers every name it renames to one key
            key, pattern = apply_converters(n, converters)
            groups.setdefault(key if pattern is not None else f"\0{n}", []).append(n)
        sources, shapes = {}, {}
        for members in groups.values():
            for saved, t in split({n: meta[n] for n in members}).items():
                if saved in sources:
                    raise ValueError(f"{saved!r} comes from two groups")
                sources[saved], shapes[saved] = tuple(members), t.shape
        whole = split(dict(meta))
        if {k: tuple(v.shape) for k, v in whole.items()} != {k: tuple(v) for k, v in shapes.items()}:
            raise ValueError("converting group by group differs from converting the whole model")
        saved_buffers = {k: v.shape for k, v in split(
            {n: torch.empty(s, device="meta") for n, s in buffers.items()}).items()} if buffers else {}
        renamed_aliases = {}
        for alias, target in aliases.items():
            out = split({alias: torch.empty(params[target].shape, device="meta")})
            targets = [k for k, srcs in sources.items() if srcs == (target,)]
            if len(out) == 1 and len(targets) == 1:
                renamed_aliases[next(iter(out))] = targets[0]
    except Exception as err:  # the mapping does not apply to this model's names
        notes.append(f"transformers' conversion mapping for {type(model).__name__} cannot be applied "
                     f"to its parameter names ({type(err).__name__}: {err})")
        return None
    if all(srcs == (k,) for k, srcs in sources.items()) and set(saved_buffers) == set(buffers):
        return None  # nothing renamed: the identity layout already says it
    outputs = Counter(sources.values())
    fused = [srcs for srcs, k in outputs.items() if len(srcs) > 1 or k > 1]
    renamed = sum(1 for k, srcs in sources.items() if srcs not in fused and srcs[0] != k)
    label = f"transformers conversion mapping of {type(model).__name__} ({renamed} renamed"
    if fused:
        label += (f", {len(fused)} fused tensor(s) split into {sum(outputs[g] for g in fused)}")
    label += ")"
    return SavedLayout(label, sources, shapes, saved_buffers, renamed_aliases, split)
