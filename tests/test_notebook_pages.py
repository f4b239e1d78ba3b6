"""curvlens.notebooks: the rendered page of an executed notebook (no kernel needed here)."""
from __future__ import annotations

import base64

import nbformat

from curvlens.cli import build_parser
from curvlens.notebooks import render_markdown

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 16).decode()


def test_page_keeps_text_tables_figures_and_names_widgets(tmp_path):
    nb = nbformat.v4.new_notebook()
    inj = nbformat.v4.new_code_cell("QUICK = True")
    inj.metadata["tags"] = ["injected-parameters"]
    code = nbformat.v4.new_code_cell("x = 1")
    code.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="hello\n"),
        nbformat.v4.new_output("stream", name="stderr", text="FutureWarning: noise\n"),
        nbformat.v4.new_output("display_data", data={"text/markdown": "**computed** 0.5"}),
        nbformat.v4.new_output("display_data", data={"image/png": PNG}),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "a"},
                                                     "text/plain": "interactive(...)"}),
        nbformat.v4.new_output("execute_result", data={"text/html": "<table><tr><td>1</td></tr></table>",
                                                       "text/plain": "df"}, execution_count=1),
    ]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), inj, code]
    (tmp_path / "00_demo_files").mkdir()
    (tmp_path / "00_demo_files" / "figure-07.png").write_bytes(b"stale")   # from an earlier, longer page
    page = render_markdown(nb, "00_demo", tmp_path)
    assert sorted(p.name for p in (tmp_path / "00_demo_files").iterdir()) == ["figure-01.png"]
    text = page.read_text()
    assert text.startswith("# Title") and "QUICK = True" not in text
    assert "hello" in text and "FutureWarning" not in text and "**computed** 0.5" in text and "<table>" in text
    assert "(00_demo_files/figure-01.png)" in text and (tmp_path / "00_demo_files" / "figure-01.png").exists()
    assert "interactive widget" in text and "interactive(...)" not in text


def _state(name, **state):
    return {"model_name": name, "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
            "state": state}


def test_page_draws_widgets_from_their_recorded_state(tmp_path):
    """Sliders and explorers show their figure (and control values) on the page; a
    progress bar shows nothing; a widget without recorded state is named."""
    nb = nbformat.v4.new_notebook()
    states = {
        "box": _state("VBoxModel", children=["IPY_MODEL_s", "IPY_MODEL_out"]),
        "s": _state("FloatSliderModel", value=0.5, description="alpha"),
        "out": _state("OutputModel", outputs=[{"output_type": "display_data", "data": {"image/png": PNG}}]),
        "bar": _state("HBoxModel", children=["IPY_MODEL_t", "IPY_MODEL_p"]),
        "t": _state("HTMLModel", value="Loading weights: 100%"),
        "p": _state("FloatProgressModel", value=1.0, description=""),
    }
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": states}}

    def view(mid):
        return nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": mid}, "text/plain": "VBox(...)"})

    code = nbformat.v4.new_code_cell("x = 1")
    code.outputs = [view("bar"), view("box"), view("gone")]
    nb.cells = [code]
    text = render_markdown(nb, "00_w", tmp_path).read_text()
    assert "alpha = 0.5" in text and "(00_w_files/figure-01.png)" in text
    assert "Loading weights" not in text
    assert text.count("interactive widget") == 1   # only the one without state


def test_cli_has_the_notebooks_command():
    a = build_parser().parse_args(["notebooks", "06", "--out", "x"])
    assert a.which == ["06"] and str(a.out) == "x" and not a.full
