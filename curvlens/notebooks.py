"""Execute the notebooks as a user would, and render them as readable pages.

``curvlens notebooks [NN ...] [--quick] [--out docs/notebooks]`` runs each
``notebooks/NN_name.py`` (jupytext percent format) top to bottom in a fresh kernel
and writes ``NN_name.md`` (text, tables and figures) beside a folder of its
figures, so that the notebooks can be read without running them.

``jupyter nbconvert --execute`` and ``jupytext --execute`` work too. They use
nbclient with its mimic of the ``ipywidgets.Output`` front-end (nbclient 0.11), which
answers output *captured* into an Output widget with comm messages on the shell
socket while it awaits the execute reply on that same socket; such cells used to
stall (the explorers now set their figure as the widget's state instead, see
``curvlens.views.explorers._show``). Here the client has no widget mimic at all
(``widget_registry = {}``): what ``interact`` draws lands in the cell's outputs, so
that the rendered pages show it.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

__all__ = ["execute_notebook", "render_markdown", "render_notebooks"]

#: what a cell prints when it ends: the notebook's FACTS dict, one JSON line
FACTS_TAG = "CURVLENS_FACTS="
_TEXT_LIMIT = 4000


def execute_notebook(src: str | Path, *, quick: bool | None = None, cwd: str | Path | None = None,
                     timeout: int = 1800, extra_env: dict | None = None, facts: bool = True):
    """Run a jupytext ``.py`` or ``.ipynb`` notebook in a fresh kernel; return ``(nb, facts)``.

    ``quick`` overrides ``QUICK`` in the cell tagged ``parameters``; ``extra_env`` is
    set in the kernel's ``os.environ`` before any other cell. ``facts`` appends a cell
    that prints the notebook's ``FACTS`` dict (if any); it is read back and removed.
    """
    import jupytext
    from nbclient import NotebookClient

    src = Path(src)
    nb = jupytext.read(src)
    lines = ["# %%", "import os"]
    lines += [f"os.environ[{k!r}] = {str(v)!r}" for k, v in (extra_env or {}).items()]
    if quick is not None:
        lines.append(f"QUICK = {bool(quick)}")
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    injected = jupytext.reads("\n".join(lines) + "\n", fmt="py:percent").cells[0]
    injected.metadata["tags"] = ["injected-parameters"]
    at = nb.cells.index(params[0]) + 1 if params else 0
    nb.cells.insert(at, injected)
    if facts:
        nb.cells.append(jupytext.reads(
            "# %%\nimport json as _json\n"
            f"print({FACTS_TAG!r} + _json.dumps(globals().get('FACTS', {{}}), default=float))\n",
            fmt="py:percent").cells[0])
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd or src.parent)}})
    client.widget_registry = {}  # no Output-widget mimic: see the module docstring
    client.execute()
    found = {}
    if facts:
        last = nb.cells.pop()
        for out in last.get("outputs", []):
            for line in out.get("text", "").splitlines():
                if line.startswith(FACTS_TAG):
                    found = json.loads(line[len(FACTS_TAG):])
    return nb, found


def _text(s: str) -> str:
    s = s if len(s) <= _TEXT_LIMIT else s[:_TEXT_LIMIT] + "\n... (cut)"
    return "```\n" + s.rstrip("\n") + "\n```\n"


def render_markdown(nb, name: str, out_dir: str | Path) -> Path:
    """Write ``out_dir/name.md`` (and ``out_dir/name_files/*.png``) from an executed notebook."""
    out_dir = Path(out_dir)
    files = out_dir / f"{name}_files"
    parts, k = [], 0
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            continue
        if cell.cell_type == "markdown":
            parts.append(cell.source + "\n")
            continue
        if cell.cell_type != "code":
            continue
        parts.append("```python\n" + cell.source.rstrip("\n") + "\n```\n")
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "stream":
                if out.get("name") == "stderr":  # warnings and progress: not part of the page
                    continue
                text = "".join(out.get("text", ""))
                text = "\n".join(x for x in text.splitlines() if "\x1b" not in x and "\r" not in x)
                if text.strip():
                    parts.append(_text(text))
            elif kind == "error":
                parts.append(_text(f"{out.get('ename')}: {out.get('evalue')}"))
            elif kind in ("display_data", "execute_result"):
                data = out.get("data", {})
                if "image/png" in data:
                    files.mkdir(parents=True, exist_ok=True)
                    k += 1
                    png = files / f"figure-{k:02d}.png"
                    png.write_bytes(base64.b64decode(data["image/png"]))
                    parts.append(f"![figure {k}]({files.name}/{png.name})\n")
                elif "application/vnd.jupyter.widget-view+json" in data:
                    parts.append("*(interactive widget: run the notebook to use it)*\n")
                elif "application/vnd.plotly.v1+json" in data:
                    parts.append("*(interactive plotly figure: run the notebook to see it)*\n")
                elif "text/markdown" in data:
                    parts.append("".join(data["text/markdown"]) + "\n")
                elif "text/html" in data and "<table" in "".join(data["text/html"]):
                    parts.append("".join(data["text/html"]) + "\n")
                elif "text/plain" in data:
                    parts.append(_text("".join(data["text/plain"])))
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / f"{name}.md"
    page.write_text("\n".join(parts).replace(str(Path.home()), "~"))  # no local home dir in the pages
    return page


def render_notebooks(sources, out_dir: str | Path, *, quick: bool = True, timeout: int = 1800,
                     progress=print) -> dict:
    """Execute each notebook source and write its page; returns ``{name: facts}``."""
    import time

    done = {}
    for src in sources:
        src = Path(src)
        t0 = time.perf_counter()
        nb, facts = execute_notebook(src, quick=quick, timeout=timeout, extra_env={"TQDM_DISABLE": "1"})
        page = render_markdown(nb, src.stem, out_dir)
        if facts:
            (Path(out_dir) / f"{src.stem}.facts.json").write_text(json.dumps(facts, indent=1, default=float) + "\n")
        done[src.stem] = facts
        if progress:
            progress(f"{src.name}: {time.perf_counter() - t0:.0f} s -> {page}")
    return done
