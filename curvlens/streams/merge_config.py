"""Merge configs in the YAML format of mergekit and of the OTA authors' fork.

::

    merge_method: ota
    base_model: ./base
    models:
      - model: ./math
        parameters: {preconditioner_path: ./math/export/exp_avg_sq.safetensors}
      - model: ./code
    parameters: {power: 0.5, epsilon: 1.0e-26, fallback_to_base: true}
    dtype: bfloat16

Model-level ``parameters`` become per-expert values; top-level ``parameters`` apply
to all. Paths are local (relative paths are read relative to the config file).
Every parameter may take mergekit's per-tensor forms, a gradient over the layers
or a list of ``{filter, value}`` conditions (:mod:`curvlens.streams.param_settings`),
resolved per tensor name by the streaming driver. A config's ``base_model`` is
what the method's ``base_role`` says (:class:`~curvlens.math.methods.MergeMethod`):
the reference of the task vectors (a base also listed under ``models`` is left
out, as mergekit and the fork do), one more averaged model (``linear``: mergekit
adds an unlisted base to the average) or unused. curvlens's ``base_model_role:
reference`` says a ``linear`` base is the reference only, never averaged (what
``cl.merge`` does with a base, and what the config it saves states).

``slices`` with ``merge_method: passthrough`` stack layer ranges of the models
(:mod:`curvlens.streams.stack`). ``dtype`` is the dtype the inputs are read in
(rounded to), ``out_dtype`` (default: ``dtype``) the one written; curvlens
computes in fp32 between the two. ``tokenizer_source`` / ``tokenizer`` and
``chat_template`` say which tokenizer is written beside the weights
(:mod:`curvlens.streams.merge_tokenizer`). Every key at every level is checked:
anything curvlens cannot honour as mergekit does is refused by name.

curvlens's own ``tensors`` section says per tensor what the merge does, first
matching ``filter`` first (a substring as in mergekit, or any pattern of
:mod:`curvlens.tensor_filter`)::

    tensors:
      - {filter: classifier, action: drop}        # no task's head in the merge
      - {filter: "*.pooler.*", action: base}      # the base's pooler, unchanged
      - {filter: "role:embed", action: ./math}    # one model's embeddings (path or name)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import PathLike
from curvlens.math.methods import get_method
from curvlens.math.methods.params import check_value_forms
from curvlens.streams.experts import Experts, expert_names
from curvlens.streams.param_settings import TensorParams, check_setting, is_constant, number_converter
from curvlens.tensor_filter import TensorFilter

_TOP_KEYS = {"merge_method", "base_model", "base_model_role", "models", "slices", "parameters", "dtype",
             "tokenizer_source", "tokenizer", "chat_template", "out_dtype", "tensors"}
# mergekit keys curvlens refuses, and why
_REFUSED_TOP = {
    "modules": "mergekit's per-module configs (multimodal models with several modules) are not supported",
}
_MODEL_KEYS = {"model", "parameters"}
_TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
_CURVLENS_OPTIONS = {"bias_correction"}
_PATH_PARAMS = {"preconditioner_path"}


@dataclass(frozen=True)
class MergeConfig:
    """A parsed merge config, ready for :func:`curvlens.streams.merge.merge`
    (:meth:`merge_kwargs` gives its keyword arguments).

    ``dtype`` is the written dtype (mergekit's ``out_dtype``, else ``dtype``),
    ``input_dtype`` the one inputs are rounded to (mergekit's ``dtype``).
    ``tensor_params`` resolves parameters that vary by tensor (None if none do);
    ``notes`` says what was accepted but has no effect (also at the top of the
    saved config). ``stack`` is a passthrough ``slices`` plan, or None.
    """

    method: str
    base: Path | None
    models: tuple[Path, ...]
    names: tuple[str, ...]
    moments: tuple[Path | None, ...] | None
    params: dict
    dtype: str | None
    bias_correction: bool
    text: str
    tensors: tuple[tuple[str, str], ...] = ()
    input_dtype: str | None = None
    tensor_params: TensorParams | None = None
    tokenizer_source: Any = None
    chat_template: str | None = None
    pad_to_multiple_of: int | None = None
    notes: tuple[str, ...] = ()
    stack: Any = None

    def experts(self) -> Experts:
        """Open the models (and their moments when the method needs them)."""
        if self.stack is not None:
            raise CurvlensError("a passthrough 'slices' config stacks layers: run it with "
                                "cfg.stack.run(out) (or `curvlens merge`), not as a merge of Experts")
        needs_moments = get_method(self.method).needs_moments
        moments: Any = False
        if needs_moments:
            moments = [m if m is not None else d for m, d in zip(self.moments, self.models)]
        # tensors the rules do not merge need not line up (each task's own head)
        return Experts.from_dirs(self.base, list(self.models), list(self.names), moments=moments,
                                 bias_correction=self.bias_correction,
                                 exclude=TensorFilter.not_merged(self.tensors))

    def merge_kwargs(self) -> dict:
        """Keyword arguments of :func:`curvlens.streams.merge.merge` for this config
        (with the method's parameters)."""
        kw = dict(dtype=self.dtype, input_dtype=self.input_dtype, config_text=self.text, tensors=self.tensors,
                  tensor_params=self.tensor_params, tokenizer_source=self.tokenizer_source,
                  chat_template=self.chat_template, pad_to_multiple_of=self.pad_to_multiple_of)
        return {**kw, **self.params}


def load_merge_config(path: PathLike | None = None, *, text: str | None = None,
                      root: PathLike | None = None) -> MergeConfig:
    """Parse a mergekit / OTA-fork YAML merge config.

    Parameters
    ----------
    path : path, optional
        The YAML file. Relative model paths are resolved against its directory.
    text : str, optional
        YAML text instead of a file (paths resolved against ``root`` or the cwd).

    Returns
    -------
    MergeConfig
    """
    import yaml

    if (path is None) == (text is None):
        raise CurvlensError("give exactly one of path= or text=")
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise CurvlensError(f"{path}: cannot read merge config ({err})") from err
        root = path.parent
    where = str(path) if path is not None else "<merge config>"
    root = Path(root) if root is not None else Path.cwd()
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CurvlensError(f"{where}: not valid YAML ({err})") from err
    if not isinstance(cfg, dict):
        raise CurvlensError(f"{where}: expected a mapping with merge_method and models")
    for key, why in _REFUSED_TOP.items():
        if key in cfg:
            raise CurvlensError(f"{where}: {key!r}: {why}")
    unknown = sorted(map(str, set(cfg) - _TOP_KEYS))
    if unknown:
        raise CurvlensError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(_TOP_KEYS)}")
    if "merge_method" not in cfg:
        raise CurvlensError(f"{where}: missing 'merge_method'")

    def local(p: Any, what: str) -> Path:
        if isinstance(p, dict):  # mergekit also allows {model: path}
            extra = sorted(set(p) - {"model"})
            if extra or "model" not in p:
                raise CurvlensError(f"{where}: {what} {p!r}: curvlens reads a local path (no LoRA, revision "
                                    f"or other model options); got keys {sorted(p)}")
            p = p["model"]
        if not isinstance(p, (str, int, float)) or isinstance(p, bool):
            raise CurvlensError(f"{where}: {what} must be a path; got {p!r}")
        q = Path(str(p)).expanduser()
        q = q if q.is_absolute() else root / q
        if not q.exists():
            raise CurvlensError(f"{where}: {what} {str(p)!r} not found at {q} "
                                "(curvlens reads local paths only; download models first)")
        return q.resolve()

    if cfg.get("slices") is not None:
        if cfg.get("models") is not None:
            raise CurvlensError(f"{where}: give exactly one of 'models' and 'slices' (as mergekit)")
        from curvlens.streams.stack import load_stack, slices_as_models

        if str(cfg["merge_method"]) == "passthrough":
            return load_stack(cfg, where, text, local)
        # one slice over every model's whole layer range is the `models` form
        cfg = slices_as_models(cfg, where, local, _n_layers)
        from_slices = True
    else:
        from_slices = False
    if str(cfg["merge_method"]) == "passthrough" and (cfg.get("base_model") or not isinstance(cfg.get("models"), list)
                                                     or len(cfg["models"]) != 1):
        raise CurvlensError(f"{where}: merge_method 'passthrough' with 'models' copies exactly one model (times "
                            "its scale), with no base_model, as mergekit; stack layer ranges with 'slices'")
    method = get_method(str(cfg["merge_method"]))
    models = cfg.get("models") or []
    if not isinstance(models, list) or not models:
        raise CurvlensError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: ...}}")

    base = local(cfg["base_model"], "base_model") if cfg.get("base_model") else None
    base_role = _base_role(cfg, method, base, where)
    notes: list[str] = []
    top = _mapping(cfg.get("parameters"), f"{where}: 'parameters'")
    bias_correction = top.pop("bias_correction", False)
    if not isinstance(bias_correction, bool):
        raise CurvlensError(f"{where}: parameter 'bias_correction' must be true or false; got {bias_correction!r}")
    top = {k: check_setting(where, k, v) for k, v in top.items()}
    for k in top:
        _default(method, k, where)  # an unknown name fails here, naming the method
        check_value_forms(_spec(method, k), f"{where}: parameters.{k}", top[k])

    dirs, moments, per_model, seen = [], [], [], {}
    base_listed = False
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise CurvlensError(f"{where}: models[{i}] must be a mapping with a 'model' path")
        extra = sorted(map(str, set(entry) - _MODEL_KEYS))
        if extra:
            raise CurvlensError(f"{where}: models[{i}]: unknown key(s) {extra}; expected {sorted(_MODEL_KEYS)}")
        d = local(entry["model"], f"models[{i}].model")
        mp = _mapping(entry.get("parameters"), f"{where}: models[{i}].parameters")
        if base is not None and d == base:
            base_listed = True
            if base_role == "reference":
                # as mergekit and the fork: the base contributes no task vector
                if mp:
                    notes.append(f"models[{i}] is the base model: left out of the merge as the reference, "
                                 f"its parameters {sorted(mp)} unused")
                continue
        if d in seen:
            raise CurvlensError(f"{where}: models[{seen[d]}] and models[{i}] are the same model ({d}); "
                                "list each model once (give it a larger weight instead)")
        seen[d] = i
        if "weight" in mp and not _has_param(method, "weight"):
            mp.pop("weight")
            notes.append(f"models[{i}].parameters.weight: {method.name} has no weight; ignored, as mergekit "
                         "and the OTA fork ignore it")
        mp = {k: check_setting(f"{where} models[{i}]", k, v) for k, v in mp.items()}
        for k, v in mp.items():
            if k not in _PATH_PARAMS:  # read by the loader, whatever the method
                _default(method, k, where)
                check_value_forms(_spec(method, k), f"{where}: models[{i}].parameters.{k}", v)
        pre = mp.pop("preconditioner_path", None)
        if pre is not None and not is_constant(pre):
            raise CurvlensError(f"{where}: models[{i}].parameters.preconditioner_path must be one path")
        moments.append(local(pre, f"models[{i}].parameters.preconditioner_path") if pre else None)
        dirs.append(d)
        per_model.append(mp)
    if base is not None and not base_listed and base_role == "input" and not from_slices:
        # mergekit adds an unlisted base model as one more input (top-level parameters only)
        notes.append(f"base_model is averaged as one more model, as mergekit's {method.name} does")
        dirs.append(base)
        moments.append(None)
        per_model.append({})
    if base is not None and method.base_role == "ignored":
        notes.append(f"base_model is not used by {method.name} (only as the reference of the report)")
    if not dirs:
        raise CurvlensError(f"{where}: no models left to merge besides the base model")
    names = expert_names(dirs)

    params, tensor_params = _params(method, top, per_model, where, base or dirs[0])
    out_dtype, input_dtype = _dtypes(cfg, where)
    tensors = _tensor_rules(cfg.get("tensors"), where, base, dict(zip(dirs, names)), local)
    tok_source, pad = _tokenizer(cfg, where, base, local)
    chat = cfg.get("chat_template")
    if chat is not None and not isinstance(chat, str):
        raise CurvlensError(f"{where}: chat_template must be a string (a template name, 'auto' or Jinja); "
                            f"got {chat!r}")
    if notes:
        text = "".join(f"# curvlens: {n}\n" for n in notes) + text
    return MergeConfig(method.name, base, tuple(dirs), tuple(names), tuple(moments), params,
                       out_dtype, bias_correction, text, tensors, input_dtype=input_dtype,
                       tensor_params=tensor_params, tokenizer_source=tok_source, chat_template=chat,
                       pad_to_multiple_of=pad, notes=tuple(notes))


