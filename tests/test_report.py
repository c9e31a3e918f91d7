"""Figures of a scan (``coupling report``) and of a checkpoint series.

Two kinds of input: a real scan of a tiny random GPT-2 (with a WordLevel tokenizer trained
here) and its random-init sibling, and scan directories fabricated in the documented layout
with known arrays, so a figure's plotted data can be checked against the numbers written.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from coupling.cli import add_report_parser
from coupling.figures import report, training
from coupling.figures.common import AXIS_L, AXIS_LP, CBAR_LABEL, band, color_limits, model_label
from coupling.figures.depth import depth_coupling_figure
from coupling.figures.layers import layer_curves_figure, layer_matrix
from coupling.figures.report import draw_figures
from coupling.figures.scans import find_sibling, load_scan, prompt_index
from coupling.figures.training import adjacency_weights, draw_training_figures

SCAN_PNGS = ["depth_coupling.png", "token_coupling.png", "layer_curves.png",
             "pca_trajectories.png", "singular_values.png"]


# ------------------------------------------------------------------ PNG checks
def png_dpi(data: bytes) -> float:
    """Resolution from the PNG ``pHYs`` chunk (pixels per metre -> dots per inch)."""
    pos = 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"pHYs":
            ppm_x, _, unit = struct.unpack(">IIB", data[pos + 8:pos + 17])
            assert unit == 1, "pHYs unit is not the metre"
            return ppm_x * 0.0254
        pos += 12 + length
    raise AssertionError("PNG has no pHYs chunk")


def assert_png(path: Path, min_px: int = 300):
    """A real PNG, >= 100 dpi, large, and not blank (many colours, ink on the page)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert png_dpi(data) >= 99.9
    img = imread(path)
    h, w = img.shape[:2]
    assert min(h, w) >= min_px, f"{path} is only {w}x{h}"
    rgb = (img[..., :3].reshape(-1, 3) * 255).astype(np.int64)
    colours = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
    assert len(colours) > 50, f"{path} has only {len(colours)} colours"
    assert (rgb < 230).any(axis=1).mean() > 0.02, f"{path} is nearly blank"


# ------------------------------------------------------------------ a real scan
def make_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(
        special_tokens=["[UNK]"], vocab_size=128))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def real_scans(tmp_path_factory):
    """(trained-weights scan, random-init sibling) of a 3-layer random GPT-2, d=32."""
    from coupling.model.zoo import save_random
    from coupling.prompts.sources import load_prompts
    from coupling.scan import scan

    root = tmp_path_factory.mktemp("real")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        tok = make_tokenizer([p.text for p in load_prompts("builtin")])
        folder = save_random("gpt2", root / "gpt2-tiny", tokenizer=tok, n_layers=3, vocab=128)
        common = dict(prompts="builtin", max_prompts=3, k=4, max_tokens=6, figures=False,
                      progress=False)
        scan(model=folder, measures="depth,tokens,regularity", out=str(root / "runs" / "trained"),
             **common)
        common["figures"] = True        # scan() draws the report itself at the end
        scan(model=folder, measures="depth,regularity", random_init=True, init_seed=1,
             out=str(root / "runs" / "random"), **common)
    return root / "runs" / "trained", root / "runs" / "random"



def test_real_scan_draws_every_figure(real_scans):
    trained, _ = real_scans
    written = draw_figures(trained, compare=False)
    assert [p.name for p in written] == SCAN_PNGS + ["summary.txt"]
    for p in written[:-1]:
        assert p.parent == trained / "figures"
        assert_png(p)
    text = (trained / "figures" / "summary.txt").read_text()
    s = pd.read_parquet(trained / "summary.parquet")
    m = s["depth_mis_coupling_mean"]
    assert "gpt2-tiny" in text and "3 from builtin" in text
    assert f"{m.mean():.4f} +/- {m.std(ddof=1):.4f}" in text
    assert f"{s['lss'].mean():.4f}" in text and f"{s['expodistance'].mean():.4f}" in text
    assert "compared with" not in text


