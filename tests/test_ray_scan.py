"""The distributed scan on a real local Ray cluster (127.0.0.1, 4 logical CPUs).

Block-range placements (2 and 3 stages) must reproduce ``coupling.scan.scan``'s files: on
CPU float32 the arrays are compared with atol=1e-6 (measured difference: exactly 0); the
replica placement is checked the same way in ``test_ray_job_submit.py``.  Faults (injected
by the tests' own actor subclasses, ``ray_faults.py``): a stage actor and a replica that
crash mid-scan, and a driver killed mid-scan (SIGKILL), must still give every prompt exactly
once.  A prompt that really fails on a replica is recorded in ``failures.json`` and the
others equal the local scan of them alone (exit code 3; ``--fail-fast``: exit code 2).
"""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from gap_tolerance import assert_same_scan
import test_resume
import yaml
from processes import kill_after_files
from ray_faults import crashing
from ray_fixtures import *  # noqa: F401,F403  (session fixtures)
from ray_fixtures import (assert_models_row, assert_same_as_local, free_port, ray_config,
                          subprocess_env)
from test_store import Plant

from ray_jobs.config import parse_config
from ray_jobs.scan import run_scan
from ray_jobs.sizing import PlacementError

ROOT = Path(__file__).resolve().parents[1]
degenerate = test_resume.degenerate     # the fixture: a model with one failing prompt


def _run(tmp_path, model_dir, name, workers=None, **extra):
    cfg = parse_config(ray_config(model_dir, **extra), out=str(tmp_path / name))
    return cfg, run_scan(cfg, progress=False, workers=workers)


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
    assert fs.exists("/coupling-test/run2/models.parquet")
    assert len(fs.glob(f"/coupling-test/run2/_shards/{key}/shard-*.npz")) == 2
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())
    fetched = tmp_path / "fetched"
    fs.get(f"/coupling-test/run2/{key}/", str(fetched), recursive=True)
    assert_same_as_local(fetched, local_reference)
    with fs.open("/coupling-test/run2/models.parquet", "rb") as fh:
        table = pd.read_parquet(fh)
    fs.rm("/coupling-test", recursive=True)
    assert_models_row(table, local_reference, fetched)


def test_three_stages_hold_only_their_blocks_survive_a_crash_and_match_local(
        ray_address, ray_model_dir, local_reference, tmp_path):
    from coupling.model.loading import load_model
    from ray_jobs.actors import StageWorker

    marker = tmp_path / "crashed"
    stage = crashing(StageWorker, "forward", after=4, marker=str(marker))  # exits on forward 4
    cfg, report = _run(tmp_path, ray_model_dir, "stages3", workers={"stage": stage},
                       stages=3, shard_size=3)
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
    marker = tmp_path / "crashed"
    # the driver with a replica that sleeps 1 s per shard (time to kill the driver) and
    # crashes once, on its second shard (Ray restarts it and retries the shard)
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "ray_faults.py"), "--delay",
                             "1.0", "--crash-after", "2", "--crash-marker", str(marker), "--",
                             "--config", str(cfg_path), "--address", ray_address,
                             "--out", str(out), "--quiet"],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    key = parse_config(ray_config(ray_model_dir), out=str(out)).jobs[0].key
    shard_dir = out / "_shards" / key
    finished = kill_after_files(proc, shard_dir, "shard-*.npz", 2, timeout=150, poll=0.1)
    assert 2 <= len(finished) < 6, finished
    assert not (out / key / "summary.parquet").exists()
    assert marker.exists(), "the replica did not crash"
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.npz")}
    # a planted pickle in the shard folder: reported, never loaded
    planted = tmp_path / "pickle-was-executed"
    (shard_dir / "shard-00009.pkl").write_bytes(pickle.dumps(Plant(planted)))
    cfg = parse_config(ray_config(ray_model_dir, replicas=1, shard_size=1), out=str(out))
    with pytest.warns(UserWarning, match=r"not shards \(shard-00009.pkl\).*never loaded"):
        rep = run_scan(cfg, progress=False)["models"][key]
    assert not planted.exists()
    (shard_dir / "shard-00009.pkl").unlink()
    assert rep["shards_skipped"] == len(finished)
    left = 6 - len(finished)
    assert rep["shards_computed"] == left and rep["prompts_computed"] == left
    assert all(shard_dir.joinpath(n).stat().st_mtime_ns == t for n, t in mtimes.items())
    assert_same_as_local(out / key, local_reference)
    saved = json.loads((out / "ray_scan.json").read_text())
    assert saved["report"]["models"][key]["shards_skipped"] == len(finished)
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


