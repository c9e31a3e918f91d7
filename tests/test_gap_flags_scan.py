"""The gap flag through a real scan: layers.parquet, summary, printed lines, figures.

A post-LN (BERT) block's Jacobian has its top two singular values both ~1 (the LayerNorm
after the residual sum), within ~1e-4 of each other at d = 64 (the split grows with d: ~3x
the threshold at d = 128, ~10x at d = 256).  With K = 1 most layers' top-1 subspace is
therefore not determined to 0.01 rad at float32; with K = 2 the pair is inside the top-K
and the gap to s_3 (~0.05) is wide: nothing is flagged.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from coupling.cli import print_summary
from coupling.figures.layers import layer_curves_figure, undetermined_layers
from coupling.figures.spectra import singular_values_figure
from coupling.model.loading import TINY_MODEL_DIR
from coupling.model.zoo import save_random, small_config
from coupling.scan import scan
from coupling.spectrum.spectral_gap import min_relative_gap, unit_roundoff


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    folder = tmp_path_factory.mktemp("bert")
    cfg = small_config("bert", n_layers=3, d=64, vocab=len(tok), max_pos=64)
    return save_random(cfg, folder, seed=1, tokenizer=tok)


@pytest.fixture(scope="module")
def scans(bert_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gap")
    return {k: scan(bert_folder, prompts="builtin", max_prompts=2, k=k, figures=False,
                    out=str(out / f"k{k}"), progress=False) for k in (1, 2)}


def test_flags_follow_the_stored_gap(scans):
    one, two = scans[1], scans[2]
    layers = one.layers[one.layers.layer > 0]
    # the stored gap is s_K / s_{K+1}, and the flag is its relative-gap test at float32, d=64
    assert np.allclose(layers.sv_gap, layers.sv_1 / layers.sv_next)
    rel = (layers.sv_1 - layers.sv_next) / layers.sv_1
    expect = rel < min_relative_gap(64, unit_roundoff(torch.float32))
    assert list(layers.sv_gap_undetermined) == list(expect)
    assert expect.sum() >= 3 and (layers.sv_gap < 1.001).all()      # the ~1 pair
    per_prompt = layers.groupby("prompt_id", sort=False).sv_gap_undetermined.sum()
    assert list(one.summary.depth_undetermined_layers) == list(per_prompt)
    assert list(two.summary.depth_undetermined_layers) == [0, 0]
    assert (two.layers[two.layers.layer > 0].sv_gap > 5).all()
    assert one.layers[one.layers.layer == 0].sv_gap_undetermined.isna().all()
    assert (one.summary.depth_nan_entries == 0).all()


def test_summary_and_figures_mark_the_flagged_layers(scans, capsys):
    one = scans[1]
    flagged = one.layers[one.layers.sv_gap_undetermined.fillna(False).astype(bool)]
    bad = flagged.groupby("layer").size().to_dict()
    print_summary(one)
    out = capsys.readouterr().out
    assert (f"UNDETERMINED: {len(flagged)} layer(s) in {flagged.prompt_id.nunique()}/2 prompts "
            f"(layers {', '.join(str(l) for l in sorted(bad))})") in out
    print_summary(scans[2])
    assert "every layer's top-K subspace fixed to < 0.01 rad" in capsys.readouterr().out
    assert undetermined_layers(one) == bad and undetermined_layers(scans[2]) == {}
    ax = singular_values_figure([one]).axes[0]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--" and len(ln.get_xdata())]
    crosses = [ln for ln in ax.lines if ln.get_marker() == "x" and len(ln.get_xdata())]
    assert len(dashed) == len(bad) and len(crosses) == len(bad)
    assert "undetermined" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    clean = singular_values_figure([scans[2]]).axes[0]
    assert not [ln for ln in clean.lines if ln.get_linestyle() == "--" and len(ln.get_xdata())]
    curves = layer_curves_figure([one])
    vlines = [ln for ln in curves.axes[0].lines if ln.get_color() == "red"]
    assert sorted(ln.get_xdata()[0] for ln in vlines) == sorted(bad)


def test_layers_parquet_round_trip(scans):
    back = pd.read_parquet(scans[1].out_dir / "layers.parquet")
    assert str(back.sv_gap_undetermined.dtype) == "boolean"
    assert {"sv_next", "sv_gap", "svd_fallback"} <= set(back)