def _base_role(cfg: dict, method, base, where: str) -> str:
    """What ``base_model`` is to the merge: the method's ``base_role``, or
    ``reference`` where ``base_model_role`` says so for a method that would
    average it (``linear``)."""
    role = cfg.get("base_model_role")
    if role is None:
        return method.base_role
    if base is None:
        raise CurvlensError(f"{where}: base_model_role is given without a base_model")
    allowed = ["reference", "input"] if method.base_role == "input" else [method.base_role]
    if role not in allowed:
        raise CurvlensError(f"{where}: base_model_role {role!r} is not valid for {method.name}; expected one of "
                            f"{allowed} (its base is the {method.base_role!r})")
    return role


def _has_param(method, key: str) -> bool:
    return any(key == s.name or key in s.aliases for s in method.params)


def _spec(method, key: str):
    for spec in method.params:
        if key == spec.name or key in spec.aliases:
            return spec
    return None


def _params(method, top: dict, per_model: list, where: str, ref_dir: Path):
    """Constant parameters (per-expert lists where models differ) and the
    :class:`TensorParams` of those that vary by tensor (None if none do)."""
    keys = set(top) | {k for mp in per_model for k in mp}
    for k in keys:
        _default(method, k, where)
    varying = {k for k in keys if not is_constant(top.get(k)) or any(not is_constant(mp.get(k)) for mp in per_model)}
    spec = method.model_wide
    if spec is not None:
        density_given = any(_spec(method, k).name == spec.density for k in keys)
        fixed = {spec.density} | ({spec.rank1, spec.rank} if density_given else set())
        bad = sorted(k for k in varying if _spec(method, k).name in fixed)
        if bad:
            raise CurvlensError(f"{where}: parameter(s) {bad} set the model-wide selection and must be one value "
                                "per model, not a gradient or filter list")
    params = {k: v for k, v in top.items() if k not in varying}
    for k in keys - varying:
        if any(k in mp for mp in per_model):
            params[k] = [mp.get(k, top.get(k, _default(method, k, where))) for mp in per_model]
    if not varying:
        return params, None
    per_expert = frozenset(k for k in varying if _spec(method, k).per_expert)
    stray = sorted(k for k in varying - per_expert if any(k in mp for mp in per_model))
    if stray:
        raise CurvlensError(f"{where}: parameter(s) {stray} of {method.name!r} take one value for all models; "
                            "give them under the top-level 'parameters'")
    tp = TensorParams(top={k: top[k] for k in varying if k in top},
                      per_model=[{k: mp[k] for k in varying if k in mp} for mp in per_model],
                      per_expert=per_expert,
                      defaults={k: _default(method, k, where) for k in varying},
                      n_layers=_n_layers(ref_dir),
                      convert={k: number_converter(_spec(method, k).validate, k) for k in varying})
    return params, tp


