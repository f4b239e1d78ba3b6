"""Parameter orders of an HF model, from its ``config.json``, without running its code.

A ``torch.optim`` state numbers parameters in the order ``model.parameters()``
yielded them; checkpoint files list tensors in another (safetensors: sorted). The
order is recovered by building the architecture the config declares on the meta
device (no memory, no weights) from transformers' own classes. A config that
needs custom code (``auto_map``, an unknown ``model_type`` or architecture) is
never imported, executed or asked about on stdin: its candidates are simply not
available, and the caller says what to pass instead.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint
from curvlens.io.name_mapping import SavedLayout, saved_layouts
from curvlens.io.paths import contained
from curvlens.roles import param_role

# Auto mappings tried when a config names no (known) architecture, most common first.
_AUTO_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                  "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                  "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
                  "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_FOR_CTC_MAPPING_NAMES",
                  "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "MODEL_MAPPING_NAMES")


def read_config(model_dir: Path) -> dict | None:
    """``config.json`` of a model dir as a dict (None when absent); never its code."""
    file = contained(model_dir, "config.json", source=model_dir)
    if not file.is_file():
        return None
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CurvlensError(f"{file}: not a readable JSON config ({err})") from err
    if not isinstance(cfg, dict):
        raise CurvlensError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def layer_count(model_dir: Path) -> int:
    """Layers of a model: ``num_hidden_layers`` of its config.json, else one more
    than the largest layer index among its tensor names (0 without layers).
    A ``config.json`` that resolves outside the dir is refused, never skipped."""
    contained(model_dir, "config.json", source=model_dir)
    try:
        cfg = read_config(model_dir)
    except CurvlensError:  # unreadable JSON: the tensor names still tell
        cfg = None
    n = cfg.get("num_hidden_layers") if cfg else None
    if isinstance(n, int) and n > 0:
        return n
    layers = [param_role(k)[0] for k in Checkpoint.open(model_dir).keys()]
    layers = [x for x in layers if x is not None]
    return max(layers) + 1 if layers else 0


def _class_names(cfg: dict, which: str) -> list[str]:
    archs = cfg.get("architectures")
    declared = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if which == "declared":
        return declared
    names: list[str] = []
    from transformers.models.auto import modeling_auto

    model_type = cfg.get("model_type")
    for mapping in _AUTO_MAPPINGS:
        name = getattr(modeling_auto, mapping, {}).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0] if name else None
        if isinstance(name, str) and name not in names and name not in declared:
            names.append(name)
    return names


@dataclass(frozen=True)
class Architecture:
    """One transformers class built from a config on the meta device.

    Attributes
    ----------
    name : str
        The class name.
    params : dict
        ``named_parameters()`` in order (the order ``torch.optim`` numbers them),
        name in memory -> shape.
    no_decay : frozenset of str
        The parameters the HF Trainer puts in its second, no-weight-decay group.
    layouts : tuple of SavedLayout
        How those parameters may be saved: as in memory, and through
        transformers' conversion mapping when it renames or fuses any
        (:mod:`curvlens.io.name_mapping`).
    notes : tuple of str
        Why a layout is not offered.
    """

    name: str
    params: dict[str, torch.Size]
    no_decay: frozenset[str]
    layouts: tuple[SavedLayout, ...]
    notes: tuple[str, ...] = ()


def architecture_orders(model_dir: Path, which: str = "declared") -> tuple[list[Architecture], str | None]:
    """Candidate parameter orders of the model in ``model_dir``: of the
    architectures its config declares (``which="declared"``), or of transformers'
    other heads for its ``model_type`` (``"fallback"``: causal LM, sequence
    classification, masked LM, seq2seq, token, image classification, speech
    seq2seq, CTC, audio classification, bare model).

    Returns
    -------
    orders : list of Architecture
        One per architecture transformers can build from the config.
    why_none : str or None
        When ``orders`` is empty, why (no config, custom code, no transformers).
    """
    cfg = read_config(model_dir)
    if cfg is None:
        return [], f"{model_dir} has no config.json"
    try:
        import transformers
        from transformers import CONFIG_MAPPING
    except ImportError:
        return [], "transformers is not installed (pip install transformers)"
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        custom = " (its auto_map points to custom code, which curvlens never runs)" if "auto_map" in cfg else ""
        return [], f"{model_dir / 'config.json'}: model_type {model_type!r} is not one transformers knows{custom}"
    # The concrete config class, never AutoConfig with the dir: auto_map is dropped,
    # so nothing can ask to run code.
    plain = {k: v for k, v in cfg.items() if k not in ("auto_map", "model_type")}
    try:
        config = CONFIG_MAPPING[model_type].from_dict(plain)
    except Exception as err:  # a config transformers cannot parse
        return [], f"{model_dir / 'config.json'}: transformers cannot read it as a {model_type} config ({err})"
    orders, errors = [], []
    for name in _class_names(cfg, which):
        cls = getattr(transformers, name, None)
        if cls is None or not isinstance(cls, type) or getattr(cls, "config_class", None) is None:
            errors.append(f"{name}: not a transformers class")
            continue
        try:
            with torch.device("meta"):
                model = cls(config)
        except Exception as err:  # this class does not fit the config
            errors.append(f"{name}: {type(err).__name__}")
            continue
        params = {n: p.shape for n, p in model.named_parameters()}
        layouts, notes = saved_layouts(model)
        orders.append(Architecture(name, params, frozenset(params) - trainer_decay_names(model),
                                   tuple(layouts), tuple(notes)))
    why = None if orders else (f"{model_dir / 'config.json'}: no {which} architecture could be built ("
                               + ("; ".join(errors) or "none named") + ")")
    return orders, why


#: The installed Trainer's rule, restated for when it cannot be called (no
#: accelerate): parameters of LayerNorm modules and names matching these are not
#: decayed (transformers 5 ``Trainer.get_decay_parameter_names``).
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def trainer_decay_names(model: torch.nn.Module) -> set[str]:
    """The parameters the HF Trainer decays (its first param group), by the
    installed ``Trainer.get_decay_parameter_names`` when it can be called.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    >>> sorted(trainer_decay_names(net))
    ['0.weight']
    """
    try:
        from transformers import Trainer

        # the method reads nothing of the Trainer; a bare instance stands in for one
        return set(Trainer.get_decay_parameter_names(object.__new__(Trainer), model))
    except Exception:  # no accelerate, or a transformers whose rule needs a real Trainer
        return _decay_names(model, "")


def _decay_names(module: torch.nn.Module, prefix: str) -> set[str]:
    out = set()
    for child_name, child in module.named_children():
        if isinstance(child, torch.nn.LayerNorm):
            continue
        out |= _decay_names(child, f"{prefix}{child_name}.")
    out |= {f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)}
    return {n for n in out if not any(re.search(p, n.lower()) for p in NO_DECAY_PATTERNS)}
