"""Every figure curvlens saves is big enough and its text readable when printed.

A journal page is about 7.2 in wide: a figure wider than that is scaled down, and
its fonts with it. Checked on every figure ``render_all`` draws (from hand-made
frames of four experts) and on the committed PNGs of ``figures/`` and of the
rendered notebook pages.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.text import Text

from curvlens.views import figure_style
from curvlens.views.figures import draw_figures
from tests.views.frames import CAPABILITIES, make_frames, tensors

ROOT = Path(__file__).resolve().parents[2]
PAGE_WIDTH_IN = 7.2       # a two-column journal page
MIN_FONT_PT = 6.0         # the smallest text drawn
MIN_PRINTED_PT = 5.0      # the smallest text once the figure is scaled to the page width
MIN_SIZE_IN = (3.0, 2.0)  # width, height
MAX_ASPECT = 4.0          # width / height


@pytest.fixture(scope="module")
def drawn():
    experts = ("math", "code", "instruct", "knowledge")
    frames = make_frames(experts=experts)
    shapes = {n: s for n, _, _, s in tensors()}
    out = []
    for stem, caption, takeaway, fig in draw_figures(frames, capability_map={e: CAPABILITIES[e] for e in experts},
                                                     shapes=shapes):
        with figure_style():
            fig.canvas.draw()
            box = fig.get_tightbbox(fig.canvas.get_renderer())
        texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        out.append((stem, box.width, box.height, min(t.get_fontsize() for t in texts), takeaway))
        plt.close(fig)
    return out


def test_every_figure_is_drawn_with_a_takeaway(drawn):
    assert len(drawn) >= 15
    assert all(t and t[-1] == "." for *_, t in drawn), [s for s, *_, t in drawn if not t]


def test_every_figure_has_a_minimum_size_and_a_sane_shape(drawn):
    bad = [(s, round(w, 1), round(h, 1)) for s, w, h, _, _ in drawn
           if w < MIN_SIZE_IN[0] or h < MIN_SIZE_IN[1] or w / h > MAX_ASPECT]
    assert not bad, bad


def test_every_figure_keeps_its_fonts_readable_on_a_page(drawn):
    bad = [(s, f, round(f * min(1.0, PAGE_WIDTH_IN / w), 1)) for s, w, h, f, _ in drawn
           if f < MIN_FONT_PT or f * min(1.0, PAGE_WIDTH_IN / w) < MIN_PRINTED_PT]
    assert not bad, bad


def _pngs(pattern):
    from PIL import Image

    return {p.relative_to(ROOT).as_posix(): Image.open(p).size for p in sorted(ROOT.glob(pattern))}


def test_the_committed_figures_have_a_minimum_size():
    sizes = _pngs("figures/*.png")   # saved at 200 dpi by `curvlens figures`
    assert sizes, "figures/ holds no PNG"
    bad = {p: s for p, s in sizes.items()
           if s[0] < MIN_SIZE_IN[0] * 200 or s[1] < MIN_SIZE_IN[1] * 200 or s[0] / s[1] > MAX_ASPECT}
    assert not bad, bad


def test_the_rendered_notebook_figures_are_not_strips():
    sizes = _pngs("docs/notebooks/*_files/*.png")   # the inline backend's 100 dpi
    bad = {p: s for p, s in sizes.items() if s[1] < 200 or s[0] / s[1] > MAX_ASPECT}
    assert not bad, bad
