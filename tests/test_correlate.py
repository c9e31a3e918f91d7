"""Tests for coupling.experiments.correlate: regression maths vs scipy, CI band by hand, exponential
fit on synthetic data, joining fake scan outputs, subsets, CLI errors."""

import argparse
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from coupling.cli import add_correlate_parser
from coupling.experiments.correlate import run_correlate
from coupling.experiments.fits import (HYPERPARAMS, exponential_fit, hyperparameter_correlations,
                                       linear_fit)
from coupling.experiments.model_table import (PAPER_TABLE, apply_subset, join_scores, load_results,
                                              load_scores)

TABLE1_COLUMNS = ["params_b", "layers", "d_model", "train_tokens_t"]


@pytest.fixture(scope="module")
def table1():
    return load_scores(PAPER_TABLE)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="coupling")
    add_correlate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _write_scan(path, model_id, mis, mis_raw, random_init=False, n_params=7_000_000_000):
    """A fake scan output dir: manifest.json + summary.parquet with per-prompt values."""
    path.mkdir(parents=True)
    manifest = {"model": {"id": model_id, "revision": None, "random_init": random_init,
                          "n_params": n_params, "n_layers": 4, "d_model": 64}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    n = len(mis)
    pd.DataFrame({"prompt_id": np.arange(n), "n_tokens": np.full(n, 9),
                  "depth_mis_coupling_mean": mis, "depth_mis_coupling_raw_mean": mis_raw,
                  "lss": np.linspace(3.0, 4.0, n), "expodistance": np.full(n, 0.1)}
                 ).to_parquet(path / "summary.parquet")
    return path


# ----------------------------------------------------------------------- regression maths

def test_shipped_table_keeps_columns_and_adds_model_id(table1):
    assert list(table1.columns[1:]) == ["family", "variant", "fine_tuned", "params_b", "layers",
                                        "d_model", "train_tokens_t", "openllm_score",
                                        "pos_encoding"]
    assert len(table1) == 42
    row = table1.set_index("model").loc["Llama-3-8B"]
    assert (row.params_b, row.layers, row.openllm_score) == (8, 32, 62.35)
    assert table1["model"].is_unique


@pytest.mark.parametrize("base_only", [False, True])
@pytest.mark.parametrize("column", TABLE1_COLUMNS)
def test_linear_fit_matches_linregress_on_table1(table1, column, base_only):
    data = table1[~table1["fine_tuned"]] if base_only else table1
    data = data[[column, "openllm_score"]].dropna()
    fit = linear_fit(data[column], data["openllm_score"])
    ref = stats.linregress(data[column], data["openllm_score"])
    for ours, theirs in [(fit.slope, ref.slope), (fit.intercept, ref.intercept),
                         (fit.r, ref.rvalue), (fit.r2, ref.rvalue ** 2), (fit.p, ref.pvalue),
                         (fit.stderr, ref.stderr), (fit.intercept_stderr, ref.intercept_stderr)]:
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    assert fit.n == len(data)


def test_hyperparameter_correlations_table1_base_models(table1):
    base = table1[~table1["fine_tuned"]]
    corr = hyperparameter_correlations(base, "openllm_score")
    assert list(corr.index) == list(HYPERPARAMS)
    assert corr.loc["coupling", "note"] == "not in table" and corr.loc["coupling", "n"] == 0
    # 28 rows not fine-tuned; 23 have a score; 17 of those also have a training-token count.
    assert len(base) == 28
    assert corr.loc["params_b", "n"] == 23 and corr.loc["params_b", "n_dropped"] == 5
    assert corr.loc["train_tokens_t", "n"] == 17 and corr.loc["train_tokens_t", "n_dropped"] == 11
    for column in TABLE1_COLUMNS:
        data = base[[column, "openllm_score"]].dropna()
        ref = stats.linregress(data[column], data["openllm_score"])
        np.testing.assert_allclose(corr.loc[column, ["r", "r2", "p"]].to_numpy(float),
                                   [ref.rvalue, ref.rvalue ** 2, ref.pvalue], rtol=1e-12)


def test_confidence_band_by_hand():
    # x = 0..3, y = 1,3,2,5: xbar = 1.5, Sxx = 5, Sxy = 5.5 -> slope = intercept = 1.1,
    # residuals (-0.1, 0.8, -1.3, 0.6), SSE = 2.7, s^2 = 1.35, t_{0.975, 2} = 4.302652729749464.
    fit = linear_fit([0, 1, 2, 3], [1, 3, 2, 5], alpha=0.05)
    assert fit.slope == pytest.approx(1.1, abs=1e-14)
    assert fit.intercept == pytest.approx(1.1, abs=1e-14)
    t = 4.302652729749464
    lo, hi = fit.band([1.5, 3.0])
    half_mid = t * np.sqrt(1.35 * (1 / 4))                 # at the mean of x
    half_end = t * np.sqrt(1.35 * (1 / 4 + 1.5 ** 2 / 5))  # at x = 3
    np.testing.assert_allclose(lo, [2.75 - half_mid, 4.4 - half_end], rtol=1e-12)
    np.testing.assert_allclose(hi, [2.75 + half_mid, 4.4 + half_end], rtol=1e-12)
    # A 90% band is narrower than the 95% one.
    lo90, hi90 = linear_fit([0, 1, 2, 3], [1, 3, 2, 5], alpha=0.10).band([1.5])
    assert hi90[0] - lo90[0] < hi[0] - lo[0]


def test_linear_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        linear_fit([1, 2], [3, 4])
    with pytest.raises(ValueError, match="x is constant"):
        linear_fit([7, 7, 7], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        linear_fit([1, 2, np.nan], [1, 2, 3])


# ----------------------------------------------------------------------- exponential fit

def test_exponential_fit_recovers_parameters():
    # Coupling-like x (negative, small range) and score-like y.
    x = np.linspace(-0.9, -0.1, 15)
    fit = exponential_fit(x, 4.0 * np.exp(3.0 * x) + 30.0)
    assert fit.converged
    np.testing.assert_allclose([fit.a, fit.b, fit.c], [4.0, 3.0, 30.0], rtol=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)

    rng = np.random.default_rng(0)
    y = -2.0 * np.exp(-1.5 * x) + 60.0 + rng.normal(0, 0.01, x.size)
    noisy = exponential_fit(x, y)
    np.testing.assert_allclose([noisy.a, noisy.b, noisy.c], [-2.0, -1.5, 60.0], rtol=0.05)
    resid = y - noisy.predict(x)
    assert noisy.r2 == pytest.approx(1 - resid @ resid / ((y - y.mean()) ** 2).sum())


def test_exponential_fit_reports_non_convergence():
    x = np.linspace(0, 1, 10)
    fit = exponential_fit(x, np.exp(2 * x), maxfev=1)
    assert not fit.converged and "did not converge" in fit.message
    assert np.isnan([fit.a, fit.b, fit.c, fit.r2]).all()


# ----------------------------------------------------------------------- join + run

@pytest.fixture
def fake_results(tmp_path):
    """Two scan dirs, one Ray dir with models.parquet, a random-init scan, and scores."""
    a = _write_scan(tmp_path / "scan_a", "org/model-a", [0.5, 0.7, np.nan], [2.0, 4.0, np.nan])
    b = _write_scan(tmp_path / "scan_b", "org/model-b", [0.3, 0.3], [1.0, 1.5])
    r = _write_scan(tmp_path / "scan_r", "org/model-a", [0.9, 0.9], [9.0, 9.0],
                    random_init=True)
    ray = tmp_path / "ray"
    ray.mkdir()
    pd.DataFrame({"model": ["org/model-c", "org/model-d", "org/model-x"],
                  "revision": [None] * 3, "params": [2e9, 13e9, 1e9], "layers": [18, 40, 8],
                  "d_model": [2048, 5120, 512], "coupling_mean": [-0.2, -0.1, -0.5],
                  "coupling_std": [0.01] * 3, "coupling_raw_mean": [-0.8, -0.5, -3.0],
                  "lss_mean": [4.0] * 3, "expodistance_mean": [0.1] * 3,
                  "n_prompts": [5] * 3}).to_parquet(ray / "models.parquet")
    scores = tmp_path / "scores.csv"
    pd.DataFrame({"model": ["org/model-a", "org/model-b", "org/model-c", "org/model-d",
                            "org/unscanned"],
                  "openllm_score": [40.0, 55.0, 60.0, 66.0, 50.0],
                  "params_b": [7.0, 7.0, np.nan, 13.0, 1.0],
                  "train_tokens_t": [1.0, 2.0, 2.0, 6.0, 1.0],
                  "fine_tuned": [False, False, True, False, False]}).to_csv(scores, index=False)
    return [a, b, r, ray], scores


def test_load_results_aggregates_scans(fake_results):
    paths, _ = fake_results
    res = load_results(paths).set_index(["model", "random_init"])
    a = res.loc[("org/model-a", False)]
    assert a.coupling_normalized == pytest.approx(-0.6)  # NaN prompt skipped
    assert a.coupling_raw == pytest.approx(-3.0)
    assert a.coupling_std == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert a.n_prompts == 2 and a.params_b == pytest.approx(7.0) and a.lss == pytest.approx(3.5)
    assert res.loc[("org/model-c", False)].coupling_raw == -0.8
    assert res.loc[("org/model-d", False)].params_b == pytest.approx(13.0)
    assert res.loc[("org/model-a", True)].coupling_raw == pytest.approx(-9.0)


def test_join_reports_matches_and_prefers_nominal_hyperparams(fake_results):
    paths, scores = fake_results
    joined, report = join_scores(load_results(paths), load_scores(scores))
    assert sorted(joined["model"]) == ["org/model-a", "org/model-b", "org/model-c",
                                       "org/model-d"]
    assert report.unmatched_results == ["org/model-x"]
    assert report.unmatched_scores == ["org/unscanned"]
    assert report.skipped_random_init == ["org/model-a"]
    j = joined.set_index("model")
    assert j.loc["org/model-a", "openllm_score"] == 40.0
    assert j.loc["org/model-a", "coupling_raw"] == pytest.approx(-3.0)  # not the random init
    assert j.loc["org/model-c", "params_b"] == pytest.approx(2.0)       # gap filled by scan
    assert j.loc["org/model-d", "train_tokens_t"] == 6.0


def test_run_correlate_writes_tables_and_figures(fake_results, tmp_path):
    paths, scores = fake_results
    out = tmp_path / "out"
    lines = []
    res = run_correlate(paths, scores, out_dir=out, echo=lines.append)
    for name in ("joined.csv", "correlation.csv", "correlation_hyperparams.png",
                 "hyperparams_vs_score.png", "openllm_score_vs_coupling.png"):
        assert (out / name).stat().st_size > 0, name
    joined = pd.read_csv(out / "joined.csv").set_index("model")
    # default metric is raw: coupling = -mean raw mis-coupling
    np.testing.assert_allclose(joined.loc[["org/model-a", "org/model-b", "org/model-c",
                                           "org/model-d"], "coupling"], [-3.0, -1.25, -0.8, -0.5])
    corr = pd.read_csv(out / "correlation.csv").set_index("hyperparam")
    ref = stats.linregress([-3.0, -1.25, -0.8, -0.5], [40.0, 55.0, 60.0, 66.0])
    assert corr.loc["coupling", "r2"] == pytest.approx(ref.rvalue ** 2, rel=1e-12)
    assert corr.loc["coupling", "p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert "org/model-x" in "\n".join(lines)  # unmatched ids are reported
    assert res["fits"]["openllm_score"]["exponential"] is not None

    res_n = run_correlate(paths, scores, out_dir=tmp_path / "n", by="train_tokens",
                          coupling_metric="normalized", base_only=True, echo=lines.append)
    assert sorted(res_n["joined"]["model"]) == ["org/model-a", "org/model-b", "org/model-d"]
    np.testing.assert_allclose(res_n["joined"].set_index("model").loc["org/model-b", "coupling"],
                               -0.3)
    assert (tmp_path / "n" / "coupling_vs_train_tokens_t.png").exists()


def test_paper_table_alone_via_cli(tmp_path, capsys):
    args = _parse(["correlate", "--paper-table", "--base-only", "--by", "train_tokens",
                   "--out", str(tmp_path)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "params_b" in printed and "R²" in printed
    corr = pd.read_csv(tmp_path / "correlation.csv").set_index("hyperparam")
    table = load_scores(PAPER_TABLE)
    data = table[~table["fine_tuned"]][["d_model", "openllm_score"]].dropna()
    ref = stats.linregress(data["d_model"], data["openllm_score"])
    assert corr.loc["d_model", "r2"] == pytest.approx(ref.rvalue ** 2, rel=1e-12)
    assert (tmp_path / "openllm_score_vs_train_tokens_t.png").exists()
    assert (tmp_path / "correlation_hyperparams.png").exists()


def test_subset_selects_rows_and_bad_expression_names_columns(table1):
    seven = apply_subset(table1, "params_b == 7", base_only=True)
    assert sorted(seven["model"]) == ["Falcon-7B", "Gemma-1.1-7B", "Gemma-7B", "Llama-2-7B",
                                      "MPT-7B"]
    with pytest.raises(ValueError, match=r"bad --subset .*columns available: .*params_b"):
        apply_subset(table1, "params_bb == 7")
    with pytest.raises(ValueError, match="bad --subset"):
        apply_subset(table1, "params_b ==")
    with pytest.raises(ValueError, match="selects no rows"):
        apply_subset(table1, "params_b > 1000")


def test_no_matching_ids_is_a_clear_error(fake_results, tmp_path, capsys):
    paths, _ = fake_results
    scores = tmp_path / "other.csv"
    pd.DataFrame({"model": ["Llama-2-7B"], "openllm_score": [50.97]}).to_csv(scores, index=False)
    with pytest.raises(ValueError, match="no result model id matches.*org/model-a"):
        run_correlate(paths, scores, out_dir=tmp_path / "o", echo=lambda s: None)
    args = _parse(["correlate", *map(str, paths), "--scores", str(scores), "--subset", "x ==",
                   "--out", str(tmp_path / "o")])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("coupling correlate: error: no result model id") and "\n" not in err


def test_bad_inputs_raise(tmp_path, fake_results):
    paths, scores = fake_results
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"model": ["m"], "coupling_mean": [0.4]}).to_parquet(bad / "models.parquet")
    with pytest.raises(ValueError, match="positive values.*negate"):
        load_results([bad])
    with pytest.raises(ValueError, match="missing manifest.json"):
        load_results([tmp_path])
    with pytest.raises(ValueError, match="id column 'name' not found"):
        load_scores(scores, id_column="name")
    with pytest.raises(ValueError, match="score column.*not found"):
        run_correlate(paths, scores, out_dir=tmp_path / "o", score_columns=["nope"],
                      echo=lambda s: None)
    dup = tmp_path / "dup"
    _write_scan(dup, "org/model-b", [0.1], [0.2])
    with pytest.raises(ValueError, match="repeated after the join"):
        run_correlate(paths + [dup], scores, out_dir=tmp_path / "o", echo=lambda s: None)


def test_id_column_and_several_score_columns(fake_results, tmp_path):
    paths, _ = fake_results
    scores = tmp_path / "hf.csv"
    pd.DataFrame({"hf_id": ["org/model-a", "org/model-b", "org/model-c"],
                  "model": ["A", "B", "C"], "arc": [30.0, 50.0, 45.0],
                  "mmlu": [25.0, 40.0, 60.0]}).to_csv(scores, index=False)
    res = run_correlate(paths, scores, id_column="hf_id", score_columns=["arc", "mmlu"],
                        out_dir=tmp_path / "o", echo=lambda s: None)
    joined = res["joined"].set_index("model")
    assert joined.loc["org/model-b", "model_scores"] == "B"
    corr = res["correlations"].set_index(["score", "hyperparam"])
    for score in ("arc", "mmlu"):
        ref = stats.linregress([-3.0, -1.25, -0.8], joined.loc[["org/model-a", "org/model-b",
                                                                 "org/model-c"], score])
        assert corr.loc[(score, "coupling"), "r2"] == pytest.approx(ref.rvalue ** 2, rel=1e-12)
        assert (tmp_path / "o" / f"correlation_hyperparams_{score}.png").exists()
        assert (tmp_path / "o" / f"{score}_vs_coupling_{score}.png").exists()


def test_a_models_table_of_mis_coupling_is_read_as_negated_coupling(tmp_path):
    """models.parquet names and signs m~ and m as summary.parquet does (#23); the joined
    table's coupling columns are their negation, as for the tables written before."""
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"model": ["org/a", "org/b"], "params": [7e9, 1e9], "layers": [32, 16],
                  "d_model": [4096, 2048], "mis_coupling_mean": [0.2, 0.5],
                  "mis_coupling_std": [0.01, 0.02], "mis_coupling_raw_mean": [0.8, 3.0],
                  "lss_mean": [3.0, 4.0], "expodistance_mean": [0.1, 0.2],
                  "n_prompts": [5, 5]}).to_parquet(run / "models.parquet")
    t = load_results([run]).set_index("model")
    assert list(t.loc["org/a", ["coupling_normalized", "coupling_raw", "coupling_std"]]) == \
        [-0.2, -0.8, 0.01]
    assert t.loc["org/b", "coupling_raw"] == -3.0 and "mis_coupling_mean" not in t

