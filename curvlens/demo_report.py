"""The sections of the demo's ``report.html``: findings, regime, the zoo, scores,
merges and the analyses, each a readable table or an interactive figure.

:func:`demo_sections` assembles them from the frames :func:`curvlens.demo.run_demo`
computed; :mod:`curvlens.views.report` writes the page.
"""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd


def score_pivot(table: pd.DataFrame) -> pd.DataFrame:
    """model x capability accuracy, with the mean over capabilities."""
    pivot = table.pivot_table(index="model", columns="capability", values="accuracy", sort=False)
    pivot["mean"] = pivot.mean(axis=1)
    return pivot


def models_table(experts, capabilities=None) -> pd.DataFrame:
    """One row per expert: its capability, where its curvature comes from (a file
    relative to the expert's dir, what it holds), the optimizer step and beta2 it
    records, and whether reads are bias-corrected. Reads no tensor data."""
    rows = []
    for e in experts.experts:
        m = e.moments
        row = {"expert": e.name}
        if capabilities:
            row["capability"] = capabilities.get(e.name, "")
        if m is None:
            row["curvature"] = "none"
        else:
            kind = "empirical Fisher" if m.metadata.get("kind") == "empirical_fisher" else "Adam exp_avg_sq"
            row["curvature"] = f"{kind} ({_relative(m.path, e.path)})"
            row["optimizer step"] = m.step
            row["beta2"] = m.beta2
            row["bias-corrected"] = "yes" if m.bias_corrected else "no"
        rows.append(row)
    return pd.DataFrame(rows).set_index("expert")


def _relative(path, root) -> str:
    if path is None:
        return "in memory"
    path = Path(path)
    try:
        return path.relative_to(root).as_posix() if root is not None else path.name
    except ValueError:
        return path.name


def zoo_section(zoo, experts, config: str) -> str:
    """The zoo in words and two small tables: which models, how big, which curvature."""
    from curvlens.views.report import table_html

    desc = experts.describe()
    base = experts.base.path.name if experts.base is not None and experts.base.path is not None else "none"
    n_params = int(desc.numel.sum())
    text = (f"<p>The {html.escape(config)!s} demo zoo: a tiny Llama base (<code>{html.escape(base)}</code>) and "
            f"{len(experts)} capability experts fine-tuned from it with AdamW; {len(desc)} tensors, "
            f"{n_params:,} parameters per model.</p>")
    by_role = desc.groupby("role")["numel"].sum().to_frame("parameters")
    return (text + table_html(models_table(experts, zoo.capabilities), "the experts and their curvature",
                              "{:g}")
            + table_html(by_role, "parameters by role", "{:,.0f}"))


def regime_html(reg: pd.DataFrame) -> str:
    """The regime verdict and one table per scope (only the metrics that scope has)."""
    from curvlens.studies.regime import REGIME_SCOPES, regime_by_scope, regime_verdict
    from curvlens.views.report import table_html

    body = f"<p>{html.escape(regime_verdict(reg))}.</p>"
    for scope, table in regime_by_scope(reg).items():
        body += table_html(table, REGIME_SCOPES.get(scope, scope), "{:.4g}")
    return body


def findings_sections(frames: dict) -> list[tuple[str, str]]:
    """The report's first sections: the paper's claims checked on these experts,
    and the regime they are in."""
    f = frames["findings"]
    items = "".join(
        f"<li><b>({html.escape(r.claim)}) {html.escape(r.statement)}: {html.escape(r.verdict)}</b><br>"
        f"{html.escape(r.evidence)}<br><span class='note'>rule: {html.escape(r.rule)}</span></li>"
        for r in f.itertuples())
    return [("Findings", f"<p class='note'>Each claim of the paper, decided by the rule shown from the numbers "
                         f"of this run (computed, not written by hand).</p><ul>{items}</ul>"),
            ("Regime", regime_html(frames["regime"]))]


def demo_sections(zoo, experts, frames: dict, merges: dict, config: str) -> list[tuple[str, str]]:
    """The report's sections: the zoo, scores, merges and (when computed) the analyses."""
    from curvlens import views as V
    from curvlens.views.report import figure_html, table_html

    table = frames["merge_table"]
    merge_summary = pd.DataFrame({label: r.summary() for label, r in merges.items()}).T
    merge_summary = merge_summary.drop(columns=["method"], errors="ignore").astype(float)
    figs = [V.merge_scores_plotly(table, kind="bars"),
            V.merge_scores_plotly(table, zoo.capabilities, normalized=True)]
    sections = []
    if "findings" in frames:
        sections += findings_sections(frames)
    sections += [
        ("The zoo", zoo_section(zoo, experts, config)),
        ("Scores", table_html(score_pivot(table), "held-out exact-match accuracy")
         + figure_html(figs[0], first=True) + figure_html(figs[1], first=False)),
        ("Merges", table_html(merge_summary, "per merge: numel-weighted kept fraction per expert, "
                              "fraction masked by every expert, norm of the change")),
    ]
    if "curvature_overlap" in frames:
        sections += analysis_sections(zoo, frames)
    return sections


def analysis_sections(zoo, frames: dict) -> list[tuple[str, str]]:
    """Curvature overlap, FFG masks and interference: tables and figures."""
    from curvlens import views as V
    from curvlens.passes.analysis import aggregate
    from curvlens.studies.graft import ffg_vs_magnitude_summary
    from curvlens.views.report import figure_html, table_html

    ov = frames["curvature_overlap"]
    pair = tuple(ov[["expert_a", "expert_b"]].iloc[0])
    body = table_html(aggregate(ov, by=()), "model-level curvature overlap (numel-weighted)")
    body += figure_html(V.pair_matrix_plotly(ov, "spearman_log"), first=False)
    body += figure_html(V.layer_role_heatmap_plotly(ov, "spearman_log", expert_a=pair[0], expert_b=pair[1],
                                                    title=f"Spearman of log v: {pair[0]} vs {pair[1]}"),
                        first=False)
    body += figure_html(V.pair_grid_plotly(frames["pooled_moments"]), first=False)
    body += figure_html(V.log10_histogram_plotly(frames["log10_histogram"]), first=False)
    sections = [("Curvature overlap", body)]
    ms = frames["mask_stats"]
    body = table_html(ffg_vs_magnitude_summary(frames["graft_sweep"], zoo.capabilities),
                      "grafting: score on the expert's own capability, FFG vs magnitude")
    body += figure_html(V.density_curves_plotly(frames["graft_sweep"], zoo.capabilities), first=False)
    body += figure_html(V.layer_role_heatmap_plotly(ms, "kept_frac", criterion="fisher", density=0.3,
                                                    title="FFG kept density at 0.3, by layer x role"),
                        first=False)
    body += figure_html(V.layer_role_heatmap_plotly(ms, "mask_rank", criterion="fisher", density=0.3,
                                                    log=True, title="FFG mask rank at 0.3"), first=False)
    sections.append(("FFG masks", body))
    body = table_html(frames["merge_predicted_loss"], "predicted loss increase per merge and expert "
                      "(diagonal-Fisher quadratic model)", "{:.4g}")
    body += figure_html(V.pair_matrix_plotly(frames["interference"], "sign_conflict"), first=False)
    sections.append(("Interference", body))
    return sections