def _n_layers(model_dir: Path) -> int:
    """Layers of a model: ``num_hidden_layers`` of its config.json, else one more
    than the largest layer index among its tensor names."""
    from curvlens.io.architecture import read_config
    from curvlens.io.checkpoint import Checkpoint
    from curvlens.roles import param_role

    n = (read_config(model_dir) or {}).get("num_hidden_layers")  # read inside the model dir only
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    layers = [param_role(k)[0] for k in Checkpoint.open(model_dir).keys()]
    layers = [x for x in layers if x is not None]
    return max(layers) + 1 if layers else 0


def _dtypes(cfg: dict, where: str) -> tuple[str | None, str | None]:
    """(written dtype, input dtype): mergekit reads inputs in ``dtype`` and writes
    ``out_dtype`` (default ``dtype``)."""
    for key in ("dtype", "out_dtype"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str):
            raise CurvlensError(f"{where}: dtype/out_dtype must be a string such as 'bfloat16'; got {v!r}")
    out_dtype = cfg.get("out_dtype") if cfg.get("out_dtype") is not None else cfg.get("dtype")
    return out_dtype, cfg.get("dtype")


def _tokenizer(cfg: dict, where: str, base, local):
    """(tokenizer source: None, "base", "union" or a model path; pad_to_multiple_of)."""
    source = cfg.get("tokenizer_source")
    tok = cfg.get("tokenizer")
    pad = None
    if tok is not None:
        if source is not None:
            raise CurvlensError(f"{where}: give tokenizer_source or tokenizer, not both (as mergekit)")
        if not isinstance(tok, dict):
            raise CurvlensError(f"{where}: tokenizer must be a mapping {{source:, tokens:, pad_to_multiple_of:}}")
        extra = sorted(map(str, set(tok) - _TOKENIZER_KEYS))
        if extra:
            raise CurvlensError(f"{where}: tokenizer: unknown key(s) {extra}; expected some of "
                                f"{sorted(_TOKENIZER_KEYS)}")
        if tok.get("tokens"):
            raise CurvlensError(f"{where}: tokenizer.tokens (embeddings of chosen tokens from chosen models) "
                                "is not supported: curvlens merges embedding rows as they are")
        source = tok.get("source", "union")
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise CurvlensError(f"{where}: tokenizer.pad_to_multiple_of must be an int >= 1; got {pad!r}")
    if source is None:
        return None, pad
    if source in ("base", "union"):
        if source == "base" and base is None:
            raise CurvlensError(f"{where}: tokenizer source 'base' needs a base_model")
        return source, pad
    return local(source, "tokenizer source"), pad


