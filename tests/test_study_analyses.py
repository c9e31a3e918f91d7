"""The study's analyses (coupling.experiments.study.analyses) on synthetic tables with known answers."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from coupling.experiments.study import analyses as an
from coupling.experiments.study import study_stats as stats_mod

FACTORS = {"base": [{}, {}, {}], "width": [{"n_embd": 16}, {"n_embd": 64}],
           "depth": [{"n_layer": 2}, {"n_layer": 8}], "steps": [{"total_steps": 100}],
           "weight_decay": [{"weight_decay": 0.0}], "dropout": [{"dropout": 0.1}]}
SCANS = {"main": (10, "with-final-norm"), "k2": (2, "with-final-norm"), "raw": (10, "raw")}


def lm_table(peak_fraction=0.25):
    """Models x steps x scans; coupling peaks at ``peak_fraction`` of training for odd
    models and rises monotonically for even ones; eval_loss = 3 - coupling at the end."""
    rows, i = [], 0
    for factor, variants in FACTORS.items():
        for j, change in enumerate(variants):
            hp = {"n_layer": 4, "n_embd": 32, "n_head": 4, "total_steps": 200,
                  "weight_decay": 0.1, "dropout": 0.0, **change}
            seed = j if factor == "base" else 0
            params = 12 * hp["n_layer"] * hp["n_embd"] ** 2 + 1000 * hp["n_embd"]
            steps = [0] + [int(hp["total_steps"] * f) for f in (0.125, 0.25, 0.5, 1.0)]
            for step in steps:
                t = step / hp["total_steps"]
                peaked = i % 2 == 1
                c = (0.6 - abs(t - peak_fraction)) if peaked else 0.2 + 0.5 * t
                c += 0.01 * i
                for scan, (k, last) in SCANS.items():
                    cs = c - (0.1 if scan == "k2" else 0.0)
                    rows.append({"model": f"{factor}{j}", "factor": factor, "seed": seed,
                                 **hp, "params": params, "params_nonembed": params - 100,
                                 "step": step, "tokens_seen": step * 1024,
                                 "final": step == hp["total_steps"], "eval_loss": 3 - c,
                                 "eval_acc": 0.1 + c / 2, "mc_acc": 0.25 + 0.1 * np.sin(i),
                                 "scan": scan, "k": k, "last_block": last,
                                 "mis_coupling": 1 - cs, "mis_coupling_std": 0.05,
                                 "mis_coupling_raw": 5 * (1 - cs), "coupling": cs,
                                 "lss": 0.3 + 0.1 * t * (i % 3),
                                 "expodistance": 0.2 + 0.05 * t,
                                 "equidistance_cv": 0.4, "undetermined_layers": 0.0})
            i += 1
    return pd.DataFrame(rows)


def vit_table():
    rows = []
    for wd in (0.0, 0.05, 0.3):
        for sd in (0.0, 0.1, 0.2, 0.5):
            for seed in range(3):
                c = 0.3 + sd + 0.01 * wd    # monotone in sd at each wd; seeds agree (ties)
                rows.append({"model": f"vit_sd{sd}_wd{wd}_s{seed}", "seed": seed,
                             "stochastic_depth": sd, "weight_decay": wd, "n_layer": 6, "d": 48,
                             "params": 1e5, "test_acc": 2 * c + 0.1, "test_loss": 1 - c,
                             "mis_coupling": 1 - c, "mis_coupling_std": 0.01,
                             "mis_coupling_raw": 3 * (1 - c), "coupling": c, "lss": 0.2,
                             "expodistance": 0.1, "undetermined_layers": 0})
    return pd.DataFrame(rows)


CURVES = {  # loss increase after 0..3 blocks removed
    "m-big": {"coupling-most": [0, .1, .2, .3], "coupling-least": [0, .5, 1, 1.5],
              "angular": [0, .2, .3, .35], "random": [[0, .3, .6, .9], [0, .1, .8, 1.2]]},
    "m-deep": {"coupling-most": [0, .4, .5, .9], "coupling-least": [0, .6, .7, .8],
               "angular": [0, .05, .1, .2], "random": [[0, .3, .6, .9], [0, .2, .4, .6]]},
}


def pruning_table():
    rows = []
    for model, orders in CURVES.items():
        for order, curve in orders.items():
            reps = curve if order == "random" else [curve]
            for rep, values in enumerate(reps):
                for n, inc in enumerate(values):
                    rows.append({"model": model, "order": order, "rep": rep, "n_removed": n,
                                 "removed": ",".join(map(str, range(n))),
                                 "eval_loss": 4 + inc, "loss_increase": inc})
    return pd.DataFrame(rows)


def single_table():
    rows = []
    for model in CURVES:
        for b in range(6):
            rows.append({"model": model, "block": b, "loss_increase": 0.5 - 0.05 * b,
                         "neighbour_coupling": 0.1 * b, "angular_distance": 0.3 - 0.01 * b ** 2})
    return pd.DataFrame(rows)


def test_predictors_recover_an_exact_line_and_independent_noise():
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"model": [f"m{i}" for i in range(n)], "coupling": rng.uniform(0, 1, n),
                       "params": rng.normal(size=n), "n_layer": 6})
    df["score"] = 1 - 2.5 * df["coupling"]
    out = stats_mod.predictors(df, "score", ("coupling", "params", "n_layer", "n_embd"),
                        n_boot=500).set_index("predictor")
    c = out.loc["coupling"]
    assert c.n == n and np.isclose(c.r2, 1) and np.isclose(c.r, -1) and np.isclose(c.slope, -2.5)
    assert c.p < 1e-100 and np.isclose(c.r2_lo, 1) and np.isclose(c.r_hi, -1)
    noise = out.loc["params"]
    assert noise.r2 < 0.03 and noise.p > 0.05
    assert noise.r_lo < 0 < noise.r_hi                    # the CI of r covers 0
    assert noise.r2_lo < 0.001 and noise.r2_lo <= noise.r2 <= noise.r2_hi < 0.1
    assert np.isnan(out.loc["n_layer", "r2"]) and "constant" in out.loc["n_layer", "note"]
    assert out.loc["n_embd", "note"] == "not in table"
    again = stats_mod.predictors(df, "score", ("params",), n_boot=500).set_index("predictor")
    assert again.loc["params", "r2_hi"] == noise.r2_hi      # seeded bootstrap
    with pytest.raises(ValueError, match="one row per model"):
        stats_mod.predictors(pd.concat([df, df]), "score")


def test_partial_correlation_matches_a_hand_computation():
    rng = np.random.default_rng(1)
    n = 40
    lp = rng.uniform(5, 7, n)
    steps = rng.choice([100, 300, 1000], n).astype(float)
    coupling = 0.3 * lp + rng.normal(0, 0.2, n)
    score = -0.8 * lp + 0.5 * coupling + 0.001 * steps + rng.normal(0, 0.2, n)
    df = pd.DataFrame({"coupling": coupling, "score": score, "log10_params": lp,
                       "total_steps": steps})
    got = stats_mod.partial_correlation(df, "coupling", "score", ["log10_params", "total_steps"])
    Z = np.column_stack([np.ones(n), lp, steps])
    res = [v - Z @ np.linalg.lstsq(Z, v, rcond=None)[0] for v in (coupling, score)]
    r = stats.pearsonr(*res).statistic
    dof = n - 2 - 2
    t = r * np.sqrt(dof / (1 - r ** 2))
    assert np.isclose(got["r"], r) and got["n"] == n and got["k"] == 2 and got["dof"] == dof
    assert np.isclose(got["p"], 2 * stats.t.sf(abs(t), dof))
    # one control: the textbook first-order formula, computed from plain correlations
    one = stats_mod.partial_correlation(df, "coupling", "score", ["log10_params"])
    rxy, rxz, ryz = (stats.pearsonr(a, b).statistic
                     for a, b in ((coupling, score), (coupling, lp), (score, lp)))
    assert np.isclose(one["r"], (rxy - rxz * ryz) / np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2)))
    fixed = stats_mod.partial_correlation(df.assign(coupling=2 * lp), "coupling", "score",
                                   ["log10_params"])
    assert np.isnan(fixed["r"]) and "fixed by the controls" in fixed["note"]
    few = stats_mod.partial_correlation(df.head(3), "coupling", "score", ["log10_params"])
    assert np.isnan(few["p"]) and "too few rows" in few["note"]


def test_step_table_finds_the_known_peak_and_monotone_rise():
    lm = lm_table(peak_fraction=0.25)
    st = stats_mod.step_table(lm).set_index(["model", "scan"])
    assert len(st) == 10 * 3
    peaked, rising = st.loc[("base1", "main")], st.loc[("base0", "main")]
    assert peaked.peak_step == 50 and peaked.end_step == 200
    assert np.isclose(peaked.coupling_peak, 0.6 + 0.01)
    assert np.isclose(peaked.coupling_end, 0.01 + 0.6 - 0.75)
    assert not peaked.monotone_rise and peaked.spearman_rho < 0.5
    assert rising.monotone_rise and np.isclose(rising.spearman_rho, 1) and rising.peak_step == 200
    assert st.loc[("width0", "k2"), "k_over_d"] == 2 / 16
    assert st.loc[("steps0", "main"), "peak_step"] == 25   # peaked, 100 steps: 0,12,25,50,100
    wide = stats_mod.step_table(lm_table(peak_fraction=0.5)).set_index(["model", "scan"])
    assert wide.loc[("base1", "raw"), "peak_step"] == 100


def test_vit_spearman_on_a_monotone_grid():
    t = stats_mod.vit_tables(vit_table())
    sp = t["vit_spearman"].set_index("weight_decay")
    for wd in ("0.0", "0.05", "0.3"):
        assert sp.loc[wd, "spearman_rho"] == pytest.approx(1.0) and sp.loc[wd, "n"] == 12
    assert sp.loc["pooled", "n"] == 36 and 0.9 < sp.loc["pooled", "spearman_rho"] < 1
    assert sp.loc["pooled", "p"] < 1e-10
    grid = t["vit_grid"].set_index(["stochastic_depth", "weight_decay"])
    assert grid.loc[(0.5, 0.3), "n"] == 3
    assert np.isclose(grid.loc[(0.5, 0.3), "coupling_mean"], 0.3 + 0.5 + 0.003)
    assert np.isclose(grid.loc[(0.5, 0.3), "test_acc_mean"], 2 * 0.803 + 0.1)
    acc = t["vit_acc"].set_index("stochastic_depth")
    assert np.allclose(acc["r"], 1) and np.allclose(acc["slope"], 0.5) and (acc["n"] == 9).all()


def test_pruning_summary_picks_the_known_best_order():
    s = stats_mod.pruning_summary(pruning_table()).set_index(["model", "order"])
    assert s.loc[("m-big", "coupling-most"), "best"]
    assert s.loc[("m-deep", "angular"), "best"]
    assert s["best"].sum() == 2
    assert s.loc[("m-big", "coupling-least"), "rank"] == 4
    rnd = s.loc[("m-big", "random")]
    assert rnd.reps == 2 and np.isclose(rnd.increase_2, 0.7)
    assert rnd.min_3 == 0.9 and rnd.max_3 == 1.2
    assert np.isclose(s.loc[("m-deep", "coupling-most"), "mean_increase"], 0.6)
    short = stats_mod.pruning_summary(pruning_table().query("n_removed <= 1"))
    assert short["increase_3"].isna().all() and short["best"].sum() == 2


def test_single_block_summary():
    s = stats_mod.single_block_summary(single_table()).set_index("model")
    assert s.loc["m-big", "rho_neighbour_coupling"] == pytest.approx(-1)
    assert s.loc["m-big", "rho_angular_distance"] == pytest.approx(1)
    assert s.loc["m-deep", "cheapest_block"] == 5 and s.loc["m-deep", "costliest_block"] == 0


def test_markdown_table():
    df = pd.DataFrame({"a": [1, 2], "b": [0.123456, np.nan], "c": [True, False],
                       "p": [1e-7, 0.5], "d": ["x|y", "z"]})
    md = stats_mod.markdown_table(df, {"p": ".1e"}).splitlines()
    assert md[0] == "| a | b | c | p | d |" and md[1] == "|---|---|---|---|---|"
    assert md[2] == "| 1 | 0.123 | yes | 1.0e-07 | x\\|y |"
    assert md[3] == "| 2 |  | no | 5.0e-01 | z |"


def roundtrip(df, tmp_path, name):
    """The runner hands the analyses CSV-read tables."""
    df.to_csv(tmp_path / f"{name}.csv", index=False)
    return pd.read_csv(tmp_path / f"{name}.csv")


def test_write_analyses_writes_every_figure_and_table(tmp_path):
    tables = {name: roundtrip(df, tmp_path, name) for name, df in
              {"lm": lm_table(), "vit": vit_table(), "pruning": pruning_table(),
               "pruning_single": single_table()}.items()}
    paths = an.write_analyses(tables, tmp_path / "out", n_boot=200)
    figures = {"performance_eval_loss", "performance_eval_acc", "performance_mc_acc",
               "coupling_vs_step", "regularity_vs_step", "vit", "pruning", "single_block"}
    assert {p.stem for k, p in paths.items() if k.startswith("figures/")} == figures
    for name in figures:
        assert (tmp_path / "out" / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "out" / "analyses.md").read_text()
    for name in figures:
        assert f"](figures/{name}.png)" in md
    csvs = sorted(p.name for p in (tmp_path / "out" / "tables").glob("*.csv"))
    assert csvs == sorted(["predictors_eval_loss.csv", "predictors_eval_acc.csv",
                           "predictors_mc_acc.csv", "partial.csv", "step_table.csv",
                           "vit_grid.csv", "vit_spearman.csv", "vit_acc.csv",
                           "pruning_summary.csv", "single_block_summary.csv"])
    for csv in csvs:
        assert f"`tables/{csv}`" in md or csv.startswith("predictors")
    assert "Skipped" not in md
    pred = pd.read_csv(tmp_path / "out" / "tables" / "predictors_eval_loss.csv")
    assert np.isclose(pred.set_index("predictor").loc["coupling", "r"], -1)   # loss = 3 - c
    assert md.count("| predictor | n | r |") == 3


def test_write_analyses_skips_missing_tables(tmp_path):
    tables = {"pruning": pruning_table(), "pruning_single": pd.DataFrame()}
    paths = an.write_analyses(tables, tmp_path, n_boot=100)
    md = (tmp_path / "analyses.md").read_text()
    assert md.count("_Skipped: the `lm` table is missing or empty._") == 3   # analyses 1-3
    assert "_Skipped: the `vit` table is missing or empty._" in md
    assert "_Skipped: the `pruning_single` table is missing or empty._" in md
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["pruning.png"]
    assert set(paths) == {"figures/pruning", "tables/pruning_summary", "analyses.md"}
    assert "| model | order | reps | increase_1 |" in md
