"""Config: what a merge is asked to do, read from and written to mergekit / OTA-fork YAML.

``merge_config`` reads a config (and writes a merge back as one), ``param_settings``
resolves mergekit's per-tensor parameter forms, ``stack`` turns passthrough
``slices`` into a job of the merge driver, ``tokenizer`` decides the tokenizer
written beside the weights, and ``merge`` is the front door of every merge
(``cl.merge``), handing its job to :mod:`curvlens.passes.merge`.
"""
