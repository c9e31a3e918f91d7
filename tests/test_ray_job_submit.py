"""``ray start --head`` + ``ray job submit --working-dir .``: the documented cluster workflow.

The head binds to 127.0.0.1 on free ports with its own ``--temp-dir``; it is started as
``ray start --block`` in a new session and stopped by its process ids (SIGTERM to the
``ray start`` process, which tears its children down; SIGKILL for anything of this cluster
still alive after 20 s).  ``ray stop`` is not used: it would stop every Ray on the machine,
including the test session's own cluster.

The job runs the replica placement (2 actors) with one actor crashing on its second shard
(``tests/ray_faults.py``), and
must reproduce the local scan.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray_fixtures import *  # noqa: F401,F403
from ray_fixtures import (assert_models_row, assert_same_as_local, head_process, ray_config,
                          subprocess_env, venv_bin)

from ray_jobs.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head node on 127.0.0.1 with the job API; yields the dashboard URL."""
    with head_process("rj") as (url, _, _):
        yield url


def test_job_submit_runs_a_config_end_to_end(ray_head, ray_model_dir, local_reference,
                                             tmp_path):
    out = tmp_path / "job-out"
    marker = tmp_path / "crashed"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(ray_config(ray_model_dir, replicas=2, shard_size=2,
                                                  out=str(out))))
    # the entrypoint is the driver with replicas that crash once, on a second shard
    # (tests/ray_faults.py: fault injection lives in the tests, not in ray_jobs)
    proc = subprocess.run(
        [venv_bin("ray"), "job", "submit", "--working-dir", ".", "--", sys.executable,
         "tests/ray_faults.py", "--crash-after", "2", "--crash-marker", str(marker), "--",
         "--config", str(cfg_path)],
        cwd=ROOT, env=subprocess_env(RAY_ADDRESS=ray_head), capture_output=True, text=True,
        timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    key = parse_config(ray_config(ray_model_dir), out=str(out)).jobs[0].key
    assert f"{key}: replicas x2; shards computed 3, skipped 0 of 3" in proc.stdout
    assert marker.exists(), "the crash hook did not fire inside the job"
    assert_same_as_local(out / key, local_reference)
    import pandas as pd
    assert_models_row(pd.read_parquet(out / "models.parquet"), local_reference, out / key)
