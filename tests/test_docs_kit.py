"""The lecturer's kit: every paper cited is in docs/references.md with its arXiv id,
every reference listed there is used somewhere, the glossary defines the words the
pages use, and notebook 06 has learning goals and exercises with solutions."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")


def _text(paths):
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in paths}


def cited_outside_the_kit() -> dict[str, set[str]]:
    """arXiv id -> the files (notebooks, docs, README, package) citing it."""
    files = _text([ROOT / "README.md", *ROOT.glob("notebooks/*.py"), *ROOT.glob("docs/*.md"),
                   *ROOT.glob("curvlens/**/*.py")])
    out: dict[str, set[str]] = {}
    for name, text in files.items():
        if name in ("docs/references.md", "docs/glossary.md"):
            continue
        for aid in ARXIV.findall(text):
            out.setdefault(aid, set()).add(name)
    return out


def test_every_cited_paper_is_in_the_references_and_every_reference_is_cited():
    listed = set(ARXIV.findall((ROOT / "docs" / "references.md").read_text()))
    cited = cited_outside_the_kit()
    assert set(cited) <= listed, f"cited but not in docs/references.md: {sorted(set(cited) - listed)}"
    assert listed <= set(cited), f"in docs/references.md but cited nowhere: {sorted(listed - set(cited))}"
    # the papers the issue names, by id: OTA/FFG, Fisher merging, task arithmetic, TIES, DARE, soups, MAP,
    # sparse soups, Adafactor, the empirical-Fisher caveats
    assert {"2509.11167", "2111.09832", "2212.04089", "2306.01708", "2311.03099", "2203.05482", "2406.07529",
            "2306.16788", "1804.04235", "1905.12558"} <= listed
    assert "Optimal Brain Damage" in (ROOT / "docs" / "references.md").read_text()


def test_every_notebook_cites_with_ids():
    for nb in sorted(ROOT.glob("notebooks/[0-9][0-9]_*.py")):
        text = nb.read_text()
        if nb.stem.startswith(("01", "02", "03", "04", "05", "06", "07", "08", "09")):
            assert ARXIV.search(text) or "references.md" in text, nb.name
        assert "et al.)" not in text, f"{nb.name}: a citation without year or id"


def test_the_glossary_defines_the_words_the_pages_use():
    text = (ROOT / "docs" / "glossary.md").read_text().lower()
    defined = " | ".join(re.findall(r"\*{1,2}([^*]+)\*{1,2}", text))   # the bold / italic headwords
    for term in ("task vector", "saliency", "retention", "gain over the base", "relative edit", "regime",
                 "normalise", "density", "empirical fisher", "curvature overlap", "chance level", "pareto front"):
        assert re.search(rf"\b{term}\b", defined), term


def test_the_readme_links_the_kit():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/references.md)" in readme and "(docs/glossary.md)" in readme


def test_notebook_06_has_learning_goals_and_exercises_with_solutions():
    text = (ROOT / "notebooks" / "06_teaching.py").read_text()
    assert "**Learning goals.**" in text
    exercises = re.findall(r"\*\*Exercise (\d)", text)
    assert len(exercises) >= 2 and text.count("*Solution.*") == len(exercises)
