"""The local scan end to end: API, CLI, output directory, bad input."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from gap_tolerance import (assert_close_by_gap, depth_tolerance, depth_tolerance_from_spectra,
                           grid_tolerance, singular_value_tolerance, token_tolerance)
from coupling.cli import main
from coupling.model.loading import TINY_MODEL_DIR
from coupling.model.zoo import save_random, small_config
from coupling.results.scan_output import read_scan_output
from coupling.scan import scan


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("gpt2")
    cfg = small_config("gpt2", n_layers=3, d=32, vocab=len(tokenizer), max_pos=64)
    return save_random(cfg, folder, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def scanned(gpt2_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "out"
    return scan(gpt2_folder, prompts="builtin", max_prompts=3, k=4, figures=False,
                measures="depth,tokens,regularity", out=str(out), progress=False)


def test_output_directory_layout(scanned):
    out = scanned.out_dir
    for name in ("manifest.json", "summary.parquet", "layers.parquet", "depth_coupling.npz",
                 "token_coupling.npz", "pca.npz"):
        assert (out / name).exists(), name
    s = pd.read_parquet(out / "summary.parquet")
    assert list(s.prompt_id[:1]) == ["capital_france"] and len(s) == 3
    for col in ("prompt_id", "n_tokens", "depth_mis_coupling_mean", "depth_mis_coupling_raw_mean",
                "lss", "expodistance"):
        assert s[col].notna().all(), col
    assert (s.lss >= 1).all() and s.depth_mis_coupling_mean.between(0, 1).all()
    depth = np.load(out / "depth_coupling.npz")
    assert depth["normalized"].shape == (3, 3, 3) and depth["raw"].shape == (3, 3, 3)
    # J^l against its own vectors: m~ = 0 up to round-off, whatever the gaps (gap_tolerance)
    tol = depth_tolerance_from_spectra(depth["normalized"], depth["raw"],
                                       depth["singular_values"], np.full((3, 3), np.inf), 32,
                                       computations=1)
    diag = np.diagonal(depth["normalized"], axis1=1, axis2=2)
    assert (diag <= np.diagonal(tol.normalized, axis1=1, axis2=2)).all()
    # the per-prompt summary is the mean of the grid off the diagonal
    off = ~np.eye(3, dtype=bool)
    assert np.allclose(depth["normalized"][:, off].mean(1), s.depth_mis_coupling_mean)
    layers = pd.read_parquet(out / "layers.parquet")
    assert len(layers) == 3 * 4 and {"norm", "windowed_lss", "entropy", "sv_1", "sv_4"} <= set(layers)
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["n_layers"] == 3 and m["config"]["k"] == 4
    assert m["model"]["weights_sha256"] and "torch" in m["versions"] and m["timings"]["per_prompt_s"] > 0
    tok = np.load(out / "token_coupling.npz")
    n0 = int(tok["n_tokens"][0])
    assert tok["self"].shape[1:] == (int(tok["n_tokens"].max()),) * 2
    self0 = tok["self"][0][:n0, :n0]
    assert np.isfinite(self0).all() and self0.min() >= 0 and self0.max() <= 1
    fixed_out = tok["fixed_output"][0][:n0, :n0]       # t1, t1' <= t2 = last: all defined
    assert np.isfinite(fixed_out).all()
    assert list(tok["token_layers"][0]) == [1, 2]


def test_scan_matches_direct_library_calls(scanned, gpt2_folder):
    """The scan's depth grid equals coupling computed by hand from operators and exact SVDs."""
    import torch

    from coupling import block_jacobian, load_model, run_forward, top_k_svd
    from coupling.measures.coupling_scores import coupling_matrix, mis_coupling
    lm = load_model(gpt2_folder)
    ids = lm.tokenizer("What is the capital of France? The capital is", return_tensors="pt")["input_ids"]
    rec = run_forward(lm, ids)
    ops = [block_jacobian(rec, l) for l in (1, 2, 3)]
    svds = [top_k_svd(op, 4, "lanczos") for op in ops]     # matrix-free route
    grid = np.array([[mis_coupling(coupling_matrix(ops[a], svds[b].U, svds[b].V))
                      for b in range(3)] for a in range(3)])
    got = np.load(scanned.out_dir / "depth_coupling.npz")["normalized"][0]
    dense = [op @ torch.eye(op.shape[1]) for op in ops]
    tol = grid_tolerance(dense, dense, 4)
    assert_close_by_gap(grid, got, tol.normalized, tol.determined, "depth m~")
    # the default operator is the one-token function; the whole-prompt one gives the same J
    eye = torch.eye(ops[1].shape[0])
    for t1, t2 in ((-1, -1), (2, 5)):
        local = block_jacobian(rec, 2, t1, t2) @ eye
        full = block_jacobian(rec, 2, t1, t2, jacobian="full") @ eye
        assert torch.allclose(local, full, atol=1e-5 * full.abs().max())


