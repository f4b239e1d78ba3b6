"""Execute the notebooks as a user would, and render them as readable pages.

``curvlens notebooks [NN ...] [--quick] [--out docs/notebooks]`` runs each
``notebooks/NN_name.py`` (jupytext percent format) top to bottom in a fresh kernel
and writes ``NN_name.md`` (text, tables and figures) beside a folder of its
figures, so that the notebooks can be read without running them.

Two engines run a notebook, with the same result: ``"nbclient"`` in this process
(what ``curvlens notebooks`` uses) and ``"nbconvert"``, the ``jupyter nbconvert
--to notebook --execute`` command itself in a subprocess (what the test suite
uses, so that the command a user types is the one tested). Both keep nbclient's
mimic of the ``ipywidgets.Output`` front-end. No curvlens widget captures output
into an Output widget (``with out: ...``, as ``ipywidgets.interactive`` does): the
mimic answers captured output with comm messages on the shell socket while it
awaits the execute reply there, and every such cell waited for the full cell
timeout. The explorers and :func:`curvlens.views.figure_sliders` set their figure
as the widget's state instead (:mod:`curvlens.views.widget_output`); nbclient
records that state in the notebook's metadata, and :func:`render_markdown` draws
the figures from it.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["execute_notebook", "render_markdown", "render_notebooks"]

#: what a cell prints when it ends: the notebook's FACTS dict, one JSON line
FACTS_TAG = "CURVLENS_FACTS="
_TEXT_LIMIT = 4000
ENGINES = ("nbclient", "nbconvert")
#: environment for a batch run: no progress bars (curvlens' tqdm, transformers' and the hub's)
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _prepared(src: Path, quick, extra_env, facts):
    """The notebook with the injected parameter cell (and the FACTS cell) added."""
    import jupytext

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
    return nb


def _run_nbconvert(nb, cwd: Path | None, timeout: int):
    """Execute ``nb`` with ``jupyter nbconvert --to notebook --execute``; return the result."""
    import nbformat

    with tempfile.TemporaryDirectory(prefix="curvlens-nbconvert-") as tmp:
        # the kernel runs in the input notebook's folder: put it where the caller asked
        where = Path(cwd) if cwd is not None else Path(tmp)
        src = where / f"_curvlens_execute_{os.getpid()}.ipynb"
        out = Path(tmp) / "executed.ipynb"
        nbformat.write(nb, src)
        cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               f"--ExecutePreprocessor.timeout={int(timeout)}", "--ExecutePreprocessor.kernel_name=python3",
               "--output-dir", tmp, "--output", out.stem, str(src)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            src.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise RuntimeError(f"jupyter nbconvert --execute failed (exit {proc.returncode}):\n"
                               + proc.stderr[-6000:])
        return nbformat.read(out, as_version=4)


def execute_notebook(src: str | Path, *, quick: bool | None = None, cwd: str | Path | None = None,
                     timeout: int = 1800, extra_env: dict | None = None, facts: bool = True,
                     engine: str = "nbclient"):
    """Run a jupytext ``.py`` or ``.ipynb`` notebook in a fresh kernel; return ``(nb, facts)``.

    ``quick`` overrides ``QUICK`` in the cell tagged ``parameters``; ``extra_env`` is
    set in the kernel's ``os.environ`` before any other cell. ``facts`` appends a cell
    that prints the notebook's ``FACTS`` dict (if any); it is read back and removed.
    ``engine="nbconvert"`` runs ``jupyter nbconvert --to notebook --execute`` in a
    subprocess (the kernel's working dir is then ``cwd``, where the notebook is
    written for the run); ``"nbclient"`` runs the same executor in this process.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}; got {engine!r}")
    src = Path(src)
    nb = _prepared(src, quick, extra_env, facts)
    if engine == "nbconvert":
        nb = _run_nbconvert(nb, cwd, timeout)
    else:
        from nbclient import NotebookClient

        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(cwd or src.parent)}})
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


