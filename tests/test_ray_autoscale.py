"""An autoscaling cluster on one machine: ``cluster-fake.yaml`` (cluster.yaml's node types on
Ray's fake multi-node provider) and a scan submitted with ``ray job submit``.

The head (``ray start --head --block --autoscaling-config``, CPU 0, loopback, free ports, its
own ``--temp-dir``) starts alone; the scan's replica actors ask for one (logical) GPU each, so
the real autoscaler launches GPU worker nodes from zero, the scan completes on them, and the
idle workers are removed (``idle_timeout_minutes: 0.1``).  A thread samples the alive nodes
every 0.25 s; the test asserts the counts over time and prints the timeline (docs/ray.md).

Not ``ray.cluster_utils.AutoscalingCluster`` itself: its ``start()`` runs ``ray stop
--force``, which would stop every Ray on the machine.  This test starts the same thing
(``RAY_FAKE_CLUSTER=1``, ``AUTOSCALER_UPDATE_INTERVAL_S=1``, the generated config) by hand
and stops only its own processes (by their ``--temp-dir``).
"""
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from ray_fixtures import *  # noqa: F401,F403
from ray_fixtures import assert_same_as_local, head_process, ray_config, subprocess_env, venv_bin

from ray_jobs.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_cluster():
    """Yields ``(dashboard url, gcs address, autoscaler config path)``."""
    config_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    config = config_dir / "cluster-fake.yaml"
    try:
        with head_process("ra", num_cpus=0, args=[f"--autoscaling-config={config}"],
                          env=dict(RAY_FAKE_CLUSTER=1, AUTOSCALER_UPDATE_INTERVAL_S=1),
                          prepare=lambda port, temp: _write_config(config, port)) as (url, gcs, _):
            yield url, gcs, config
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)


def _write_config(path: Path, gcs_port: int):
    """cluster-fake.yaml pointed at this head's GCS port."""
    cfg = yaml.safe_load((ROOT / "cluster-fake.yaml").read_text())
    cfg["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    path.write_text(yaml.safe_dump(cfg))


class NodeSampler(threading.Thread):
    """Alive worker nodes (GCS node table) every ``period`` s: ``[(t, {node id: GPUs})]``."""

    def __init__(self, gcs: str, period: float = 0.25):
        super().__init__(daemon=True)
        from ray._private.state import GlobalState
        from ray._raylet import GcsClientOptions

        self.state = GlobalState()
        self.state._initialize_global_state(GcsClientOptions.create(
            gcs, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
        self.period, self.samples, self.t0 = period, [], time.time()
        self.stop = threading.Event()

    def workers(self) -> dict:
        return {n["NodeID"]: n["Resources"].get("GPU", 0) for n in self.state.node_table()
                if n["Alive"] and not n["Resources"].get("CPU", 0) == 0}

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.time() - self.t0, self.workers()))
            time.sleep(self.period)

    def mark(self) -> float:
        return time.time() - self.t0

    def timeline(self, events: dict) -> str:
        """One line per change of the worker count, plus the named events."""
        rows, last = [], None
        for t, w in self.samples:
            gpus = sorted(int(g) for g in w.values())
            if gpus != last:
                rows.append((t, f"{len(w)} worker(s), GPUs per worker {gpus}"))
                last = gpus
        rows += [(t, name) for name, t in events.items()]
        return "\n".join(f"  {t:6.1f} s  {what}" for t, what in sorted(rows))


@pytest.mark.slow
def test_job_makes_the_autoscaler_launch_gpu_workers_then_remove_them(
        fake_cluster, ray_model_dir, local_reference, tmp_path):
    url, gcs, autoscaler_config = fake_cluster
    out = tmp_path / "job-out"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(ray_config(
        ray_model_dir, replicas=2, shard_size=2, out=str(out),
        autoscaler_config=str(autoscaler_config), placement_timeout_s=240)))
    sampler = NodeSampler(gcs)
    assert sampler.workers() == {}, "workers before any demand"
    sampler.start()
    events = {}
    try:
        events["ray job submit"] = sampler.mark()
        proc = subprocess.run(
            [venv_bin("ray"), "job", "submit", "--", sys.executable, "-m", "ray_jobs.scan",
             "--config", str(cfg_path)],
            cwd=ROOT, env=subprocess_env(RAY_ADDRESS=url), capture_output=True, text=True,
            timeout=400)
        events["ray job submit returned"] = sampler.mark()
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        from ray.job_submission import JobSubmissionClient
        # the scan's job (the head's readiness probe ran a no-op job before it); times in ms
        job = next(j for j in JobSubmissionClient(url).list_jobs()
                   if "ray_jobs.scan" in j.entrypoint)
        events["driver started"] = job.start_time / 1000 - sampler.t0
        events["job ended"] = job.end_time / 1000 - sampler.t0
        deadline = time.time() + 120
        while sampler.workers():                            # idle workers go away
            assert time.time() < deadline, "idle workers were not removed in 120 s"
            time.sleep(0.5)
        events["no worker left"] = sampler.mark()
        time.sleep(1)
    finally:
        sampler.stop.set()
        sampler.join()
    print("\nobserved timeline:\n" + sampler.timeline(events))
    logs = proc.stdout
    key = parse_config(ray_config(ray_model_dir), out=str(out)).jobs[0].key
    # the plan (before any actor): 2 GPU replicas, node types still to launch
    plan = logs[logs.index(f"plan {key}: replicas x2, 1 CPU + 1 GPU"):].splitlines()
    assert any("gpu.24gb.x1 (to launch): room for 1 replica(s), x8 nodes" in ln for ln in plan)
    assert any(ln.strip().startswith("GPU 0: ") for ln in plan[:8])
    assert logs.index("plan ") < logs.index("started: shards 0/3")
    assert f"{key}: replicas x2; shards computed 3, skipped 0 of 3" in logs
    # the node counts over time: none, then GPU workers, then none again
    seen = {}
    for t, w in sampler.samples:
        seen.update(w)
    peak = max(len(w) for _, w in sampler.samples)
    assert sampler.samples[0][1] == {} and sampler.samples[-1][1] == {}
    assert peak >= 1 and all(g >= 1 for g in seen.values())
    first_up = next(t for t, w in sampler.samples if w)
    assert events["driver started"] < first_up < events["job ended"]
    report = json.loads((out / "ray_scan.json").read_text())["report"]["models"][key]
    assert {a["node_id"] for a in report["actors"]} <= set(seen)   # ran on launched workers
    assert report["placement"]["gpus"] == 1
    assert_same_as_local(out / key, local_reference)
