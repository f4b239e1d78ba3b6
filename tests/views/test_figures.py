import re

import pytest

from curvlens.errors import CurvlensError
from curvlens.views import render_all
from curvlens.views.figures import FRAME_KEYS
from tests.views.frames import tensors

SHAPES = {name: shape for name, _, _, shape in tensors()}


def readme_files(out):
    """The files the README's bullets list, in order (a bullet per figure: its files, caption, takeaway)."""
    text = (out / "README.md").read_text()
    return [n for line in re.findall(r"^- (`[^:]+): \S", text, flags=re.M) for n in re.findall(r"`([^`]+)`", line)]


def test_render_all_writes_every_figure_and_a_readme_listing_exactly_them(frames,
                                                                          capability_map,
                                                                          tmp_path):
    written = render_all(frames, tmp_path / "figs", formats=("png",), capability_map=capability_map,
                         shapes=SHAPES, source="hand-made test frames", dpi=30)
    out = tmp_path / "figs"
    names = [p.name for p in written]
    assert readme_files(out) == names
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["README.md"])
    stems = {n[:-4] for n in names}
    assert {"curvature_median_log10", "overlap_pairs", "mask_kept_frac_fisher",
            "mask_kept_frac_magnitude", "interference_pairs", "graft_density_curves",
            "moments_pair_grid", "log10_v_histograms", "merge_scores",
            "merge_relative_scores", "mask_structure_fisher"} <= stems
    text = (out / "README.md").read_text()
    assert "Data: hand-made test frames." in text
    assert text.count("*Takeaway:*") == len(stems)   # one computed takeaway per figure
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_all_is_deterministic_and_writes_each_format(frames, tmp_path):
    subset = {k: frames[k] for k in ("merge_table", "mask_overlap")}
    a = render_all(subset, tmp_path / "a", formats=("pdf", "png"), dpi=40)
    b = render_all(subset, tmp_path / "b", formats=("pdf", "png"), dpi=40)
    assert [p.name for p in a] == ["mask_overlap_pairs.pdf", "mask_overlap_pairs.png",
                                   "merge_scores.pdf", "merge_scores.png"]
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes(), x.name
    assert readme_files(tmp_path / "a") == [p.name for p in a]
    assert "density 0.3" in (tmp_path / "a" / "README.md").read_text()


def test_render_all_rejects_bad_input(frames, tmp_path):
    with pytest.raises(CurvlensError, match="unknown frames \\['merge'\\]"):
        render_all({"merge": frames["merge_table"]}, tmp_path)
    with pytest.raises(CurvlensError, match="formats='gif'"):
        render_all({"merge_table": frames["merge_table"]}, tmp_path, formats=("gif",))
    bad = frames["graft_sweep"].drop(columns="score")
    with pytest.raises(CurvlensError, match="graft_density_curves.*graft_sweep.*score"):
        render_all({"merge_table": frames["merge_table"], "graft_sweep": bad}, tmp_path / "x",
                   formats=("png",))
    assert list((tmp_path / "x").iterdir()) == []   # nothing half-written
    assert set(FRAME_KEYS) >= set(frames)