def test_coupling_scan_ray_of_one_model_writes_the_local_layout(ray_address, ray_model_dir,
                                                               local_reference, tmp_path):
    """`coupling scan --ray` with one model: --out holds the local scan's files (same names,
    same numbers), and the distributed scan's work folder beside it is gone."""
    from coupling.cli import main as coupling_main

    out = tmp_path / "flat"
    argv = ["scan", "--ray", ray_address, "--model", ray_model_dir, "--out", str(out),
            "--prompts", "builtin", "--max-prompts", "6", "--max-tokens", "16", "--k", "4",
            "--measures", "depth,regularity", "--no-figures"]
    assert coupling_main(argv) == 0
    assert_same_as_local(out, local_reference)
    names = lambda d: sorted(p.name for p in Path(d).iterdir())  # noqa: E731
    assert names(out) == names(local_reference.out_dir)
    assert not (tmp_path / "flat.ray").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["jacobians"]["line"] == "one-token on 4/4 layers"
    assert coupling_main(argv) == 2          # a finished scan is not overwritten silently


@pytest.mark.parametrize("placement", ["replicas", "stages"])
def test_a_failing_prompt_is_recorded_and_the_others_finish(
        ray_address, degenerate, tmp_path, capsys, placement):
    """A prompt whose analysis really fails (``test_resume``'s token embedded at 1e18: a zero
    step ``x^1 == x^0``) in the middle of a shard, on a replica or on a pipeline of two
    block-range stages (where the last stage's regularity finds it): recorded in
    ``failures.json`` with its layer, the shard's other prompts equal a local scan of them
    alone, exit code 3; ``--fail-fast`` makes it fatal (one line, exit code 2)."""
    from coupling.cli import main as coupling_main
    from coupling.scan import scan

    model, prompts, healthy = degenerate
    cfg = tmp_path / "placement.yaml"
    cfg.write_text("placement: stages\nstages: 2\n" if placement == "stages"
                   else "placement: replicas\n")
    base = ["--config", str(cfg), "--model", str(model), "--prompts", str(prompts), "--k", "4",
            "--no-figures"]
    alone = scan(str(model), out=str(tmp_path / "alone"), prompts=str(healthy), k=4,
                 figures=False, progress=False)
    out = tmp_path / "run"
    rc = coupling_main(["scan", "--ray", ray_address, "--out", str(out), *base])
    printed = capsys.readouterr().out
    assert rc == 3, printed
    assert f": {placement} x" in printed, printed           # the path under test
    assert f"failed 1 of 3 prompts (listed in {out / 'failures.json'})" in printed
    (f,) = json.loads((out / "failures.json").read_text())["failures"]
    assert f["prompt_id"] == "zebra" and f["layer"] == 1
    assert f["error"].startswith("ValueError: zero step: x^1 == x^0")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == {"total": 3, "failed": 1}
    assert manifest["ray"]["prompts_failed"] == 1
    assert not (tmp_path / "run.ray").exists()
    summary = pd.read_parquet(out / "summary.parquet")
    assert list(summary.prompt_id) == ["cat", "sun"]
    assert list(np.load(out / "depth_coupling.npz")["prompt_ids"]) == ["cat", "sun"]
    assert_same_scan(out, alone, ignore=("source",))      # tests/gap_tolerance.py
    # fail_fast: the first failure stops the scan in one line, nothing written to OUT
    fast = tmp_path / "fast"
    rc = coupling_main(["scan", "--ray", ray_address, "--out", str(fast), "--fail-fast", *base])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(
        "coupling: error: prompt zebra failed (zero step: x^1 == x^0"), err[-3:]
    assert not fast.exists()


def test_a_plan_that_does_not_fit_names_the_short_resource(ray_address, ray_model_dir,
                                                           tmp_path):
    """On the session's real 4-CPU node: 3 stages of 2 CPUs each do not fit, and the one-line
    error says it is the node's CPUs, how many stages they allow, and what to change."""
    cfg = parse_config(ray_config(ray_model_dir, placement="stages", stages=3,
                                  cpus_per_actor=2), out=str(tmp_path / "o"))
    with pytest.raises(PlacementError) as e:
        run_scan(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "room for at most 2 of 3, short of CPUs" in msg
    assert ": 4 CPUs -> 2, " in msg and "cpus_per_actor (now 2)" in msg
    assert not list((tmp_path / "o" / "_shards").glob("*/shard-*"))     # nothing computed