class _Page:
    """The parts of a page and its figure files, filled output by output."""

    def __init__(self, name: str, out_dir: Path, widget_states: dict):
        self.files = out_dir / f"{name}_files"
        self.parts: list[str] = []
        self.k = 0
        self.states = widget_states

    def image(self, b64: str) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        self.k += 1
        png = self.files / f"figure-{self.k:02d}.png"
        png.write_bytes(base64.b64decode(b64))
        self.parts.append(f"![figure {self.k}]({self.files.name}/{png.name})\n")

    def output(self, out) -> None:
        kind = out.get("output_type")
        if kind == "stream":
            if out.get("name") == "stderr":  # warnings and progress: not part of the page
                return
            text = "".join(out.get("text", ""))
            text = "\n".join(x for x in text.splitlines() if "\x1b" not in x and "\r" not in x)
            if text.strip():
                self.parts.append(_text(text))
        elif kind == "error":
            self.parts.append(_text(f"{out.get('ename')}: {out.get('evalue')}"))
        elif kind in ("display_data", "execute_result"):
            data = out.get("data", {})
            if "image/png" in data:
                self.image(data["image/png"])
            elif _WIDGET_VIEW in data:
                if not self.widget(data[_WIDGET_VIEW].get("model_id")):
                    self.parts.append("*(interactive widget: run the notebook to use it)*\n")
            elif "application/vnd.plotly.v1+json" in data:
                self.parts.append("*(interactive plotly figure: run the notebook to see it)*\n")
            elif "text/markdown" in data:
                self.parts.append("".join(data["text/markdown"]) + "\n")
            elif "text/html" in data and "<table" in "".join(data["text/html"]):
                self.parts.append("".join(data["text/html"]) + "\n")
            elif "text/plain" in data:
                self.parts.append(_text("".join(data["text/plain"])))

    def widget(self, model_id) -> bool:
        """Draw a displayed widget from its recorded state: its controls' values as one
        line, its Output areas' figures and text; a progress bar draws nothing. False
        when no state was recorded (then the page names the widget instead)."""
        if model_id not in self.states:
            return False
        controls: list[str] = []
        outputs: list = []
        if self._walk(model_id, controls, outputs) == "progress":
            return True
        if controls:
            self.parts.append("*Controls (run the notebook to move them): " + "; ".join(controls) + "*\n")
        for out in outputs:
            self.output(out)
        return True

    def _walk(self, model_id, controls, outputs, depth=0):
        st = self.states.get(model_id)
        if st is None or depth > 20:
            return None
        name, state = st.get("model_name", ""), st.get("state", {})
        if name.endswith("ProgressModel"):
            return "progress"
        if name == "OutputModel":
            outputs.extend(state.get("outputs", []))
        elif "children" in state:
            kids = [str(c).removeprefix("IPY_MODEL_") for c in state.get("children", [])]
            if any(self.states.get(c, {}).get("model_name", "").endswith("ProgressModel") for c in kids):
                return "progress"  # tqdm's notebook bar: a box of text and a progress bar
            for c in kids:
                self._walk(c, controls, outputs, depth + 1)
        elif name in ("HTMLModel", "HTMLMathModel", "LabelModel"):
            if str(state.get("value", "")).strip():
                outputs.append({"output_type": "display_data", "data": {"text/markdown": str(state["value"])}})
        elif "value" in state and state.get("description"):
            value = state["value"]  # a log slider's value is the value itself, not its exponent
            text = f"{value:.3g}" if isinstance(value, float) else str(value)
            controls.append(f"{state['description']} = {text}")
        return None


def render_markdown(nb, name: str, out_dir: str | Path) -> Path:
    """Write ``out_dir/name.md`` (and ``out_dir/name_files/*.png``) from an executed notebook.

    Widgets are drawn from the notebook's recorded widget state: the figures in their
    Output areas, the values of their controls; progress bars are left out.
    """
    out_dir = Path(out_dir)
    states = nb.get("metadata", {}).get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    page = _Page(name, out_dir, states)
    for old in sorted(page.files.glob("figure-*.png")) if page.files.is_dir() else []:
        old.unlink()   # a page written earlier may have had more figures
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            continue
        if cell.cell_type == "markdown":
            page.parts.append(cell.source + "\n")
            continue
        if cell.cell_type != "code":
            continue
        page.parts.append("```python\n" + cell.source.rstrip("\n") + "\n```\n")
        for out in cell.get("outputs", []):
            page.output(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(page.parts).replace(str(Path.home()), "~"))  # no local home dir in the pages
    return path


def render_notebooks(sources, out_dir: str | Path, *, quick: bool = True, timeout: int = 1800,
                     progress=print) -> dict:
    """Execute each notebook source and write its page; returns ``{name: facts}``."""
    import time

    done = {}
    for src in sources:
        src = Path(src)
        t0 = time.perf_counter()
        nb, facts = execute_notebook(src, quick=quick, timeout=timeout, extra_env=QUIET_ENV)
        page = render_markdown(nb, src.stem, out_dir)
        if facts:
            (Path(out_dir) / f"{src.stem}.facts.json").write_text(json.dumps(facts, indent=1, default=float) + "\n")
        done[src.stem] = facts
        if progress:
            progress(f"{src.name}: {time.perf_counter() - t0:.0f} s -> {page}")
    return done
