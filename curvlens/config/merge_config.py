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
or a list of ``{filter, value}`` conditions (:mod:`curvlens.config.param_settings`),
resolved per tensor name by the streaming driver. A config's ``base_model`` is
what the method's ``base_role`` says (:class:`~curvlens.math.methods.MergeMethod`):
the reference of the task vectors (a base also listed under ``models`` is left
out, as mergekit and the fork do), one more averaged model (``linear``: mergekit
adds an unlisted base to the average) or unused. curvlens's ``base_model_role:
reference`` says a ``linear`` base is the reference only, never averaged (what
``cl.merge`` does with a base, and what the config it saves states).

``slices`` with ``merge_method: passthrough`` stack layer ranges of the models
(:mod:`curvlens.config.stack`); with ``models``, passthrough copies its one model,
each tensor times its ``scale`` (mergekit's way to zero a module). ``dtype`` is the dtype the inputs are read in
(rounded to), ``out_dtype`` (default: ``dtype``) the one written; curvlens
computes in fp32 between the two. ``tokenizer_source`` / ``tokenizer`` and
``chat_template`` say which tokenizer is written beside the weights
(:mod:`curvlens.config.tokenizer`). Every key at every level is checked:
anything curvlens cannot honour as mergekit does is refused by name.

curvlens's own ``tensors`` section says per tensor what the merge does, first
matching ``filter`` first (a substring as in mergekit, or any pattern of
:mod:`curvlens.tensor_filter`)::

    tensors:
      - {filter: classifier, action: drop}        # no task's head in the merge
      - {filter: "*.pooler.*", action: base}      # the base's pooler, unchanged
      - {filter: "role:embed", action: ./math}    # one model's embeddings (path or name)

The same format is written back: :func:`merge_yaml` states a merge as a config
that ``curvlens merge`` re-runs (saved beside every merged model).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curvlens.config.keys import check_keys, config_dtypes, parameter_mapping, tensor_rules
from curvlens.config.options import TokenizerOptions, WriteOptions
from curvlens.config.param_settings import VaryingParams, check_setting, is_constant, number_converter
from curvlens.config.stack import StackPlan, load_stack, slices_as_models
from curvlens.config.tokenizer import tokenizer_options
from curvlens.errors import CurvlensError
from curvlens.io.architecture import layer_count
from curvlens.io.checkpoint import PathLike
from curvlens.io.dtypes import dtype_name
from curvlens.math.methods import MergeMethod, get_method
from curvlens.io.paths import expert_names
from curvlens.passes.experts import Experts
from curvlens.math.methods.params import check_value_forms
from curvlens.tensor_filter import TensorFilter

_TOP_KEYS = {"merge_method", "base_model", "base_model_role", "models", "slices", "parameters", "dtype",
             "tokenizer_source", "tokenizer", "chat_template", "out_dtype", "tensors"}
# mergekit keys curvlens refuses, and why
_REFUSED_TOP = {
    "modules": "mergekit's per-module configs (multimodal models with several modules) are not supported",
}
_MODEL_KEYS = {"model", "parameters"}
#: Per-model parameters the loader itself reads (paths), whatever the method.
_PATH_PARAMS = {"preconditioner_path"}


@dataclass(frozen=True)
class MergeConfig:
    """A parsed merge config, ready for :func:`curvlens.merge`
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
    tensor_params: VaryingParams | None = None
    tokenizer: TokenizerOptions = TokenizerOptions()
    notes: tuple[str, ...] = ()
    stack: StackPlan | None = None

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

    def merge_kwargs(self, *, max_shard_size: int | str = "1GB") -> dict:
        """Keyword arguments of :func:`curvlens.merge` for this config (with the
        method's parameters; the config's text is what the output saves)."""
        kw = dict(dtype=self.dtype, input_dtype=self.input_dtype, tensors=self.tensors,
                  tensor_params=self.tensor_params, tokenizer=self.tokenizer,
                  writing=WriteOptions(max_shard_size=max_shard_size, config_text=self.text))
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
    check_keys(cfg, _TOP_KEYS, where, refused=_REFUSED_TOP, optional=True)
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
        if str(cfg["merge_method"]) == "passthrough":
            plan = load_stack(cfg, where, text, local)
            models = tuple(dict.fromkeys(s.model for s in plan.slices))
            return MergeConfig("passthrough", None, models, tuple(dict.fromkeys(m.name for m in models)), None, {},
                               plan.dtype, False, text, input_dtype=plan.input_dtype, stack=plan)
        # one slice over every model's whole layer range is the `models` form
        cfg = slices_as_models(cfg, where, local, layer_count)
        from_slices = True
    else:
        from_slices = False
    method = get_method(str(cfg["merge_method"]))
    models = cfg.get("models") or []
    if not isinstance(models, list) or not models:
        raise CurvlensError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: ...}}")

    base = local(cfg["base_model"], "base_model") if cfg.get("base_model") else None
    base_role = _base_role(cfg, method, base, where)
    notes: list[str] = []
    top = parameter_mapping(cfg.get("parameters"), f"{where}: 'parameters'")
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
        check_keys(entry, _MODEL_KEYS, f"{where}: models[{i}]")
        d = local(entry["model"], f"models[{i}].model")
        mp = parameter_mapping(entry.get("parameters"), f"{where}: models[{i}].parameters")
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
    if method.max_experts is not None and len(dirs) > method.max_experts:
        added = " (mergekit counts an unlisted base_model as one more)" if dirs[-1] == base else ""
        raise CurvlensError(f"{where}: {method.name} takes at most {method.max_experts} model(s); got "
                            f"{len(dirs)}{added}")
    if base is not None and method.base_role == "ignored":
        notes.append(f"base_model is not used by {method.name} (only as the reference of the report)")
    if not dirs:
        raise CurvlensError(f"{where}: no models left to merge besides the base model")
    if base is not None and not method.allows_base:
        base = None  # the base is the one model (passthrough): an input, not a reference
    names = expert_names(dirs)

    params, tensor_params = _params(method, top, per_model, where, base or dirs[0])
    out_dtype, input_dtype = config_dtypes(cfg, where)
    tensors = tensor_rules(cfg.get("tensors"), where, base, dict(zip(dirs, names)), local)
    tokenizer = tokenizer_options(cfg, where, base, local)
    if notes:
        text = "".join(f"# curvlens: {n}\n" for n in notes) + text
    return MergeConfig(method.name, base, tuple(dirs), tuple(names), tuple(moments), params,
                       out_dtype, bias_correction, text, tensors, input_dtype=input_dtype,
                       tensor_params=tensor_params, tokenizer=tokenizer, notes=tuple(notes))


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
    :class:`VaryingParams` of those that vary by tensor (None if none do)."""
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
    tp = VaryingParams(top={k: top[k] for k in varying if k in top},
                      per_model=[{k: mp[k] for k in varying if k in mp} for mp in per_model],
                      per_expert=per_expert,
                      defaults={k: _default(method, k, where) for k in varying},
                      n_layers=layer_count(ref_dir),
                      convert={k: number_converter(_spec(method, k).validate, k) for k in varying})
    return params, tp





def _default(method, key: str, where: str) -> Any:
    for spec in method.params:
        if key == spec.name or key in spec.aliases:
            return spec.default
    valid = ", ".join(repr(s.name) for s in method.params)
    raise CurvlensError(f"{where}: unknown parameter {key!r} for merge method {method.name!r}; "
                        f"expected one of {valid}")


def merge_yaml(m: MergeMethod, experts: Experts, params: dict, out_dtype=None, tensors=None,
               in_dtype=None) -> str:
    """A merge as the YAML :func:`load_merge_config` reads back (and ``curvlens
    merge`` re-runs): the models by path (when they have one), shared parameters
    at the top, per-expert values that differ under each model, defaults left out.

    Parameters
    ----------
    m : MergeMethod
    experts : Experts
        The models merged (their exclusions become ``drop`` rules).
    params : dict
        The method's resolved parameters (per-expert lists), as requested.
    out_dtype, in_dtype : torch.dtype, optional
        The written dtype and the one inputs were rounded to.
    tensors : mapping or list of (pattern, action), optional
        The merge's ``tensors`` rules.
    """
    import yaml

    return yaml.safe_dump(_config(m, experts, params, out_dtype, tensors, in_dtype), sort_keys=False)


def _config(m: MergeMethod, experts: Experts, p: dict, out_dtype, tensors, in_dtype) -> dict:
    defaults = {spec.name: spec.default for spec in m.params}
    per_expert = {spec.name for spec in m.params if spec.per_expert}
    top, per_model = {}, [{} for _ in experts.experts]
    for k, v in _plain(p).items():
        if k in per_expert and isinstance(v, list):
            for mp, x in zip(per_model, v):
                if x != defaults[k]:
                    mp[k] = x
        elif v != defaults[k]:
            top[k] = v
    cfg = {"merge_method": m.name}
    paths = [e.path or e.checkpoint.path for e in experts.experts]
    if all(q is not None for q in paths):
        if experts.base is not None and experts.base.path is not None:
            cfg["base_model"] = str(experts.base.path)
            if m.base_role == "input":  # mergekit would average it: here it was the reference only
                cfg["base_model_role"] = "reference"
        cfg["models"] = []
        for e, q, mp in zip(experts.experts, paths, per_model):
            if m.needs_moments and e.moments is not None and e.moments.path is not None:
                mp = {**mp, "preconditioner_path": str(e.moments.path)}
            cfg["models"].append({"model": str(q), **({"parameters": mp} if mp else {})})
    if m.needs_moments and all(e.moments is not None and e.moments.bias_corrected for e in experts.experts):
        top = {**top, "bias_correction": True}
    cfg["parameters"] = top
    rules = list(tensors.items()) if hasattr(tensors, "items") else list(tensors or [])
    if rules:
        by_name = {e.name: str(q) for e, q in zip(experts.experts, paths) if q is not None}
        cfg["tensors"] = [{"filter": pat, "action": by_name.get(a, a)} for pat, a in rules]
    if experts.exclude:
        cfg["tensors"] = cfg.get("tensors", []) + [{"filter": pat, "action": "drop"}
                                                   for pat in experts.exclude.patterns]
    # mergekit reads inputs in `dtype` and writes `out_dtype`: curvlens computes
    # in fp32 from the stored (or input_dtype-rounded) inputs
    if in_dtype is not None:
        cfg["dtype"] = dtype_name(in_dtype)
    elif out_dtype is not None:
        cfg["dtype"] = "float32"
    if out_dtype is not None:
        cfg["out_dtype"] = dtype_name(out_dtype)
    return cfg


def _plain(p: dict) -> dict:
    """Resolved params as YAML-safe plain values."""
    out = {}
    for k, v in p.items():
        if isinstance(v, (list, tuple)):
            v = [x if isinstance(x, (int, float, str, bool, type(None))) else str(x) for x in v]
            if len(set(map(repr, v))) == 1:
                v = v[0]
        elif not isinstance(v, (int, float, str, bool, type(None))):
            v = str(v)
        out[k] = v
    return out
