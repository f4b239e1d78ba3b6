"""report.html: self-contained, valid, and rendering its plotly figures in a real browser."""
import shutil

import pandas as pd
import pytest

from curvlens.views.merges import merge_scores_figure
from curvlens.views.report import figure_html, table_html, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def table():
    rows = [(m, c, a) for m, accs in {"base": (0.1, 0.0), "expert: math": (0.9, 0.2),
                                      "OTA+FFG": (0.7, 0.6)}.items()
            for c, a in zip(["math", "facts"], accs)]
    return pd.DataFrame(rows, columns=["model", "capability", "accuracy"])


def report(tmp_path):
    fig = merge_scores_figure(table())
    sections = [("Scores", table_html(table().pivot(index="model", columns="capability", values="accuracy"),
                                      "accuracy <held-out>") + figure_html(fig, first=True)),
                ("Again", figure_html(fig, first=False))]
    return write_report(tmp_path / "report.html", sections, title="t & t")


def test_table_caption_and_escaping():
    html = table_html(pd.DataFrame({"a": [0.12345]}), "x < y")
    assert html.startswith('<table class="dataframe">') and "<caption>x &lt; y</caption>" in html
    assert "0.123" in html and "0.1234" not in html


def test_report_is_self_contained(tmp_path):
    text = report(tmp_path).read_text()
    assert text.count("<h2>") == 2 and "<title>t &amp; t</title>" in text
    assert "<script src=" not in text  # plotly.js inlined, nothing fetched
    assert text.count("Plotly.newPlot") == 2
    assert len(text) > 1_000_000  # the inlined library, once


def test_merge_scores_figure_data():
    fig = merge_scores_figure(table())
    assert [t.name for t in fig.data] == ["base", "expert: math", "OTA+FFG"]
    assert list(fig.data[2].y) == [0.7, 0.6] and list(fig.data[2].x) == ["math", "facts"]
    assert fig.data[2].customdata[0][0] == "OTA+FFG" and "customdata[0]" in fig.data[2].hovertemplate
    assert fig.layout.yaxis.title.text == "exact-match accuracy"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    path = report(tmp_path)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_selector(".plotly .main-svg", timeout=20_000)
        n_plots = page.locator(".js-plotly-plot").count()
        n_bars = page.locator(".js-plotly-plot").first.locator("g.point").count()
        browser.close()
    assert errors == []
    assert n_plots == 2
    assert n_bars == 6  # 3 models x 2 capabilities drawn as bars