def test_rerun_into_finished_directory_says_so(scanned, gpt2_folder, capsys):
    rc = main(["scan", "--model", gpt2_folder, "--out", str(scanned.out_dir), "--max-prompts", "1"])
    assert rc == 2
    assert "already holds a finished scan" in capsys.readouterr().err


def _one_line_error(capsys, argv, expect):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    # progress bars (weight loading) may precede it; the error itself is one line, no traceback
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("coupling: error:"), err
    assert expect in last, err


def test_bad_input_gives_one_line_errors(tmp_path, gpt2_folder, capsys):
    out = tmp_path / "o"
    base = ["scan", "--out", str(out), "--no-figures"]
    _one_line_error(capsys, base + ["--model", str(tmp_path / "nope")], "does not exist")
    _one_line_error(capsys, base + ["--model", gpt2_folder, "--k", "500"], "K=500")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "e", "text": "   "}\n')
    _one_line_error(capsys, base + ["--model", gpt2_folder, "--prompts", str(empty)], "empty")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "long1", "text": "word " * 400}) + "\n")
    _one_line_error(capsys, base + ["--model", gpt2_folder, "--prompts", str(long)], "long1")
    _one_line_error(capsys, base + ["--model", gpt2_folder, "--prompts", "nosuch"], "unknown prompt source")
    _one_line_error(capsys, base + ["--model", gpt2_folder, "--measures", "depth,colour"], "unknown measure")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, ["scan", "--model", gpt2_folder, "--out", str(blocker / "sub")],
                    "cannot write")
    assert not out.exists()  # nothing left behind by any failure
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    with pytest.raises(SystemExit) as e:
        main(["scan", "--colour", "red"])
    assert e.value.code != 0


def test_unknown_family_says_how_to_fix(tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "not-a-family"}))
    _one_line_error(capsys, ["scan", "--model", str(folder), "--out", str(tmp_path / "o")],
                    "could not load model")


