"""``curvlens fisher | soup | sweep | front | sparse-soup`` on the quick zoo: the
frames and figures they write, what they write agreeing with the library, and
bad input as one line with exit status 2 and nothing written."""
import json

import pandas as pd
import pytest
import torch

import curvlens as cl
from curvlens.cli import main
from curvlens.io.token_data import padded_batches, read_token_jsonl
from tests.passes.test_sparse_soup import _sparse_experts


@pytest.fixture
def cached(quick_zoo, monkeypatch):
    # the CLI finds the session's quick zoo through the cache the zoo reads
    monkeypatch.setenv("CURVLENS_CACHE", str(quick_zoo.root.parent))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return quick_zoo


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("curvlens: error:") and err.count("\n") == 1, err
    return err


def _token_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def fishers(quick_zoo, tmp_path_factory):
    """``curvlens fisher`` of two experts on a few token-id examples."""
    root = tmp_path_factory.mktemp("fishers")
    data = _token_file(root / "ids.jsonl", [{"input_ids": [1 + (i * 7 + j) % 20 for j in range(4 + i)]}
                                            for i in range(6)])
    outs = {}
    for name in ("math", "knowledge"):
        outs[name] = root / f"fisher-{name}"
        assert main(["fisher", str(quick_zoo.expert_dirs[name]), "--data", str(data), "--out", str(outs[name]),
                     "--batch-size", "4", "--device", "cpu", "--quiet"]) == 0
    return data, outs


def test_fisher_writes_the_moments_layout_stats_and_figures(cached, fishers):
    data, outs = fishers
    out = outs["math"]
    assert {p.name for p in out.iterdir()} == {"export", "fisher_info.json", "fisher_stats.csv",
                                               "fisher_heatmap.png", "fisher_heatmap.html"}
    info = json.loads((out / "fisher_info.json").read_text())
    assert info["kind"] == "empirical_fisher" and info["n_examples"] == "6" and info["data"] == str(data)
    # the same as the library on the same padded batches
    want = cl.estimate_fisher(cached.expert_dirs["math"], padded_batches(read_token_jsonl(data), 4),
                              chunk_size=4, device="cpu", progress=False)
    got = cl.Moments.open(out)
    assert got.metadata["kind"] == "empirical_fisher" and set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    stats = pd.read_csv(out / "fisher_stats.csv")
    assert set(stats.name) == set(want) and stats.mean_log10.notna().all()
    assert b"Plotly.newPlot" in (out / "fisher_heatmap.html").read_bytes()


