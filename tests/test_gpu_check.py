"""scripts/gpu_check.sh in smoke mode on the CPU: every step runs and its numbers check out.

The shell script runs the driver ``scripts/gpu_check.py``, which runs each step's module
(``scripts/gpu_check_<step>.py``) in its own process: these tests go through all of them.

The GPU run itself needs a GPU; this runs the same code on tiny shapes (4 layers, d = 128,
GQA, 16 tokens) in a subprocess, exactly as a user would, and checks the tables against
known answers: the fast path equals the authors' whole-prompt method, the scan's grid equals
that method's coupling on the same layers, full SVD and ARPACK find the same singular values.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(out, *args, timeout=240):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--device", "cpu", "--smoke", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    summary = json.loads((out / "summary.json").read_text())
    return proc, summary


def _rows(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_smoke_scan_and_authors_method(tmp_path):
    proc, summary = _run(tmp_path, "--steps", "scan,authors,stream")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [s["status"] for s in summary["steps"]] == ["ok"] * 3
    stream = {r["weights"]: r for r in _rows(tmp_path, "stream")}
    assert set(stream) == {"disk", "memory"}            # blocks from disk = loaded whole
    assert stream["disk"]["max_grid_diff_disk_vs_memory"] == 0.0
    assert stream["disk"]["mean_mis_coupling"] == stream["memory"]["mean_mis_coupling"]
    assert "SMOKE" in (tmp_path / "summary.md").read_text()

    scan = _rows(tmp_path, "scan")
    assert sorted((r["K"], r["svd"]) for r in scan) == [(10, "auto"), (10, "exact"),
                                                        (50, "auto"), (50, "exact")]
    for r in scan:
        assert r["status"] == "ok" and r["seconds"] > 0 and 0 < r["mean_mis_coupling"] < 1
        assert r["one_token_layers"] == "4/4"          # no silent fall-back to a longer prompt

    cmp = _rows(tmp_path, "authors_compare")
    for r in cmp:                        # the one-token path is exact: round-off only
        assert r["rel_diff"] < 1e-4, r
    mis = {(r["what"], r["layer"]): r for r in cmp if r["what"].startswith("mis-coupling")}
    assert len(mis) == 4                                # K = 10, 50 x (1 vs 3, 3 vs 1)
    grids = np.load(tmp_path / "scan_grids.npz")
    for k in (10, 50):                  # analyze_prompt's grid against the authors' method
        ref = mis[(f"mis-coupling m~ K={k}", "1 vs 3")]["full"]
        assert abs(grids[f"K{k}_exact"][0, 2] - ref) / ref < 1e-4

    ext = {r["path"]: r for r in _rows(tmp_path, "authors_extrapolated")}
    assert ext["full"]["label"] == "extrapolated from 2 layer(s) to 4"
    assert ext["full"]["total_s"] > ext["full"]["forward_s"] > 0

    for r in _rows(tmp_path, "svd_real_j"):    # two algorithms, one spectrum
        assert r["full_svd_s"] > 0 and r["arpack_cpu_s"] > 0 and r["sv_rel_diff"] < 1e-4, r


@pytest.mark.slow
def test_smoke_machine_tests_and_svd(tmp_path):
    """The import check with Ray (and pyarrow, datasets) unimportable; the device tests
    through the stand-in runner a machine without pytest uses (a few tests, both dtypes);
    full SVD against ARPACK."""
    proc, summary = _run(tmp_path, "--steps", "machine,tests,svd", "--runner", "standin",
                         "--tests-k", "bitwise or bf16")
    assert proc.returncode == 0, proc.stdout[-3000:]
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["torch"] and machine["modules_failed"] == 0
    stack = _rows(tmp_path, "stack")
    modules = {r["module"] for r in stack}
    assert {"coupling.analysis.prompt", "coupling.jacobian.fastpath", "coupling.scan"} <= modules
    tests = {r["dtype"]: r for r in _rows(tmp_path, "tests")}
    for dtype in ("float32", "bfloat16"):
        assert tests[dtype]["status"] == "ok" and tests[dtype]["failures"] == 0
        assert tests[dtype]["tests"] >= 12       # replay x 10 families + the bf16 tests
    svd = _rows(tmp_path, "svd")
    assert {(r["d"], r["K"]) for r in svd} == {(128, 10), (128, 50), (256, 10), (256, 50)}
    for r in svd:
        assert r["full_svd_s"] > 0 and r["arpack_cpu_s"] > 0 and r["sv_rel_diff"] < 1e-4, r
        assert r["rule_device"] == "full SVD"     # d <= 512: full_svd_pays on any device