def test_yaml_config_and_unknown_key(tmp_path, gpt2_folder, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {gpt2_folder}\nmax_prompts: 2\nk: 3\nfigures: false\n")
    rc = main(["scan", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert rc == 0
    r = read_scan_output(tmp_path / "o")
    assert len(r.summary) == 2 and r.manifest["config"]["k"] == 3
    cfg.write_text("k: 3\ncolour: red\n")
    _one_line_error(capsys, ["scan", "--config", str(cfg), "--out", str(tmp_path / "o2")],
                    "unknown config key")


def test_console_script_runs(tmp_path, gpt2_folder):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "coupling.cli", "scan", "--model", gpt2_folder,
                           "--max-prompts", "2", "--k", "3", "--out", str(out), "--no-figures"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mis-coupling" in proc.stdout and (out / "summary.parquet").exists()


def test_deflated_and_all_token_options(gpt2_folder):
    from coupling import load_model, run_forward
    from coupling.analysis.prompt import analyze_prompt
    from coupling.settings.scan_settings import ScanSettings
    lm = load_model(gpt2_folder)
    ids = lm.tokenizer("One two three four five", return_tensors="pt")["input_ids"]
    rec = run_forward(lm, ids)
    n = rec.n_tokens
    plain = analyze_prompt(lm, ids, ScanSettings(k=4), record=rec)
    defl = analyze_prompt(lm, ids, ScanSettings(k=4, deflate_ln=True), record=rec)
    # pre-LN blocks come back unchanged (their one trivial direction, 1, is null); only the
    # last block, final norm inside (Eq. 7), is post-norm and deflated (tests/test_deflation.py)
    assert not np.allclose(plain.depth_normalized, defl.depth_normalized)
    np.testing.assert_array_equal(plain.depth_normalized[:2, :2], defl.depth_normalized[:2, :2])
    assert [defl.deflation[str(l)]["removed_in"] for l in (1, 2, 3)] == [0, 0, 2]
    allt = analyze_prompt(lm, ids, ScanSettings(k=4, token="all"), record=rec)
    per_token = [analyze_prompt(lm, ids[:, :t + 1], ScanSettings(k=4)).depth_normalized
                 for t in range(n)]   # causal: token t's J_tt only sees the prefix
    tol = depth_tolerance(lm, rec, ScanSettings(k=4, token="all"))
    assert_close_by_gap(allt.depth_normalized, np.mean(per_token, axis=0), tol.normalized,
                        tol.determined, "token=all depth m~")


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_local_jacobians_equal_the_whole_prompt_reference(family):
    """The default (local: one token with its prefix cached, truncated prompts for J_{t1 t2})
    gives the reference's numbers (whole prompt per product); BERT falls back to the whole
    prompt.  Depth grids, raw grids, spectra and all token-wise grids."""
    from coupling.analysis.prompt import analyze_prompt
    from coupling.model.loading import LoadedModel
    from coupling.model.trajectory import run_forward
    from coupling.model.zoo import build_random, random_inputs
    from coupling.settings.scan_settings import ScanSettings
    cfg = small_config(family, n_layers=3, d=32)
    if family == "bert":
        # at BERT's own init (0.02) every block's top two singular values are the norm's
        # exact 1s (1.00003, 1.00000): every entry off the diagonal is undetermined
        cfg.initializer_range = 0.2
    lm = LoadedModel(build_random(cfg, seed=1), None, cfg, {"n_layers": 3})
    ids = random_inputs(family, n_tokens=7)["input_ids"]
    rec = run_forward(lm, ids)
    common = dict(k=4, measures=("depth", "tokens"), token_layers=(1, 2), token="all")
    local = analyze_prompt(lm, ids, ScanSettings(**common), record=rec)
    full = analyze_prompt(lm, ids, ScanSettings(jacobian="full", svd="exact", **common),
                          record=rec)
    # tolerances from the gaps of the whole-prompt Jacobians' spectra (tests/gap_tolerance.py):
    # GPT-2's last block, final norm inside (Eq. 7), has s1/s2 = 1.0001 at random init, so
    # its column of the grid is undetermined and left out (2 of 9 entries)
    depth = depth_tolerance(lm, rec, ScanSettings(**common))
    assert_close_by_gap(local.depth_normalized, full.depth_normalized, depth.normalized,
                        depth.determined, f"{family} depth m~")
    assert_close_by_gap(local.depth_raw, full.depth_raw, depth.raw, depth.determined,
                        f"{family} depth m")
    assert_close_by_gap(local.singular_values, full.singular_values,
                        singular_value_tolerance(full.singular_values, 32), True, "values")
    tokens = token_tolerance(lm, rec, ScanSettings(**common))
    for name in ("self", "fixed_input", "fixed_output"):
        assert_close_by_gap(local.tokens[name], full.tokens[name], tokens[name].normalized,
                            tokens[name].determined, f"{family} {name}")
    # each per-prompt score is the mean of its own grid off the diagonal (the grids are
    # compared above, entry by entry)
    off = ~np.eye(3, dtype=bool)
    for res in (local, full):
        assert res.summary["depth_mis_coupling_mean"] == \
            pytest.approx(res.depth_normalized[off].mean(), abs=1e-12)


def test_jacobian_setting_is_validated(tmp_path, gpt2_folder, capsys):
    with pytest.raises(SystemExit) as e:
        main(["scan", "--model", gpt2_folder, "--jacobian", "half", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err
    from coupling.settings.scan_settings import ScanSettings
    with pytest.raises(ValueError, match="--jacobian must be one of local, full"):
        ScanSettings(jacobian="half")
    with pytest.raises(ValueError, match="--chunk must be a positive integer"):
        ScanSettings(chunk=0)
