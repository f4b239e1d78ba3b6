"""A self-contained HTML report: tables and interactive plotly figures in one file.

plotly.js is embedded once (no CDN), so the report opens offline.
"""
from __future__ import annotations

import html
from pathlib import Path

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } caption { text-align: left; font-weight: bold; margin-bottom: 4px; }
.note { color: #555; font-size: 0.9em; }
"""


def table_html(df, caption: str, floatfmt: str = "{:.3f}") -> str:
    """A DataFrame as an HTML table with a caption."""
    body = df.to_html(float_format=floatfmt.format, border=0)
    end = body.index(">", body.index("<table")) + 1  # after the opening <table ...> tag
    return body[:end] + f"<caption>{html.escape(caption)}</caption>" + body[end:]


def render_report(sections: list[tuple[str, str]], title: str = "curvlens report") -> str:
    """Assemble ``(heading, html)`` sections into one page."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{body}")
    parts.append("</body></html>")
    return "\n".join(parts)


def figure_html(fig, *, first: bool) -> str:
    """One plotly figure as a div; plotly.js is inlined with the first figure only."""
    return fig.to_html(full_html=False, include_plotlyjs=True if first else False)


def write_report(path, sections: list[tuple[str, str]], title: str = "curvlens report") -> Path:
    """Write ``sections`` as one self-contained HTML file; returns the path."""
    path = Path(path)
    path.write_text(render_report(sections, title=title))
    return path
