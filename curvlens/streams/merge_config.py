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
to all. Paths are local (relative paths are read relative to the config file). As in
mergekit, a method that uses a base (the task-vector methods, ``slerp``, ``nuslerp``,
``multislerp``, ``karcher``, ...: ``MergeMethod.separate_base``) ignores an entry of
``models`` that is the base model.
Per-layer gradients and ``filter`` lists of mergekit's parameters are not
supported and are refused with a clear error rather than silently flattened.

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
from curvlens.streams.experts import Experts, expert_names
from curvlens.tensor_filter import TensorFilter

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source",
             "tokenizer", "chat_template", "out_dtype", "name", "tensors"}
# Top-level keys that only affect what mergekit copies beside the weights.
_IGNORED_TOP = {"tokenizer_source", "tokenizer", "chat_template", "name"}
_CURVLENS_OPTIONS = {"bias_correction"}


@dataclass(frozen=True)
class MergeConfig:
    """A parsed merge config, ready for :func:`curvlens.streams.merge.merge`."""

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

    def experts(self) -> Experts:
        """Open the models (and their moments when the method needs them)."""
        needs_moments = get_method(self.method).needs_moments
        moments: Any = False
        if needs_moments:
            moments = [m if m is not None else d for m, d in zip(self.moments, self.models)]
        # tensors the rules do not merge need not line up (each task's own head)
        return Experts.from_dirs(self.base, list(self.models), list(self.names), moments=moments,
                                 bias_correction=self.bias_correction,
                                 exclude=TensorFilter.not_merged(self.tensors))


def _scalar(where: str, key: str, value: Any) -> Any:
    if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
        raise CurvlensError(
            f"{where}: parameter {key!r} uses mergekit's per-layer filter syntax, which curvlens "
            "does not support; give one value"
        )
    if isinstance(value, list):
        raise CurvlensError(
            f"{where}: parameter {key!r} is a list (a mergekit per-layer gradient), which curvlens "
            "does not support; give one value"
        )
    return value


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
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise CurvlensError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(_TOP_KEYS)}")
    if "merge_method" not in cfg:
        raise CurvlensError(f"{where}: missing 'merge_method'")
    method = get_method(str(cfg["merge_method"]))
    models = cfg.get("models") or []
    if not isinstance(models, list) or not models:
        raise CurvlensError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: ...}}")

    def local(p: Any, what: str) -> Path:
        if isinstance(p, dict) and "model" in p:  # mergekit also allows {model: {model: path}}
            p = p["model"]
        q = Path(str(p)).expanduser()
        q = q if q.is_absolute() else root / q
        if not q.exists():
            raise CurvlensError(f"{where}: {what} {str(p)!r} not found at {q} "
                                "(curvlens reads local paths only; download models first)")
        return q.resolve()

    base = local(cfg["base_model"], "base_model") if cfg.get("base_model") else None
    top = _mapping(cfg.get("parameters"), f"{where}: 'parameters'")
    bias_correction = top.pop("bias_correction", False)
    if not isinstance(bias_correction, bool):
        raise CurvlensError(f"{where}: parameter 'bias_correction' must be true or false; got {bias_correction!r}")
    top = {k: _scalar(where, k, v) for k, v in top.items()}

    dirs, moments, per_model, seen = [], [], [], {}
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise CurvlensError(f"{where}: models[{i}] must be a mapping with a 'model' path")
        d = local(entry["model"], f"models[{i}].model")
        if base is not None and d == base and method.separate_base:
            continue  # as mergekit: the base contributes no task vector / is not one more input
        if d in seen:
            raise CurvlensError(f"{where}: models[{seen[d]}] and models[{i}] are the same model ({d}); "
                                "list each model once (give it a larger weight instead)")
        seen[d] = i
        mp = _mapping(entry.get("parameters"), f"{where}: models[{i}].parameters")
        mp = {k: _scalar(f"{where} models[{i}]", k, v) for k, v in mp.items()}
        pre = mp.pop("preconditioner_path", None)
        moments.append(local(pre, f"models[{i}].parameters.preconditioner_path") if pre else None)
        dirs.append(d)
        per_model.append(mp)
    if not dirs:
        raise CurvlensError(f"{where}: no models left to merge besides the base model")
    names = expert_names(dirs)

    params = dict(top)
    keys = {k for mp in per_model for k in mp}
    for k in keys:
        values = [mp.get(k, top.get(k, _default(method, k, where))) for mp in per_model]
        params[k] = values
    # mergekit: dtype is the compute dtype, out_dtype (default: dtype) the written
    # one. curvlens always computes in fp32, so only the written dtype matters.
    out_dtype = cfg.get("out_dtype") if cfg.get("out_dtype") is not None else cfg.get("dtype")
    if out_dtype is not None and not isinstance(out_dtype, str):
        raise CurvlensError(f"{where}: dtype/out_dtype must be a string such as 'bfloat16'; got {out_dtype!r}")
    tensors = _tensor_rules(cfg.get("tensors"), where, base, dict(zip(dirs, names)), local)
    return MergeConfig(method.name, base, tuple(dirs), tuple(names), tuple(moments), params,
                       out_dtype, bias_correction, text, tensors)


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


