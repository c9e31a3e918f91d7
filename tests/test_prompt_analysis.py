"""Coupling vs prompt length and difficulty (Fig. 10): fits against scipy, a real scan."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from coupling.experiments.prompt_analysis import (analyze_prompts, difficulty_values,
                                                  draw_prompt_analysis)
from coupling.model.loading import TINY_MODEL_DIR
from coupling.model.zoo import save_random, small_config
from coupling.scan import scan

TEXTS = ["The cat sat", "A dog ran across the wide green field today",
         "Water boils at one hundred degrees", "Paris is the capital of France and a city",
         "One two", "The quick brown fox jumps over the lazy dog again and again"]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR / "checkpoints" / "step-0")
    root = tmp_path_factory.mktemp("pa")
    folder = save_random(small_config("gpt2", n_layers=3, d=32, vocab=len(tok), max_pos=64),
                         root / "model", tokenizer=tok)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "text": t, "difficulty": i * 0.5})
                               + "\n" for i, t in enumerate(TEXTS)))
    return scan(folder, prompts=str(prompts), k=4, figures=False, progress=False,
                measures="depth", out=str(root / "scan"))


def test_exact_line_is_recovered():
    n = np.arange(4, 14)
    summary = pd.DataFrame({"n_tokens": n, "depth_mis_coupling_mean": 0.9 - 0.01 * n,
                            "difficulty": ["easy", "hard"] * 5})
    res = analyze_prompts(summary)
    fit = res.fits["n_tokens"]
    assert fit.slope == pytest.approx(-0.01) and fit.intercept == pytest.approx(0.9)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 10
    assert res.fits["difficulty"].n == 10     # easy/hard -> ranks 1/3


def test_fits_of_a_real_scan_match_scipy(scanned, tmp_path):
    s = scanned.summary
    assert "difficulty" in s and s["difficulty"].tolist() == [i * 0.5 for i in range(6)]
    res = analyze_prompts(s)
    for name in ("n_tokens", "difficulty"):
        ref = stats.linregress(s[name].astype(float), s["depth_mis_coupling_mean"])
        fit = res.fits[name]
        assert fit.slope == pytest.approx(ref.slope, rel=1e-10)
        assert fit.r == pytest.approx(ref.rvalue, rel=1e-10)
        assert fit.p == pytest.approx(ref.pvalue, rel=1e-8)
    paths = draw_prompt_analysis(scanned.out_dir, tmp_path / "fig")
    assert paths[0].name == "prompt_analysis.png" and paths[0].stat().st_size > 10_000
    saved = json.loads(paths[1].read_text())
    assert saved["fits"]["n_tokens"]["slope"] == pytest.approx(res.fits["n_tokens"].slope)
    assert saved["n_prompts"] == 6


def test_difficulty_encodings():
    v, note = difficulty_values(pd.Series(["Easy", "medium", "HARD", None]))
    assert note is None and v.tolist()[:3] == [1.0, 2.0, 3.0] and np.isnan(v.iloc[3])
    v, note = difficulty_values(pd.Series(["3", "1.5"]))
    assert note is None and v.tolist() == [3.0, 1.5]
    _, note = difficulty_values(pd.Series(["algebra", "geometry"]))
    assert "categorical" in note


def test_missing_or_unusable_columns_are_explained(tmp_path):
    res = analyze_prompts(pd.DataFrame({"n_tokens": [5, 5, 5, 5],
                                        "depth_mis_coupling_mean": [0.1, 0.2, 0.3, 0.4]}))
    assert res.fits == {} and "2 distinct" in res.notes["n_tokens"]
    assert "no 'difficulty'" in res.notes["difficulty"]
    cat = analyze_prompts(pd.DataFrame({"n_tokens": [3, 5, 8], "difficulty": ["a", "b", "a"],
                                        "depth_mis_coupling_mean": [0.1, 0.2, 0.4]}))
    assert "categorical" in cat.notes["difficulty"] and "n_tokens" in cat.fits
    with pytest.raises(ValueError, match="'depth' measure"):
        analyze_prompts(pd.DataFrame({"n_tokens": [1, 2, 3]}))


def test_categorical_difficulty_figure(scanned, tmp_path):
    from coupling.experiments.prompt_analysis import prompt_analysis_figure

    s = scanned.summary.assign(difficulty=["x", "y"] * 3)
    fig = prompt_analysis_figure(analyze_prompts(s))
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 5_000
