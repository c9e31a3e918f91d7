"""The study runner at test scale (tests/fixtures/study_test.yaml): three tiny LMs, two ViTs.

The whole pipeline runs once through the command line with the local scanner (train ->
scan -> tables -> ViT -> pruning -> analyses) and is rerun to check that it resumes without
redoing anything; the Ray scanner (replicas over models) then scans the same checkpoints and
must give the local scan's numbers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from gap_tolerance import assert_same_scan

from coupling.experiments.study.config import load_study, parse_study
from coupling.results.scan_output import read_scan_output

SPEC = Path(__file__).parent / "fixtures" / "study_test.yaml"


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "coupling.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    proc = run_cli("study", str(SPEC), "--out", str(out), "--local", "--threads", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_tables_hold_every_model_step_and_variant(study):
    out, _ = study
    spec = load_study(SPEC)
    lm = pd.read_csv(out / "tables" / "lm.csv")
    # 3 runs x checkpoints {0, 4, 8} x variants {main, k2}
    assert len(lm) == 3 * 3 * 2
    assert set(lm["model"]) == {"base-s0", "base-s1", "depth-3"}
    assert set(lm["scan"]) == set(spec.variants)
    assert lm["mis_coupling"].notna().all() and lm["eval_loss"].notna().all()
    assert (lm.loc[lm["scan"] == "k2", "k"] == 2).all()
    # the table carries each checkpoint's own scan: recompute one row from its folder
    index = json.loads((out / "scans" / "index.json").read_text())
    folder = out / index["main"]["depth-3@8"]
    summary = pd.read_parquet(folder / "summary.parquet")
    row = lm[(lm["model"] == "depth-3") & (lm["step"] == 8) & (lm["scan"] == "main")].iloc[0]
    assert row["mis_coupling"] == pytest.approx(summary["depth_mis_coupling_mean"].mean())
    assert row["n_layer"] == 3 and bool(row["final"])
    # training metrics come from the checkpoint's own trainer_state.json
    state = json.loads((out / "lm" / "depth-3" / "checkpoints" / "step-8" /
                        "trainer_state.json").read_text())
    assert row["eval_loss"] == pytest.approx(state["eval_loss"])
    assert row["mc_acc"] == pytest.approx(state["mc_acc"])


def test_vit_pruning_and_analyses_are_written(study):
    out, _ = study
    vit = pd.read_csv(out / "tables" / "vit.csv")
    assert sorted(vit["stochastic_depth"]) == [0.0, 0.5]
    assert vit["mis_coupling"].between(0, 2).all() and vit["test_acc"].between(0, 1).all()
    pruning = pd.read_csv(out / "tables" / "pruning.csv")
    # the deepest and largest run is depth-3; every order removes up to 2 blocks
    assert set(pruning["model"]) == {"depth-3"}
    assert {"coupling-most", "coupling-least", "angular", "random"} <= set(pruning["order"])
    assert pruning["n_removed"].max() == 2
    assert (pruning.loc[pruning["n_removed"] == 0, "loss_increase"] == 0).all()
    md = (out / "analyses" / "analyses.md").read_text()
    for section in ("Coupling vs held-out performance", "Coupling vs training step"):
        assert section in md
    assert len(list((out / "analyses" / "figures").glob("*.png"))) >= 5
    record = json.loads((out / "study.json").read_text())
    assert record["spec"]["name"] == "study-test"


def test_rerun_resumes_without_retraining(study):
    out, _ = study
    trained = out / "lm" / "base-s0" / "training.json"
    stamp = trained.stat().st_mtime_ns
    before = pd.read_csv(out / "tables" / "lm.csv")
    proc = run_cli("study", str(SPEC), "--out", str(out), "--local", "--phases",
                   "train,scan,analyses")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained already" in proc.stdout
    assert trained.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(pd.read_csv(out / "tables" / "lm.csv"), before)


def test_ray_scanner_matches_the_local_scan(study, tmp_path):
    """The Ray scanner (replica actors over models) scans the same checkpoints to the same
    numbers as the local scan."""
    out, _ = study
    ray_out = tmp_path / "ray"
    ray_out.mkdir()
    shutil.copytree(out / "lm", ray_out / "lm")
    proc = run_cli("study", str(SPEC), "--out", str(ray_out), "--phases", "scan")
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = pd.read_csv(out / "tables" / "lm.csv")
    ray = pd.read_csv(ray_out / "tables" / "lm.csv")
    cols = ["model", "step", "scan"]
    merged = local.merge(ray, on=cols, suffixes=("_local", "_ray"))
    assert len(merged) == len(local)
    np.testing.assert_allclose(merged["lss_ray"], merged["lss_local"], rtol=1e-5)
    # m~ scan by scan, within the tolerance the spectra's gaps give (tests/gap_tolerance.py)
    index = {side: json.loads((root / "scans" / "index.json").read_text())
             for side, root in (("local", out), ("ray", ray_out))}
    for variant, scans in index["local"].items():
        assert set(index["ray"][variant]) == set(scans), variant
        for name, folder in scans.items():
            assert_same_scan(ray_out / index["ray"][variant][name],
                             read_scan_output(out / folder))


def _spec(**changes) -> dict:
    data = yaml.safe_load(SPEC.read_text())
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return data


def test_bad_specs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        parse_study(_spec(scan={"kk": 3}))
    with pytest.raises(ValueError, match="base value"):
        parse_study(_spec(**{"lm.vary": {"depth": [2]}}))
    with pytest.raises(ValueError, match="unknown runs"):
        parse_study(_spec(pruning={"models": ["nope"]}))
    with pytest.raises(ValueError, match="must include 'main'"):
        parse_study(_spec(**{"scan.variants": {"k2": {"k": 2}}}))
    proc = run_cli("study", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    proc = run_cli("study", str(SPEC), "--out", str(tmp_path / "o"), "--phases", "train,fly")
    assert proc.returncode == 2 and "unknown phase" in proc.stderr
    assert not (tmp_path / "o").exists()
