"""``ray start --head`` + ``ray job submit --working-dir .``: the documented cluster workflow.

The head binds to 127.0.0.1 on free ports with its own ``--temp-dir``; it is started as
``ray start --block`` in a new session and stopped by its process ids (SIGTERM to the
``ray start`` process, which tears its children down; SIGKILL for anything of this cluster
still alive after 20 s).  ``ray stop`` is not used: it would stop every Ray on the machine,
including the test session's own cluster.

The job runs the replica placement (2 actors) with one actor crashing after 3 prompts, and
must reproduce the local scan.
"""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from ray_fixtures import *  # noqa: F401,F403
from ray_fixtures import (assert_models_row, assert_same_as_local, free_port, ray_config,
                          subprocess_env)
from ray_jobs.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "ray-client-server-port",
              "runtime-env-agent-port", "node-manager-port", "object-manager-port")


def _cluster_pids(tag: str) -> list:
    """Processes whose command line names this cluster's temp dir (all started by us)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _kill_cluster(proc, temp):
    proc.send_signal(signal.SIGTERM)          # `ray start --block` stops its children
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in _cluster_pids(temp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)


def _start_head(temp: str, log):
    """``(process, dashboard url)`` of a head on fresh free ports, or ``(process, None)`` if
    ``ray start`` exited first (a port was taken between ``free_port()`` and Ray's bind)."""
    ports = {flag: free_port() for flag in PORT_FLAGS}
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
           "--disable-usage-stats", f"--temp-dir={temp}"]
    cmd += [f"--{k}={v}" for k, v in ports.items()]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                return proc, None
            assert time.time() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head():
    """A head node on 127.0.0.1 with the job API; yields the dashboard URL."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")     # short: Ray's socket paths are long
    log = open(Path(temp) / "start.log", "w")
    proc = None
    try:
        for _ in range(3):                                # free ports can be taken meanwhile
            if proc is not None:
                _kill_cluster(proc, temp)
            proc, url = _start_head(temp, log)
            if url:
                break
        assert url, (Path(temp) / "start.log").read_text()[-2000:]
        yield url
    finally:
        if proc is not None:
            _kill_cluster(proc, temp)
        log.close()
        assert not _cluster_pids(temp), "Ray processes of the test head survived"
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submit_runs_a_config_end_to_end(ray_head, ray_model_dir, local_reference,
                                             tmp_path):
    out = tmp_path / "job-out"
    marker = tmp_path / "crashed"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(ray_config(ray_model_dir, replicas=2, shard_size=2,
                                                  out=str(out))))
    runtime_env = {"env_vars": {"COUPLING_TEST_CRASH_AFTER": "3",
                                "COUPLING_TEST_CRASH_MARKER": str(marker)}}
    proc = subprocess.run(
        ["ray", "job", "submit", "--working-dir", ".", "--runtime-env-json",
         json.dumps(runtime_env), "--", "python", "-m", "ray_jobs.scan", "--config",
         str(cfg_path)],
        cwd=ROOT, env=subprocess_env(RAY_ADDRESS=ray_head), capture_output=True, text=True,
        timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    key = parse_config(ray_config(ray_model_dir), out=str(out)).jobs[0].key
    assert f"{key}: replicas x2; shards computed 3, skipped 0 of 3" in proc.stdout
    assert marker.exists(), "the crash hook did not fire inside the job"
    assert_same_as_local(out / key, local_reference)
    import pandas as pd
    assert_models_row(pd.read_parquet(out / "models.parquet"), local_reference)
