"""The options of a merge's written model, grouped apart from the method's parameters.

``merge(experts, method, out, **params)`` keeps the method's parameters in
``**params``; how the output is written (:class:`WriteOptions`) and which
tokenizer goes beside it (:class:`TokenizerOptions`) are small frozen records::

    cl.merge(experts, "ties", "out", density=0.5,
             writing=cl.WriteOptions(max_shard_size="2GB"),
             tokenizer=cl.TokenizerOptions(source="base", chat_template="auto"))

A parsed YAML config fills both (:meth:`curvlens.config.merge_config.MergeConfig.merge_kwargs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

__all__ = ["TokenizerOptions", "WriteOptions"]


@dataclass(frozen=True)
class WriteOptions:
    """How a merged model is written.

    Attributes
    ----------
    max_shard_size : int or str
        Largest safetensors shard (``"1GB"``, ``"500MB"`` or bytes).
    config_text : str, optional
        The merge config saved beside the weights (``curvlens_merge.yml``);
        default: the merge written as a mergekit-style config that
        ``curvlens merge`` re-runs.
    """

    max_shard_size: Union[int, str] = "1GB"
    config_text: Optional[str] = None


@dataclass(frozen=True)
class TokenizerOptions:
    """Which tokenizer is written beside merged weights (mergekit's
    ``tokenizer_source``, ``tokenizer:`` and ``chat_template``;
    :mod:`curvlens.config.tokenizer`).

    Attributes
    ----------
    source : None, "base", "union" or path
        The vocabulary to check every model against and copy (None: the
        reference model's files, unchecked).
    chat_template : str, optional
        A template name, ``"auto"`` or a Jinja template, written into the
        output's ``tokenizer_config.json``.
    pad_to_multiple_of : int, optional
        mergekit's ``tokenizer.pad_to_multiple_of``.
    """

    source: Union[None, str, Path] = None
    chat_template: Optional[str] = None
    pad_to_multiple_of: Optional[int] = None

    @property
    def given(self) -> bool:
        """Whether any option is set (each concerns a written model)."""
        return any(v is not None for v in (self.source, self.chat_template, self.pad_to_multiple_of))
