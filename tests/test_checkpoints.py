"""Checkpoint series: spec parsing, one scan per step, reuse on rerun, dynamics table."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from coupling.cli import add_checkpoints_parser
from coupling.experiments.checkpoint_spec import parse_spec, parse_step, resolve_path
from coupling.experiments.checkpoints import scan_checkpoints
from coupling.model.loading import TINY_MODEL_DIR
from coupling.model.zoo import save_random, small_config
from coupling.results.scan_output import read_scan_output
from coupling.scan import scan

SCAN = dict(max_prompts=2, k=4)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR / "checkpoints" / "step-0")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A fake training run: three checkpoints (different seeds) named like train_tiny's."""
    root = tmp_path_factory.mktemp("run")
    cfg = small_config("gpt2", n_layers=3, d=32, vocab=len(tokenizer), max_pos=64)
    for step, seed in ((0, 0), (8, 1), (64, 2)):
        folder = root / "checkpoints" / f"step-{step}"
        save_random(cfg, folder, seed=seed, tokenizer=tokenizer)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step,
                                                               "eval_loss": 7.0 - step / 16}))
    return root


@pytest.fixture(scope="module")
def series(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("series") / "out"
    spec = {"name": "toy", "checkpoints": [str(run_dir / "checkpoints" / "step-*")],
            "references": [{"model": str(run_dir / "checkpoints" / "step-64"),
                            "random_init": True, "seed": 5}]}
    table = scan_checkpoints(spec, out, progress=False, **SCAN)
    return spec, out, table


def test_parse_step_from_names():
    assert parse_step("step-512") == 512
    assert parse_step("step1000") == 1000
    assert parse_step("global_step14") == 14
    assert parse_step("checkpoint-2000") == 2000
    assert parse_step("final") is None


def test_spec_globs_sort_by_step_and_resolve_embedded(run_dir):
    name, entries, settings = parse_spec(
        {"checkpoints": [str(run_dir / "checkpoints" / "step-*")], "scan": {"k": 3}})
    assert [e.step for e in entries] == [0, 8, 64]          # numeric, not lexical, order
    assert [e.dirname for e in entries] == ["step-0", "step-8", "step-64"]
    assert settings == {"k": 3} and name == "model"
    assert resolve_path("embedded:tiny/checkpoints") == str(TINY_MODEL_DIR / "checkpoints")
    assert resolve_path("embedded:tiny") == str(TINY_MODEL_DIR)


def test_spec_revisions_and_yaml_file(tmp_path):
    f = tmp_path / "checkpoints_pythia.yaml"
    f.write_text(yaml.safe_dump({"model": "EleutherAI/pythia-160m",
                                 "revisions": ["step2000", "step1000", {"revision": "main",
                                                                        "step": 143000}]}))
    name, entries, _ = parse_spec(f)
    assert name == "pythia"
    assert [(e.kind, e.revision, e.step) for e in entries] == [
        ("revision", "step1000", 1000), ("revision", "step2000", 2000),
        ("revision", "main", 143000)]
    assert all(e.source == "EleutherAI/pythia-160m" for e in entries)


@pytest.mark.parametrize("spec, match", [
    ({"checkpoints": [{"path": "/nonexistent/step-*"}]}, "no checkpoint folder matches"),
    ({"checkpoints": [{"path": "/nonexistent/final"}]}, "does not exist"),
    ({"revisions": ["step1"]}, "needs `model:`"),
    ({"checkpoints": []}, "lists no checkpoints"),
    ({"model": "m", "revisions": ["main"]}, "cannot read a training step"),
    ({"model": "m", "revisions": ["step1", {"revision": "x", "step": 1}]}, "more than once"),
    ({"model": "m", "revisions": ["step1"], "bogus": 1}, "unknown spec key"),
    ({"model": "m", "checkpoints": [{"revision": "step1", "path": "x"}]}, "exactly one of"),
    ({"model": "m", "checkpoints": [{"revision": "step1", "stpe": 3}]}, "unknown key"),
    ({"model": "m", "checkpoints": [{"revision": "step1", "step": -1}]}, "non-negative"),
    ({"checkpoints": [{"zero": "/nonexistent"}]}, "needs `config:`"),
])
def test_bad_specs_fail_with_a_fix(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_spec(spec)


def test_per_checkpoint_settings_are_refused(run_dir, tmp_path):
    spec = {"checkpoints": [str(run_dir / "checkpoints" / "step-0")]}
    with pytest.raises(ValueError, match="decided per checkpoint"):
        scan_checkpoints(spec, tmp_path / "o", progress=False, model="x")
    with pytest.raises(ValueError, match="unknown config key"):
        scan_checkpoints(spec, tmp_path / "o", progress=False, kk=3)
    with pytest.raises(ValueError, match=r"adjacency step\(s\) \[5\] are not checkpoints"):
        scan_checkpoints(spec, tmp_path / "o", progress=False, adjacency_steps=[5])
    assert not (tmp_path / "o" / "step-0").exists()     # nothing scanned before validation


def test_one_scan_directory_per_step_equal_to_a_direct_scan(series, run_dir, tmp_path):
    _, out, table = series
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == \
        ["figures", "ref-random-init-seed5", "step-0", "step-64", "step-8"]
    direct = scan(str(run_dir / "checkpoints" / "step-8"), out=str(tmp_path / "d"),
                  figures=False, progress=False, **SCAN)
    ours = read_scan_output(out / "step-8")
    pd.testing.assert_frame_equal(ours.summary, direct.summary)
    m = ours.manifest["model"]
    assert (m["id"], m["revision"], m["checkpoint"]["step"]) == ("toy", "step-8", 8)


def test_dynamics_table_holds_the_prompt_means(series):
    _, out, table = series
    disk = pd.read_parquet(out / "dynamics.parquet")
    pd.testing.assert_frame_equal(disk, table)
    ckpt = table[table.role == "checkpoint"]
    assert list(ckpt.step) == [0, 8, 64]
    for _, row in table.iterrows():
        s = read_scan_output(out / row.scan_dir).summary
        assert row.mis_coupling == pytest.approx(s["depth_mis_coupling_mean"].mean(), rel=1e-12)
        assert row.mis_coupling_raw == pytest.approx(s["depth_mis_coupling_raw_mean"].mean(),
                                                     rel=1e-12)
        assert row.lss == pytest.approx(s["lss"].mean(), rel=1e-12)
        assert row.expodistance == pytest.approx(s["expodistance"].mean(), rel=1e-12)
        assert 0 <= row.mis_coupling <= 1 and row.lss >= 1
    np.testing.assert_allclose(ckpt.eval_loss, [7.0, 6.5, 3.0])
    ref = table[table.role == "reference"].iloc[0]
    assert pd.isna(ref.step) and ref.kind == "random_init" and np.isnan(ref.eval_loss)
    assert read_scan_output(out / ref.scan_dir).manifest["model"]["random_init"] is True


def test_training_figures_are_drawn(series):
    _, out, _ = series
    names = {p.name for p in (out / "figures").glob("*.png")}
    assert {"coupling_vs_step.png", "lss_vs_step.png"} <= names
    assert {"adjacency_step0.png", "adjacency_step64.png"} <= names


def test_rerun_keeps_finished_steps_and_refuses_other_settings(series):
    spec, out, table = series
    before = {p: (out / p / "manifest.json").stat().st_mtime_ns for p in table.scan_dir}
    again = scan_checkpoints(spec, out, progress=False, training_figures=False, **SCAN)
    pd.testing.assert_frame_equal(again, table)
    assert before == {p: (out / p / "manifest.json").stat().st_mtime_ns for p in table.scan_dir}
    with pytest.raises(ValueError, match=r"other settings \(k\)"):
        scan_checkpoints(spec, out, progress=False, max_prompts=2, k=5)
    other = {**spec, "checkpoints": [{"path": spec["checkpoints"][0].replace("*", "8"),
                                      "step": 0}]}
    with pytest.raises(ValueError, match="another checkpoint"):
        scan_checkpoints(other, out, progress=False, **SCAN)


def test_revisions_of_a_local_folder_are_refused(run_dir, tmp_path):
    """A folder has no revisions (transformers would load it as it is): a clear error before
    anything is scanned, not two "revisions" of the same weights."""
    folder = run_dir / "checkpoints" / "step-8"
    spec = {"model": str(folder), "revisions": ["step1", "step3"]}
    with pytest.raises(ValueError, match=f"revision 'step1' was given with the local folder "
                                         f"{folder}, which has no revisions"):
        scan_checkpoints(spec, tmp_path / "rev", progress=False, training_figures=False, **SCAN)
    assert not list((tmp_path / "rev").glob("step-*/manifest.json"))


def test_unreachable_hub_revision_is_a_clear_error(tmp_path):
    spec = {"model": "EleutherAI/pythia-160m", "revisions": ["step1000"]}
    with pytest.raises(ValueError, match="could not load model 'EleutherAI/pythia-160m' at "
                                         "revision 'step1000'"):
        scan_checkpoints(spec, tmp_path / "p", progress=False, **SCAN)


def test_command_line(run_dir, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"checkpoints": [{"path": str(run_dir / "checkpoints" / "step-0")},
                                                    {"path": str(run_dir / "checkpoints" / "step-8")}]}))
    parser = argparse.ArgumentParser()
    add_checkpoints_parser(parser.add_subparsers())
    args = parser.parse_args(["checkpoints", str(spec), "--out", str(tmp_path / "cli"), "--max-prompts", "1",
                              "--k", "3", "--quiet", "--adjacency-steps", "8"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "mis_coupling" in text and "step-8" in text
    assert (tmp_path / "cli" / "figures" / "adjacency_step8.png").is_file()
    assert len(pd.read_parquet(tmp_path / "cli" / "dynamics.parquet")) == 2
