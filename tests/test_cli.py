"""Every entry point through ``curvlens.cli.main([...])``: demo, merge, analyze,
figures, methods, on the quick zoo built once per session."""
import pandas as pd
import pytest
import yaml

from curvlens import Checkpoint
from curvlens.cli import main


@pytest.fixture
def cached(quick_zoo, monkeypatch):
    # the CLI finds the session's quick zoo through the cache the zoo reads
    monkeypatch.setenv("CURVLENS_CACHE", str(quick_zoo.root.parent))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return quick_zoo


def test_methods_lists_every_method_and_one_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for m in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "fisher", "ota",
              "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp", "nuslerp",
              "multislerp", "karcher", "sce", "arcee_fusion", "passthrough"):
        assert len(lines[m].split(None, 1)[1]) > 20  # one line on what it does
    assert main(["methods", "arcee_fusion"]) == 0
    assert "(no parameters)" in capsys.readouterr().out
    assert main(["methods", "ota"]) == 0
    out = capsys.readouterr().out
    assert "ffg_density" in out and "ties" not in out.split("ffg_density")[0].split("\n", 2)[-1]


def test_merge_from_yaml_writes_a_loadable_model_and_a_rerunnable_config(cached, tmp_path, capsys):
    zoo = cached
    cfg = tmp_path / "ota.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "ota", "base_model": str(zoo.base_dir),
        "models": [{"model": str(d)} for d in zoo.expert_dirs.values()],
        "parameters": {"ffg_density": 0.3, "epsilon": 1e-26, "fallback_to_base": True}, "dtype": "bfloat16"}))
    out = tmp_path / "merged"
    assert main(["merge", str(cfg), str(out), "--device", "cpu", "--quiet"]) == 0
    assert "merged 4 experts with ota" in capsys.readouterr().out
    ckpt = Checkpoint.open(out)
    assert set(ckpt) == set(Checkpoint.open(zoo.base_dir))
    assert {str(ckpt.dtype(n)) for n in ckpt} == {"torch.bfloat16"}
    report = pd.read_csv(out / "merge_report.csv")
    kept = [c for c in report.columns if c.startswith("kept_")]
    assert len(kept) == 4
    n = int(report.numel.sum())
    for c in kept:  # exactly the requested model-wide share: round(0.3 N) entries
        assert round((report[c] * report.numel).sum()) == int(0.3 * n + 0.5)
    again = tmp_path / "again"
    assert main(["merge", str(out / "curvlens_merge.yml"), str(again), "--device", "cpu", "--quiet"]) == 0


def test_analyze_writes_every_frame(cached, tmp_path, capsys):
    zoo = cached
    out = tmp_path / "analysis"
    args = ["analyze", *map(str, zoo.expert_dirs.values()), "--base", str(zoo.base_dir), "--out", str(out),
            "--densities", "0.1", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    assert "model-level curvature overlap" in capsys.readouterr().out
    frames = {p.stem: pd.read_csv(p) for p in out.glob("*.csv")}
    assert set(frames) == {"curvature_stats", "curvature_overlap", "mask_stats", "interference", "edit_norms",
                           "regime", "findings", "finding_intervals"}
    assert set(frames["mask_stats"].density) == {0.1}
    assert main(args) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    # the heads left out of every frame
    assert main(args + ["--overwrite", "--exclude", "role:lm_head", "embed_tokens"]) == 0
    for key, df in ((p.stem, pd.read_csv(p)) for p in out.glob("*.csv")):
        if "role" in df and key != "regime":
            assert not set(df.role) & {"lm_head", "embed"}, key
    out_text = capsys.readouterr().out
    assert "regime:" in out_text and "(c) the experts' curvature overlaps strongly" in out_text
    f = pd.read_csv(out / "findings.csv")
    # without scores, (a) and (d) are not measured; (b) and (c) are decided
    assert list(f.verdict[[0, 3]]) == ["not measured"] * 2 and "not measured" not in set(f.verdict[[1, 2]])
    # --no-ranks: the same frame but the singular-value columns
    assert main(args + ["--overwrite", "--no-ranks"]) == 0
    ms = pd.read_csv(out / "mask_stats.csv")
    assert ms["mask_rank"].isna().all() and set(ms["rank_method"]) <= {"skipped", "none"}
    assert ms["kept_frac"].notna().all()


def test_demo_quick_and_figures(cached, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "accuracy per capability" in text and "report.html" in text
    table = pd.read_csv(out / "merge_table.csv")
    assert {"base", "expert", "ota"} <= set(table.method)
    assert (out / "report.html").stat().st_size > 10_000
    # the findings: printed, computed into a frame, and the report's first section
    assert "findings (the paper's claims" in text and "regime:" in text
    f = pd.read_csv(out / "findings.csv")
    assert list(f.claim) == ["a", "b", "c", "d"]
    # the demo measures every claim; a verdict is stated where the intervals decide it
    assert set(f.verdict) <= {"holds", "partly", "does not hold", "undecided"}
    iv = pd.read_csv(out / "finding_intervals.csv")
    assert set(iv.claim) == {"a", "b", "c", "d"} and (iv.low <= iv.high).all()
    assert set(iv.outcome) <= {"yes", "no", "undecided"}
    # each verdict follows from its comparisons: a decided one has no undecided comparison it depends on
    for claim, verdict in zip(f.claim, f.verdict):
        outcomes = set(iv[iv.claim == claim].outcome)
        if verdict == "holds":
            assert outcomes <= {"yes"}, claim
    page = (out / "report.html").read_text()
    assert page.index(">Findings<") < page.index(">Regime<") < page.index(">The zoo<")
    regime = page[page.index(">Regime<"):page.index(">The zoo<")]
    # expert, role, pair, capability, merge: each its own columns
    assert regime.count("<table") == 5 and "NaN" not in regime
    zoo_part = page[page.index(">The zoo<"):page.index(">Scores<")]
    assert "Experts(" not in zoo_part and str(cached.root.parent) not in zoo_part
    assert "Adam exp_avg_sq (export/exp_avg_sq.safetensors)" in zoo_part
    figs = tmp_path / "figs"
    assert main(["figures", "--quick", "--out", str(figs), "--formats", "png", "--device", "cpu", "--quiet"]) == 0
    written = sorted(p.name for p in figs.glob("*.png"))
    assert written and (figs / "README.md").is_file()
    readme = (figs / "README.md").read_text()
    assert all(name in readme for name in written)
    # the zoo is named, every figure has a computed takeaway, the mask figures their random baseline
    assert "Data: the quick demo zoo" in readme and readme.count("*Takeaway:*") == len(written)
    assert "mask_structure_fisher.png" in written and "TIES (density 0.5)" in readme


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "missing.yml"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvlens: error:") and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_python_dash_m_curvlens_runs_the_cli():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "curvlens", "methods", "passthrough"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("passthrough:") and "scale" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "curvlens", "merge", "no-such.yml", "out"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no-such.yml" in proc.stderr


@pytest.mark.parametrize("command", ["demo", "merge", "figures", "analyze"])
def test_runtime_options_are_shared_by_the_subcommands_that_run_passes(command):
    from curvlens.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices[command]
    options = {s for a in sub._actions for s in a.option_strings}
    assert {"--device", "--quiet", "--threads"} <= options