def _tensor_rules(value: Any, where: str, base, names_by_dir: dict, local) -> tuple[tuple[str, str], ...]:
    """The ``tensors`` section as (pattern, action) pairs, a model given by path
    turned into its expert name (or ``base``)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CurvlensError(f"{where}: 'tensors' must be a list of {{filter: PATTERN, action: ACTION}}")
    rules = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"filter", "action"}:
            raise CurvlensError(f"{where}: tensors[{i}] must be {{filter: PATTERN, action: merge | drop | base "
                                f"| a model}}; got {item!r}")
        action = item["action"]
        if not isinstance(action, str):
            raise CurvlensError(f"{where}: tensors[{i}].action must be a string; got {action!r}")
        if action not in ("merge", "drop", "base") and action not in names_by_dir.values():
            d = local(action, f"tensors[{i}].action")
            if base is not None and d == base:
                action = "base"
            elif d in names_by_dir:
                action = names_by_dir[d]
            else:
                raise CurvlensError(f"{where}: tensors[{i}].action {item['action']!r} is not the base or "
                                    "one of the models")
        rules.append((str(item["filter"]), action))
    return tuple(rules)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CurvlensError(f"{where} must be a mapping of parameter name -> value; got {value!r}")
    return dict(value)


def _default(method, key: str, where: str) -> Any:
    for spec in method.params:
        if key == spec.name or key in spec.aliases:
            return spec.default
    valid = ", ".join(repr(s.name) for s in method.params)
    raise CurvlensError(f"{where}: unknown parameter {key!r} for merge method {method.name!r}; "
                        f"expected one of {valid}")