def test_fisher_of_text_lines_uses_the_models_tokenizer(cached, tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text("add 12+34=\n\nrev abc=\nhello\n")
    out = tmp_path / "f"
    assert main(["fisher", str(cached.expert_dirs["code"]), "--data", str(text), "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    assert json.loads((out / "fisher_info.json").read_text())["n_examples"] == "3"  # the blank line skipped


@pytest.mark.parametrize("rows, match", [
    ([{"input_ids": []}], "non-empty list of token ids"),
    ([{"input_ids": [1, 2], "labels": [1]}], "'labels' has 1 entries"),
    ([{"input_ids": [1, 10**6]}], r"token id 1000000; expected 0 <= id < \d+ \(the model's vocab_size\)"),
    ([{"input_ids": [1], "attention": [1]}], r"unknown key\(s\) \['attention'\]"),
    ("not json\n", "not a JSON object"),
])
def test_fisher_bad_data_is_one_line(cached, tmp_path, capsys, rows, match):
    data = tmp_path / "d.jsonl"
    data.write_text(rows) if isinstance(rows, str) else _token_file(data, rows)
    assert main(["fisher", str(cached.expert_dirs["math"]), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--quiet"]) == 2
    import re

    assert re.search(match, _err(capsys)) and not (tmp_path / "o").exists()


def test_fisher_never_writes_into_its_model(cached, fishers, capsys):
    data, _ = fishers
    model = cached.expert_dirs["math"]
    assert main(["fisher", str(model), "--data", str(data), "--out", str(model / "fisher"), "--quiet"]) == 2
    assert "lies inside the input" in _err(capsys) and not (model / "fisher").exists()


def test_soup_writes_its_curve_figures_and_model(cached, tmp_path, capsys):
    out = tmp_path / "soup"
    experts = [str(cached.expert_dirs[n]) for n in ("math", "knowledge")]
    assert main(["soup", *experts, "--zoo", "quick", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    curve = pd.read_csv(out / "curve.csv")
    assert list(curve.phase) == ["rank", "rank", "soup", "soup"] and set(curve.candidate) == {"math", "knowledge"}
    assert set(curve.columns) >= set(cached.capabilities.values())
    assert (out / "soup_curve.png").stat().st_size > 0 and b"Plotly.newPlot" in (out / "soup_curve.html").read_bytes()
    kept = list(curve[curve.phase == "soup"].query("kept").candidate)
    assert f"greedy soup (mean): {' + '.join(kept)}" in capsys.readouterr().out
    soup = cl.Checkpoint.open(out / "model")
    # the soup of the kept experts is their plain average
    name = "model.layers.0.mlp.up_proj.weight"
    parts = [cl.Checkpoint.open(cached.expert_dirs[k])[name] for k in kept]
    torch.testing.assert_close(soup[name], sum(parts) / len(parts))
    # the output may not lie inside an input: exit 2, one line, nothing there
    inside = cached.expert_dirs["math"] / "soup"
    assert main(["soup", *experts, "--zoo", "quick", "--out", str(inside), "--quiet"]) == 2
    assert "lies inside the input" in _err(capsys) and not inside.exists()


def test_sweep_product_grid_and_grid_file(cached, tmp_path, capsys):
    base, experts = str(cached.base_dir), [str(cached.expert_dirs[n]) for n in ("math", "code")]
    out = tmp_path / "sweep"
    assert main(["sweep", *experts, "--base", base, "--zoo", "quick", "--method", "ties",
                 "--param", "density=[0.3, 0.7]", "--param", "lambda=1.0", "--no-moments", "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    df = pd.read_csv(out / "sweep.csv")
    assert sorted(df.density.unique()) == [0.3, 0.7] and (df.status == "ok").all()
    wide = pd.read_csv(out / "scores.csv")
    assert len(wide) == 2 and set(cached.capabilities.values()) <= set(wide.columns)
    assert {"sweep_scores.png", "sweep_scores.html"} <= {p.name for p in out.iterdir()}
    grid = tmp_path / "grid.yml"
    grid.write_text("- {method: linear, label: avg}\n- {method: ota, ffg_density: 0.3, fallback_to_base: true}\n")
    assert main(["sweep", *experts, "--base", base, "--zoo", "quick", "--grid", str(grid), "--keep",
                 "--out", str(tmp_path / "g"), "--device", "cpu", "--quiet"]) == 0
    df = pd.read_csv(tmp_path / "g" / "sweep.csv")
    assert list(df.drop_duplicates("job").label)[0] == "avg" and (df.status == "ok").all()
    kept = df.model_dir.unique()
    assert all(str(tmp_path / "g" / "models") in d and cl.Checkpoint.open(d).keys() for d in kept)
    capsys.readouterr()
    for args, match in ((["--method", "ties", "--param", "density"], "expected NAME=VALUE"),
                        (["--method", "ties", "--grid", str(grid)], "not both"),
                        (["--grid", str(tmp_path / "missing.yml")], "cannot read a YAML list")):
        assert main(["sweep", *experts, "--base", base, "--zoo", "quick", *args, "--out", str(tmp_path / "x"),
                     "--quiet"]) == 2
        assert match in _err(capsys)


def test_front_from_the_curvature_alone_and_from_a_data_fisher(cached, fishers, tmp_path, capsys):
    base, experts = str(cached.base_dir), [str(cached.expert_dirs[n]) for n in ("math", "knowledge")]
    out = tmp_path / "front"
    assert main(["front", *experts, "--base", base, "--dense", "200", "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    dense, front = pd.read_csv(out / "dense.csv"), pd.read_csv(out / "front.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predictor"] == "curvature" and summary["n_evaluations"] == 0
    assert summary["n_front"] == len(front) == int(dense.on_front.sum()) > 0
    assert {"front.png", "front.html"} <= {p.name for p in out.iterdir()}
    # a Fisher from `curvlens fisher` as the curvature, and a rank check on the zoo
    _, outs = fishers
    out = tmp_path / "front-fisher"
    assert main(["front", *experts, "--base", base, "--moments", str(outs["math"]), str(outs["knowledge"]),
                 "--predictor", "curvature", "--zoo", "quick", "--samples", "3", "--checks", "1", "--dense", "200",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    agreement = pd.read_csv(out / "agreement.csv").set_index("objective")["metric"]
    assert agreement.to_dict() == {"loss_math": "addition", "loss_knowledge": "facts"}
    assert len(pd.read_csv(out / "evaluated.csv")) == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # a usage error: argparse's exit, one line too
        main(["front", *experts, "--out", str(tmp_path / "x"), "--quiet"])
    assert info.value.code == 2 and "required: --base" in _err(capsys)


def test_sparse_soup_writes_the_model_or_names_the_tensors(tmp_path, capsys):
    masks, dirs, weights = _sparse_experts(tmp_path / "agree")
    out = tmp_path / "soup"
    assert main(["sparse-soup", *map(str, dirs), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    soup = cl.Checkpoint.open(out)
    for k, m in masks.items():
        assert torch.equal(soup[k] != 0, m)
    assert pd.read_csv(out / "sparsity_report.csv")["agree"].all()
    _, bad, _ = _sparse_experts(tmp_path / "disagree", disagree=True)
    assert main(["sparse-soup", *map(str, bad), "--out", str(tmp_path / "no"), "--quiet"]) == 2
    assert "b.weight" in _err(capsys) and not (tmp_path / "no").exists()


@pytest.mark.parametrize("command", ["fisher", "soup", "sweep", "front", "sparse-soup"])
def test_every_study_shares_the_runtime_and_output_options(command):
    from curvlens.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices[command]
    options = {s for a in sub._actions for s in a.option_strings}
    assert {"--device", "--quiet", "--threads", "--out", "--overwrite"} <= options
