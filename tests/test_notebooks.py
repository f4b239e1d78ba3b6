"""Every notebook runs top to bottom on the quick zoo, and its .ipynb matches its .py source.

The jupytext percent-format ``notebooks/NN_name.py`` is the one source of truth
(reviewable as text); the paired ``.ipynb`` is generated from it without outputs
(``jupytext --sync notebooks/*.py``). Execution uses nbclient on the .py source,
with the parameter cell's ``QUICK`` forced to True.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks():
    assert len(SOURCES) >= 7, [s.name for s in SOURCES]


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_in_sync_and_clean(src):
    jupytext = pytest.importorskip("jupytext")
    ipynb = src.with_suffix(".ipynb")
    assert ipynb.exists(), f"run: jupytext --sync {src.relative_to(ROOT)}"
    from_py = jupytext.read(src)
    committed = jupytext.read(ipynb)
    assert [c.source for c in committed.cells] == [c.source for c in from_py.cells], \
        f"{ipynb.name} differs from its source; run: jupytext --sync {src.relative_to(ROOT)}"
    for cell in committed.cells:
        assert not cell.get("outputs"), f"{ipynb.name} is committed with outputs"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_executes(src, quick_zoo, tmp_path):
    jupytext = pytest.importorskip("jupytext")
    from nbclient import NotebookClient

    nb = jupytext.read(src)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert params, f"{src.name} has no cell tagged 'parameters'"
    # the session's quick zoo cache, so notebooks reuse it instead of rebuilding
    env_cell = jupytext.reads(
        "# %%\nimport os\n"
        f"os.environ['CURVLENS_CACHE'] = {str(quick_zoo.root.parent)!r}\n"
        "os.environ['TQDM_DISABLE'] = '1'\nQUICK = True\n", fmt="py:percent").cells[0]
    nb.cells.insert(nb.cells.index(params[0]) + 1, env_cell)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    # No front-end mimic of ipywidgets.Output: nbclient's mimic (nbclient 0.11) sends
    # comm messages on the shell socket while it awaits the execute reply on that same
    # socket, and the reply then goes unnoticed until the cell timeout: every cell that
    # displays into an Output widget (the explorers, interact) took the full 600 s.
    # Without it the widget's outputs simply land in the cell's outputs.
    client.widget_registry = {}
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
