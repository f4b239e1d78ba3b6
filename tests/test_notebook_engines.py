"""Both notebook engines (nbclient in process, the `jupyter nbconvert --execute` command)
run a notebook with a slider figure, record its figure in the widget state, and read
back the same FACTS; and no notebook captures output into an Output widget, which
stalled nbconvert's Output-widget mimic until the cell timeout."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SLIDER_NOTEBOOK = '''# %% tags=["parameters"]
QUICK = True

# %%
# %matplotlib inline
import ipywidgets as widgets
import matplotlib.pyplot as plt

import curvlens as cl

FACTS = {}


def draw(n=3):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(range(n))
    FACTS["drawn"] = FACTS.get("drawn", 0) + 1
    return fig


box = cl.views.figure_sliders(draw, n=widgets.IntSlider(value=3, min=1, max=9, description="points"))
box.controls["n"].value = 5
FACTS["quick"] = QUICK
box
'''


@pytest.mark.parametrize("engine", ["nbclient", "nbconvert"])
def test_engines_record_the_slider_figure_and_the_facts(engine, tmp_path):
    pytest.importorskip("jupytext")
    from curvlens.notebooks import execute_notebook, render_markdown

    src = tmp_path / "00_slider.py"
    src.write_text(SLIDER_NOTEBOOK)
    nb, facts = execute_notebook(src, quick=False, cwd=tmp_path, timeout=120, engine=engine)
    assert facts == {"drawn": 2, "quick": False}
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    outputs = [s["state"]["outputs"] for s in states.values() if s["model_name"] == "OutputModel"]
    assert any("image/png" in o["data"] for outs in outputs for o in outs)   # the figure, as widget state
    text = render_markdown(nb, "00_slider", tmp_path / "pages").read_text()
    assert "points = 5" in text and "(00_slider_files/figure-01.png)" in text


def test_no_notebook_captures_output_into_a_widget():
    bad = {}
    for src in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        hits = re.findall(r"widgets\.interactive\(|\binteract\(|interact_manual\(|with [a-z_.]*out[a-z_]*:",
                          src.read_text())
        if hits:
            bad[src.name] = hits
    assert not bad, f"use cl.views.figure_sliders (output capture stalls nbconvert): {bad}"