def test_sibling_at_other_random_init_is_compared(real_scans):
    trained, random = real_scans
    assert find_sibling(trained, load_scan(trained).manifest) == random.resolve()
    assert find_sibling(random, load_scan(random).manifest) == trained.resolve()
    # scan() drew the random scan's report itself, finding its trained sibling (no token-wise
    # coupling was measured there, so no token figure)
    drawn = sorted(p.name for p in (random / "figures").iterdir())
    assert drawn == ["depth_coupling.png", "layer_curves.png", "pca_trajectories.png",
                     "singular_values.png", "summary.txt"]
    for name in drawn[:-1]:
        assert_png(random / "figures" / name)
    text = (random / "figures" / "summary.txt").read_text()
    assert "gpt2-tiny (random init)" in text and f"compared with {trained.resolve()}" in text
    # the depth figure puts trained left, random right, on one colour scale
    scans = report._ordered(load_scan(random), load_scan(trained))
    fig = depth_coupling_figure(scans, "capital_france")
    heat = [ax for ax in fig.axes if ax.images]
    assert len(heat) == 4
    assert "random init" not in heat[0].get_title() and "random init" in heat[1].get_title()
    assert len({(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in heat}) == 1
    shown = [ax.images[0].get_array().filled(np.nan) for ax in heat]
    assert (heat[0].images[0].norm.vmin, heat[0].images[0].norm.vmax) == \
        pytest.approx(color_limits(shown))
    row = list(scans[0].summary["prompt_id"]).index("capital_france")
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(shown[0][off], scans[0].depth["normalized"][row][off], rtol=1e-6)


# ------------------------------------------------------------------ fabricated scans
def fake_scan(folder: Path, L: int = 4, P: int = 3, n: int = 5, K: int = 3, seed: int = 0,
              model_id: str = "org/fake-model", random_init: bool = False, tokens=True,
              pca=True, depth=True, layers=True, revision=None) -> Path:
    """A scan output directory in the documented layout, with reproducible random values."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    ids = [f"p{i}" for i in range(P)]
    n_tok = np.array([n - (i % 2) for i in range(P)])
    grids = rng.uniform(0.3, 0.9, (P, L, L))
    for g in grids:
        np.fill_diagonal(g, 0.0)
    off = ~np.eye(L, dtype=bool)
    summary = pd.DataFrame({
        "prompt_id": ids, "n_tokens": n_tok,
        "depth_mis_coupling_mean": [g[off].mean() for g in grids] if depth else np.nan,
        "depth_mis_coupling_raw_mean": rng.uniform(1, 2, P),
        "lss": rng.uniform(1.5, 5, P), "lss_last": rng.uniform(1.5, 5, P),
        "expodistance": rng.uniform(0, 1, P), "equidistance_cv": rng.uniform(0, 1, P)})
    summary.to_parquet(folder / "summary.parquet", index=False)
    rows = []
    for i, pid in enumerate(ids):
        norm = np.exp(np.linspace(0, 3, L + 1)) * (1 + 0.1 * i)
        win = rng.uniform(1, 3, L + 1) if L + 1 >= 11 else np.full(L + 1, np.nan)
        for l in range(L + 1):
            rows.append({"prompt_id": pid, "layer": l, "norm": norm[l], "norm_mean_tokens": norm[l],
                         "step": np.nan if l == 0 else norm[l] - norm[l - 1],
                         "windowed_lss": win[l], "entropy": 5.0 - l * 0.1 - i,
                         "entropy_mean_tokens": 5.0})
    (pd.DataFrame(rows) if layers else pd.DataFrame()).to_parquet(folder / "layers.parquet",
                                                                  index=False)
    sv = np.sort(rng.uniform(0.1, 30, (P, L, K)), axis=-1)[..., ::-1]
    if depth:
        np.savez(folder / "depth_coupling.npz", prompt_ids=np.array(ids), normalized=grids,
                 raw=grids * 3, singular_values=sv)
    n_max = int(n_tok.max())
    if tokens:
        maps = {}
        for name in ("self", "fixed_input", "fixed_output"):
            a = np.full((P, n_max, n_max), np.nan, np.float32)
            for i, m in enumerate(n_tok):
                a[i, :m, :m] = rng.uniform(0.2, 0.95, (m, m))
            maps[name] = a
        np.savez(folder / "token_coupling.npz", prompt_ids=np.array(ids), n_tokens=n_tok,
                 token_layers=np.tile([max(1, L // 2), min(L, L // 2 + 1)], (P, 1)), **maps)
    if pca:
        proj = np.full((P, L + 1, n_max, 2), np.nan, np.float32)
        for i, m in enumerate(n_tok):
            proj[i, :, :m] = np.cumsum(rng.normal(size=(L + 1, m, 2)), axis=0)
        np.savez(folder / "pca.npz", prompt_ids=np.array(ids), projections=proj, n_tokens=n_tok)
    manifest = {"format": "coupling-scan/1",
                "config": {"k": K, "prompts": "fake.jsonl", "lss_window": 11, "token": "last",
                           "measures": ["depth", "tokens", "regularity"]},
                "model": {"id": model_id, "revision": revision, "random_init": random_init,
                          "n_layers": L, "d_model": 16, "architecture": "FakeLM", "n_params": 1234},
                "timings": {"per_prompt_s": 0.1}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_depth_heatmap_shows_the_grid_with_one_based_layers(tmp_path):
    scan = load_scan(fake_scan(tmp_path / "s", L=5, P=3))
    grids = np.asarray(scan.depth["normalized"], float)
    fig = depth_coupling_figure([scan], "p1")
    ax_prompt, ax_mean = [ax for ax in fig.axes if ax.images]
    shown = ax_prompt.images[0].get_array()
    diag = np.eye(5, dtype=bool)
    assert np.ma.getmaskarray(shown)[diag].all() and not np.ma.getmaskarray(shown)[~diag].any()
    np.testing.assert_allclose(shown.data[~diag], grids[1][~diag])
    np.testing.assert_allclose(ax_mean.images[0].get_array().data[~diag], grids.mean(0)[~diag])
    # every panel on the scale of the off-diagonal entries (the diagonal is trivially 0)
    norm = ax_prompt.images[0].norm
    values = np.concatenate([grids[1][~diag], grids.mean(0)[~diag]])
    assert (norm.vmin, norm.vmax) == pytest.approx((values.min(), values.max()))
    assert [t.get_text() for t in ax_prompt.get_xticklabels()] == ["1", "2", "3", "4", "5"]
    assert ax_prompt.get_xlabel() == AXIS_LP and ax_prompt.get_ylabel() == AXIS_L
    assert ax_prompt.images[0].get_extent() == [0.5, 5.5, 5.5, 0.5]   # row l=1 at the top
    assert any(ax.get_ylabel() == CBAR_LABEL for ax in fig.axes)
    assert "org/fake-model" in ax_prompt.get_title() and "'p1'" in ax_prompt.get_title()


def test_depth_heatmap_draws_a_layer_range_with_its_own_layer_numbers(tmp_path):
    # the paper's Fig. 3 shows blocks 9-16 only: the panel holds exactly that block of the
    # grid, ticks and extent name the real layers, the colour scale is that block's
    scan = load_scan(fake_scan(tmp_path / "s", L=6, P=2))
    grids = np.asarray(scan.depth["normalized"], float)
    fig = depth_coupling_figure([scan], "p1", layers=(2, 4))
    ax_prompt, ax_mean = [ax for ax in fig.axes if ax.images]
    shown = ax_prompt.images[0].get_array()
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(shown.data[off], grids[1][1:4, 1:4][off])
    np.testing.assert_allclose(ax_mean.images[0].get_array().data[off],
                               grids.mean(0)[1:4, 1:4][off])
    assert list(ax_prompt.get_xticks()) == [2, 3, 4]
    assert list(ax_prompt.images[0].get_extent()) == [1.5, 4.5, 4.5, 1.5]
    assert ax_prompt.images[0].norm.vmin == pytest.approx(
        color_limits([grids[1][1:4, 1:4], grids.mean(0)[1:4, 1:4]])[0])
    for bad in ((0, 4), (4, 4), (2, 7)):
        with pytest.raises(ValueError, match="1-based, inclusive"):
            depth_coupling_figure([scan], layers=bad)


def test_color_limits_use_off_diagonal_entries_only():
    a = np.array([[0.0, 0.4], [0.7, 0.0]])
    b = np.array([[0.0, 0.2], [np.nan, 0.0]])
    assert color_limits([a, b]) == (0.2, 0.7)
    assert color_limits([np.zeros((2, 2)) + 0.5]) == pytest.approx((0.49, 0.51))  # flat: padded


def test_layer_curves_plot_mean_and_interquartile_band(tmp_path):
    scan = load_scan(fake_scan(tmp_path / "s", L=12, P=4))
    M = layer_matrix(scan.layers, "entropy")
    assert M.shape == (4, 13)
    np.testing.assert_allclose(M[:, 0], [5.0, 4.0, 3.0, 2.0])     # prompts in file order
    mean, q25, q75 = band(M)
    np.testing.assert_allclose(mean, M.mean(0))
    np.testing.assert_allclose(q25, np.percentile(M, 25, axis=0))
    np.testing.assert_allclose(q75, np.percentile(M, 75, axis=0))
    fig = layer_curves_figure([scan])
    norm_ax, win_ax, step_ax, ent_ax = fig.axes[:4]
    np.testing.assert_allclose(ent_ax.lines[0].get_ydata(), M.mean(0))
    assert norm_ax.get_yscale() == "log"        # the norm spans e^3 ~ 20x
    assert win_ax.lines                          # L + 1 = 13 >= 11: windowed LSS drawn
    assert "mean of 4" in ent_ax.get_legend().get_texts()[0].get_text()


def test_missing_optional_files_are_skipped(tmp_path):
    d = fake_scan(tmp_path / "s", tokens=False, pca=False, depth=False)
    written = draw_figures(d)
    assert [p.name for p in written] == ["layer_curves.png", "summary.txt"]
    assert_png(written[0])
    assert "mis-coupling m~ (normalized, mean l != l')   n/a" in written[1].read_text()
    d2 = fake_scan(tmp_path / "s2", layers=False, pca=False)
    assert [p.name for p in draw_figures(d2)] == ["depth_coupling.png", "token_coupling.png",
                                                  "singular_values.png", "summary.txt"]


def test_fabricated_scan_draws_all_figures_and_compares(tmp_path):
    a = fake_scan(tmp_path / "a", L=4, P=3, n=4, K=3)
    b = fake_scan(tmp_path / "b", L=4, P=3, n=4, K=3, seed=1, model_id="org/other")
    written = draw_figures(a, compare=b, prompt="p2")
    assert [p.name for p in written] == SCAN_PNGS + ["summary.txt"]
    for p in written[:-1]:
        assert_png(p)
    text = written[-1].read_text()
    assert "org/fake-model" in text and "org/other" in text
    # two differing trained models: no sibling auto-detection between them
    assert find_sibling(a, load_scan(a).manifest) is None


def test_bad_input_gives_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        draw_figures(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        draw_figures(tmp_path / "empty")
    d = fake_scan(tmp_path / "s", P=3)
    with pytest.raises(ValueError, match=r"out of range: this scan has 3 prompt\(s\), use 0\.\.2"):
        draw_figures(d, prompt=3)
    with pytest.raises(ValueError, match="prompt id 'zzz' is not in this scan"):
        draw_figures(d, prompt="zzz")
    with pytest.raises(ValueError, match="is the scan itself"):
        draw_figures(d, compare=d)
    with pytest.raises(ValueError, match="does not exist"):
        draw_figures(d, compare=tmp_path / "missing")
    assert prompt_index(load_scan(d), "2") == 2 and prompt_index(load_scan(d), "p1") == 1


def test_model_label():
    assert model_label({"model": {"id": "EleutherAI/pythia-70m", "revision": "step1000"}}) == \
        "EleutherAI/pythia-70m@step1000"
    assert model_label({"model": {"id": "/data/ckpt/gpt2-tiny", "random_init": True,
                                  "revision": "a" * 40}}) == "gpt2-tiny (random init)"


# ------------------------------------------------------------------ command line
def test_report_command_prints_files(tmp_path, capsys):
    from coupling.cli import main

    d = fake_scan(tmp_path / "s", L=3, P=2, layers=False, pca=False, tokens=False)
    assert main(["report", str(d), "--prompt", "1"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(d / "figures" / n) for n in ("depth_coupling.png", "singular_values.png",
                                                    "summary.txt")]
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coupling: error: scan directory") and err.count("\n") == 1


def test_report_parser_standalone(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers())
    small = dict(L=3, P=2, layers=False, pca=False, tokens=False)
    d = fake_scan(tmp_path / "s", **small)
    fake_scan(tmp_path / "r", random_init=True, seed=3, **small)
    args = parser.parse_args(["report", str(d), "--no-compare"])
    assert args.func(args) == 0
    assert "compared with" not in (d / "figures" / "summary.txt").read_text()
    args = parser.parse_args(["report", str(d)])          # sibling found by default
    assert args.func(args) == 0
    assert "compared with" in (d / "figures" / "summary.txt").read_text()
    capsys.readouterr()


# ------------------------------------------------------------------ training dynamics
@pytest.fixture
def step_dirs(tmp_path):
    """Three checkpoints (steps 1, 4000, 143000) of a 12-layer fake model."""
    return [(s, fake_scan(tmp_path / f"step-{s}", L=12, P=3, seed=i, revision=f"step{s}",
                          model_id="EleutherAI/pythia-fake"))
            for i, s in enumerate((143000, 1, 4000))]


def test_training_figures(step_dirs, tmp_path):
    out = tmp_path / "training"
    written = draw_training_figures(step_dirs, out)
    assert [p.name for p in written] == ["coupling_vs_step.png", "lss_vs_step.png",
                                         "adjacency_step1.png", "adjacency_step4000.png",
                                         "adjacency_step143000.png"]
    for p in written:
        assert p.parent == out
        assert_png(p)


def test_coupling_vs_step_plots_one_minus_mean_m(step_dirs):
    runs = training.load_runs(step_dirs)
    assert [s for s, _ in runs] == [1, 4000, 143000]
    fig = training.coupling_vs_step_figure(runs)
    ax = fig.axes[0]
    expected = [1 - r.summary["depth_mis_coupling_mean"].mean() for _, r in runs]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), expected)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1, 4000, 143000])
    assert ax.get_xscale() == "log" and "1-\\tilde{m}" in ax.get_ylabel()
    assert "EleutherAI/pythia-fake" in ax.get_title() and "@step" not in ax.get_title()


def test_adjacency_weights_symmetrise_and_average():
    m = np.array([[[0.0, 0.2, 0.6], [0.4, 0.0, 0.8], [0.6, 1.0, 0.0]],
                  [[0.0, 0.4, 0.6], [0.6, 0.0, 0.8], [0.6, 0.6, 0.0]]])
    W = adjacency_weights(m)
    mean = m.mean(0)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert W[i, j] == W[j, i] == pytest.approx(1 - (mean[i, j] + mean[j, i]) / 2)
    assert np.isnan(np.diag(W)).all()
    assert W[0, 1] == pytest.approx(0.6) and W[1, 2] == pytest.approx(0.2)


def test_training_input_errors(step_dirs, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint scans given"):
        draw_training_figures([], tmp_path / "o")
    with pytest.raises(ValueError, match="duplicate training steps"):
        draw_training_figures([(1, step_dirs[0][1]), (1, step_dirs[1][1])], tmp_path / "o")
    with pytest.raises(ValueError, match=r"adjacency step\(s\) \[7\] not among"):
        draw_training_figures(step_dirs, tmp_path / "o", adjacency_steps=[7])
    assert not (tmp_path / "o").exists()           # validated before anything is drawn
    with pytest.raises(ValueError, match="not a \\(step, scan_dir\\) pair"):
        draw_training_figures(["step-1"], tmp_path / "o")


def test_adjacency_steps_default_first_geometric_middle_last():
    steps = [128, 256, 512, 1000, 2000, 4000, 8000, 16000, 143000]
    assert training.adjacency_selection(steps) == [128, 4000, 143000]
    assert training.adjacency_selection([5, 0]) == [0, 5]
    assert training.adjacency_selection(steps, [4000]) == [4000]


def test_png_check_rejects_a_blank_figure(tmp_path):
    from matplotlib.figure import Figure

    blank = report.save_figure(Figure(figsize=(5, 4)), tmp_path / "blank.png")
    with pytest.raises(AssertionError):
        assert_png(blank)
