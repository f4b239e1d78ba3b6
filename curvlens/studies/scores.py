"""What a sweep's rows say, job by job: the scores each evaluation returned.

A sweep frame is long (one row per job x metric); studies built on sweeps (soups,
fronts, the graft sweep) read it one row per job with one column per metric, and
must tell a score from its standard error and a job that lost a metric from one
that scored it.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

#: A metric named ``<m>_stderr`` is the standard error of metric ``<m>`` (as
#: lm-eval reports it), not a score: kept in the frame, left out of objectives.
STDERR_SUFFIX = "_stderr"


def score_metrics(metrics) -> list[str]:
    """The metrics that are scores: all but the ``<m>_stderr`` companions.

    Examples
    --------
    >>> score_metrics(["addition", "addition_stderr", "facts"])
    ['addition', 'facts']
    """
    return [m for m in metrics if not str(m).endswith(STDERR_SUFFIX)]


def scored_jobs(df: pd.DataFrame, metrics: Sequence[str] | None, purpose: str) -> pd.DataFrame:
    """One row per job (:func:`wide_scores`) with its ``error``; a job that ran but
    returned none of some of ``metrics`` (an evaluator that stopped returning a
    metric) becomes ``status == "error"`` saying which, never a silent NaN."""
    wide = wide_scores(df)
    errors = df.drop_duplicates("job").set_index("job")["error"]
    wide.insert(3, "error", wide["job"].map(errors).astype(object))
    returned = df[df["metric"].notna()].groupby("job")["metric"].agg(set)
    for i in wide.index[wide["status"] == "ok"]:
        got = returned.get(wide.at[i, "job"], set())
        lacking = [m for m in metrics or () if m not in got]
        if lacking:
            wide.at[i, "status"] = "error"
            wide.at[i, "error"] = (f"evaluate returned metric(s) {sorted(got)} but not {lacking}, which "
                                   f"{purpose} pools")
    return wide


def wide_scores(df: pd.DataFrame) -> pd.DataFrame:
    """One row per job, one column per metric (the ``value``), with ``label`` and
    ``status``; failed jobs keep their row with NaN scores.

    Examples
    --------
    >>> t = pd.DataFrame({"job": [0, 0, 1], "label": ["a", "a", "b"], "metric": ["x", "y", None],
    ...                   "value": [1.0, 2.0, float("nan")], "status": ["ok", "ok", "error"]})
    >>> wide_scores(t).to_dict("records")
    [{'job': 0, 'label': 'a', 'status': 'ok', 'x': 1.0, 'y': 2.0}, {'job': 1, 'label': 'b', 'status': 'error', 'x': nan, 'y': nan}]
    """
    jobs = df.drop_duplicates("job")[["job", "label", "status"]].set_index("job")
    ok = df[df["metric"].notna()]
    metrics = list(dict.fromkeys(ok["metric"]))
    values = ok.pivot_table(index="job", columns="metric", values="value", sort=False)
    out = jobs.join(values.reindex(columns=metrics)).reset_index()
    out.columns.name = None
    return out
