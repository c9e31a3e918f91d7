"""The distributed scan on a real local Ray cluster (127.0.0.1, 4 logical CPUs).

Block-range placements (2 and 3 stages) must reproduce ``coupling.scan.scan``'s files: on
CPU float32 the arrays are compared with atol=1e-6 (measured difference: exactly 0); the
replica placement is checked the same way in ``test_ray_job_submit.py``.  Faults: a stage
actor killed mid-scan (test hook ``COUPLING_TEST_CRASH_AFTER``) and a driver killed mid-scan
(SIGKILL) must still give every prompt exactly once.
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ray_fixtures import *  # noqa: F401,F403  (session fixtures)
from ray_fixtures import (assert_models_row, assert_same_as_local, free_port, ray_config,
                          subprocess_env)
from ray_jobs.config import parse_config
from ray_jobs.placement import PlacementError
from ray_jobs.scan import run_scan

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, model_dir, name, **extra):
    cfg = parse_config(ray_config(model_dir, **extra), out=str(tmp_path / name))
    return cfg, run_scan(cfg, progress=False)


def test_two_stages_match_local_and_write_to_a_uri(ray_address, ray_model_dir,
                                                   local_reference, tmp_path):
    import fsspec

    uri = "memory://coupling-test/run2"
    cfg = parse_config(ray_config(ray_model_dir, stages=2, shard_size=4,
                                  staging_dir=str(tmp_path / "staging")), out=uri)
    report = run_scan(cfg, progress=False)
    key = cfg.jobs[0].key
    rep = report["models"][key]
    assert rep["placement"]["kind"] == "stages" and rep["placement"]["ranges"] == [[0, 2], [2, 4]]
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"/coupling-test/run2/{key}/depth_coupling.npz")
    assert fs.exists(f"/coupling-test/run2/models.parquet")
    assert len(fs.glob(f"/coupling-test/run2/_shards/{key}/shard-*.pkl")) == 2
    fetched = tmp_path / "fetched"
    fs.get(f"/coupling-test/run2/{key}/", str(fetched), recursive=True)
    assert_same_as_local(fetched, local_reference)
    with fs.open("/coupling-test/run2/models.parquet", "rb") as fh:
        table = pd.read_parquet(fh)
    fs.rm("/coupling-test", recursive=True)
    assert_models_row(table, local_reference)


def test_three_stages_hold_only_their_blocks_survive_a_crash_and_match_local(
        ray_address, ray_model_dir, local_reference, tmp_path, monkeypatch):
    from coupling.loading import load_model

    marker = tmp_path / "crashed"
    monkeypatch.setenv("COUPLING_TEST_CRASH_AFTER", "4")    # a stage exits after 4 forwards
    monkeypatch.setenv("COUPLING_TEST_CRASH_MARKER", str(marker))
    cfg, report = _run(tmp_path, ray_model_dir, "stages3", stages=3, shard_size=3)
    key = cfg.jobs[0].key
    rep = report["models"][key]
    assert marker.exists(), "the fault hook did not fire"
    ranges = [tuple(r) for r in rep["placement"]["ranges"]]
    assert len(ranges) == 3 and ranges[0][0] == 0 and ranges[-1][1] == 4
    assert_same_as_local(tmp_path / "stages3" / key, local_reference)
    model = load_model(ray_model_dir).model
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    blocks = model.transformer.h
    for (lo, hi), actor in zip(ranges, rep["actors"]):
        expect = count(blocks[lo:hi])
        expect += count([model.transformer.wte, model.transformer.wpe]) if lo == 0 else 0
        expect += count([model.transformer.ln_f, model.lm_head]) if hi == 4 else 0
        assert actor["n_params"] == expect, (lo, hi)
        assert actor["bytes_read"] == 4 * expect
    assert sum(a["n_params"] for a in rep["actors"]) < 2 * model.num_parameters()


def test_killed_driver_resumes_only_unfinished_shards(ray_address, ray_model_dir,
                                                      local_reference, tmp_path):
    cfg_path = tmp_path / "scan.yaml"
    out = tmp_path / "resumed"
    cfg_path.write_text(yaml.safe_dump(ray_config(ray_model_dir, replicas=1, shard_size=1)))
    env = subprocess_env(COUPLING_TEST_SHARD_DELAY="1.0")   # ~1 s per shard: time to kill
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.scan", "--config", str(cfg_path),
                             "--address", ray_address, "--out", str(out), "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    key = parse_config(ray_config(ray_model_dir), out=str(out)).jobs[0].key
    shard_dir = out / "_shards" / key
    deadline = time.time() + 150
    try:
        while len(list(shard_dir.glob("shard-*.pkl"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "driver wrote no shards in time"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = sorted(p.name for p in shard_dir.glob("shard-*.pkl"))
    assert 2 <= len(finished) < 6, finished
    assert not (out / key / "summary.parquet").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.pkl")}
    cfg = parse_config(ray_config(ray_model_dir, replicas=1, shard_size=1), out=str(out))
    rep = run_scan(cfg, progress=False)["models"][key]
    assert rep["shards_skipped"] == len(finished)
    left = 6 - len(finished)
    assert rep["shards_computed"] == left and rep["prompts_computed"] == left
    assert all(shard_dir.joinpath(n).stat().st_mtime_ns == t for n, t in mtimes.items())
    assert_same_as_local(out / key, local_reference)
    marker = json.loads((out / "ray_scan.json").read_text())
    assert marker["report"]["models"][key]["shards_skipped"] == len(finished)
    # a third run finds everything done and computes nothing
    again = run_scan(cfg, progress=False)["models"][key]
    assert again["shards_computed"] == 0 and again["shards_skipped"] == 6


def test_bad_input_gives_one_line_errors(ray_address, ray_model_dir, tmp_path, capsys):
    from coupling.cli import main as coupling_main

    closed = free_port()
    cfg = parse_config(ray_config(ray_model_dir), out=str(tmp_path / "a"),
                       address=f"127.0.0.1:{closed}")
    with pytest.raises(ValueError, match="cannot reach a Ray cluster"):
        run_scan(cfg, progress=False)
    cfg = parse_config(ray_config(ray_model_dir, node_memory_gb=1e-4), out=str(tmp_path / "b"))
    with pytest.raises(PlacementError, match="cannot be placed") as e:
        run_scan(cfg, progress=False)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "b" / "_shards").glob("*/shard-*"))   # nothing computed
    cfg = parse_config(ray_config(ray_model_dir, stages=2, measures="depth,tokens",
                                  token_layers=[2, 3]), out=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="different stages"):
        run_scan(cfg, progress=False)
    # `coupling scan --ray ADDRESS`: the library CLI hands over to ray_jobs
    rc = coupling_main(["scan", "--ray", f"127.0.0.1:{closed}", "--model", ray_model_dir,
                        "--out", str(tmp_path / "d"), "--no-figures"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("coupling: error: cannot reach a Ray cluster")
    # the module CLI: an unknown key is one line on stderr, exit code 2, no traceback
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**ray_config(ray_model_dir), "colour": "red"}))
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.scan", "--config", str(bad),
                           "--address", ray_address], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "ray_jobs.scan: error: unknown config key(s) ['colour']")
