"""Shared fixtures of the Ray tests (``from ray_fixtures import *``; tests/ is on sys.path).

ONE local Ray cluster per test session, on 127.0.0.1, 4 logical CPUs, no dashboard.  Each
importing module gets its own copy of a session fixture, so the cluster and the test model
are memoised here at module level: the first copy starts them, the others reuse them, and
the copy that started Ray shuts it down at the end of the session.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from gap_tolerance import assert_same_scan

from coupling.model.loading import TINY_MODEL_DIR

_memo: dict = {}

# The Ray tests' scan: small enough for a busy 2-core machine; depth and regularity measures.
SCAN_KEYS = dict(prompts="builtin", max_prompts=6, max_tokens=16, k=4, figures=False,
                 measures="depth,regularity")


# Ports a test chooses for Ray come from below the kernel's ephemeral range and above Ray's
# default worker ports (10002-19999): nothing binding port 0 (Ray's own processes, their
# workers, anything else on the machine) is ever handed one, so a port found free here stays
# free until Ray binds it.  A port picked by binding 0 and releasing it is in the ephemeral
# range: any of the head's own port-0 binds could take it before the head binds it.
RAY_WORKER_PORTS = (10002, 19999)
_given: set = set()


def ephemeral_ports() -> tuple:
    """The kernel's range for port-0 binds (``ip_local_port_range``)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port free now, outside the ranges other processes draw from (above)."""
    import random

    lo, hi = ephemeral_ports()
    start = RAY_WORKER_PORTS[1] + 1
    candidates = [p for p in range(start, 65536) if not lo <= p <= hi and p not in _given]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {start}-65535 outside the ephemeral range {lo}-{hi}")


@pytest.fixture(scope="session")
def ray_address():
    """GCS address of the session's local Ray cluster (started once)."""
    import ray

    from ray_jobs.connect import ray_env

    ray_env()
    started = False
    if "ray" not in _memo:
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=4, include_dashboard=False,
                     _node_ip_address="127.0.0.1",
                     log_to_driver=False)
            started = True
        _memo["ray"] = ray.get_runtime_context().gcs_address
    yield _memo["ray"]
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    if "tok" not in _memo:
        _memo["tok"] = AutoTokenizer.from_pretrained(TINY_MODEL_DIR / "checkpoints" / "step-0")
    return _memo["tok"]


@pytest.fixture(scope="session")
def ray_model_dir(tiny_tokenizer, tmp_path_factory):
    """A random 4-block GPT-2 (d=32) saved with the tiny tokenizer, vocab sized to it."""
    from coupling.model.zoo import save_random, small_config

    if "gpt2" not in _memo:
        folder = tmp_path_factory.mktemp("ray-gpt2") / "gpt2-4"
        cfg = small_config("gpt2", n_layers=4, d=32, vocab=len(tiny_tokenizer), max_pos=64)
        _memo["gpt2"] = save_random(cfg, folder, seed=3, tokenizer=tiny_tokenizer)
    return _memo["gpt2"]


@pytest.fixture(scope="session")
def local_reference(ray_model_dir, tmp_path_factory):
    """``coupling.scan.scan`` of the same model and prompts: what Ray must reproduce."""
    from coupling.scan import scan

    if "ref" not in _memo:
        out = tmp_path_factory.mktemp("ray-ref") / "local"
        _memo["ref"] = scan(ray_model_dir, out=str(out), progress=False, **SCAN_KEYS)
    return _memo["ref"]


def ray_config(model_dir, **extra) -> dict:
    """A distributed-scan config mapping for ``model_dir`` with the tests' scan keys."""
    return {"models": [{"path": str(model_dir)}], **SCAN_KEYS, **extra}


def venv_bin(name: str) -> str:
    """``name`` from the running interpreter's own bin directory (an unactivated venv has it
    only there, not on PATH)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed beside {sys.executable}")
    return str(path)


def subprocess_env(**extra) -> dict:
    """The tests' environment for child processes: loopback Ray, offline hubs, and the running
    interpreter's bin directory first on PATH, so ``python``/``ray`` in children (a Ray job's
    entrypoint included) are this environment's, activated or not."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def assert_same_as_local(folder, ref):
    """``depth_coupling.npz``, ``summary.parquet`` and ``layers.parquet`` match the local scan:
    coupling numbers and spectra within the tolerance their spectral gaps give
    (tests/gap_tolerance.py), the rest to 1e-6."""
    assert_same_scan(folder, ref)
    assert pd.read_parquet(Path(folder) / "summary.parquet").prompt_id.is_unique


def assert_models_row(table, ref, folder):
    """One row: the means over prompts of the run's own summary (``folder``: its model
    folder, compared to the local scan ``ref`` by :func:`assert_same_as_local`), named and
    signed as in summary.parquet (m~ and m, not negated); the model's facts as ``ref``'s."""
    s = pd.read_parquet(Path(folder) / "summary.parquet")
    assert list(table.columns[:11]) == ["model", "revision", "params", "layers", "d_model",
                                        "mis_coupling_mean", "mis_coupling_std",
                                        "mis_coupling_raw_mean", "lss_mean",
                                        "expodistance_mean", "n_prompts"]
    row = table.iloc[0]
    assert len(table) == 1 and row["n_prompts"] == len(s) == len(ref.summary)
    assert row["mis_coupling_mean"] == pytest.approx(s.depth_mis_coupling_mean.mean(), abs=1e-12)
    assert row["mis_coupling_raw_mean"] == pytest.approx(s.depth_mis_coupling_raw_mean.mean(),
                                                         abs=1e-12)
    assert row["mis_coupling_std"] == pytest.approx(s.depth_mis_coupling_mean.std(), abs=1e-12)
    assert row["lss_mean"] == pytest.approx(s.lss.mean(), abs=1e-12)
    info = ref.manifest["model"]
    assert (row["params"], row["layers"], row["d_model"]) == (
        info["n_params"], info["n_layers"], info["d_model"])


__all__ = ["ray_address", "tiny_tokenizer", "ray_model_dir", "local_reference", "SCAN_KEYS",
           "free_port", "ray_config", "subprocess_env", "venv_bin", "assert_same_as_local",
           "assert_models_row", "cluster_pids", "kill_pids", "LoopbackCluster",
           "loopback_cluster", "head_process"]


# ------------------------------------------------------------------------------------------
# Several Ray nodes on one machine (ray.cluster_utils.Cluster), all on 127.0.0.1
# ------------------------------------------------------------------------------------------
def cluster_pids(tag: str) -> list:
    """Processes whose command line names ``tag`` (a cluster's own temp dir): its raylets,
    GCS, workers -- all started by the test that owns the temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if tag in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def kill_pids(pids):
    import signal
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LoopbackCluster:
    """A head and named worker nodes (``ray.cluster_utils.Cluster``), each a raylet of its
    own with the resources given; every node also carries a custom resource of its name
    (``{"node_a": 1}``) so tests can tell them apart.  The head has no CPUs: drivers attach
    to it, actors never land on it.  Nothing connects this process to the cluster: drivers
    run as subprocesses (``address``)."""

    def __init__(self, temp_dir: str):
        from ray.cluster_utils import Cluster

        self.temp_dir = temp_dir
        with self._own_default_temp():
            # GCS and dashboard-agent ports 0: each process binds its own and publishes it
            # (the agent's default, 52365, is every other Ray's on this machine too)
            self.cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
                num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=False,
                dashboard_agent_listen_port=0, temp_dir=temp_dir, resources={"head": 1},
                # a killed raylet is declared dead after ~2 s, not the default ~15 s
                _system_config={"health_check_period_ms": 500,
                                "health_check_failure_threshold": 4}))
        self.nodes: dict = {}      # name -> ray._private.node.Node

    @contextmanager
    def _own_default_temp(self):
        """``Cluster`` writes the head's address to ``<Ray's default temp dir>/ray_current_cluster``
        and deletes it at shutdown, whatever ``temp_dir`` the nodes have: in ``/tmp/ray``,
        which fails where no Ray has run before (no such folder: the cause of the multi-node
        tests' setup errors on a fresh machine) and elsewhere overwrites, then deletes, the
        address of the machine's own Ray.  Pointed (``RAY_TMPDIR``) at this cluster's temp
        dir for the duration."""
        before = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = self.temp_dir
        (Path(self.temp_dir) / "ray").mkdir(exist_ok=True)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = before

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, name: str, cpus: float = 1, memory_gb: float = 2.0, gpus: float = 0,
            **resources):
        node = self.cluster.add_node(num_cpus=cpus, num_gpus=gpus,
                                     memory=int(memory_gb * 1024 ** 3),
                                     node_ip_address="127.0.0.1",
                                     resources={name: 1, **resources})
        self.nodes[name] = node
        return node

    def remove(self, name: str, graceful: bool = False):
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=graceful)

    def node_names(self) -> dict:
        """``{node id: name}`` of the nodes added (and not removed)."""
        return {node.node_id: name for name, node in self.nodes.items()}

    def alive_node_ids(self) -> set:
        return {n["NodeID"] for n in self.cluster.global_state.node_table() if n["Alive"]}

    def actors(self) -> list:
        """``(class name, state, node id)`` of every actor the GCS knows."""
        table = self.cluster.global_state.actor_table(None)
        return [(a.get("ActorClassName", ""), a.get("State"), a.get("Address", {}).get("NodeID"))
                for a in table.values()]

    def shutdown(self):
        try:
            with self._own_default_temp():
                self.cluster.shutdown()
        finally:
            kill_pids(cluster_pids(self.temp_dir))


@contextmanager
def loopback_cluster():
    import shutil
    import tempfile

    from ray_jobs.connect import ray_env

    ray_env()
    temp = tempfile.mkdtemp(prefix="rm", dir="/tmp")      # short: Ray's socket paths are long
    c = None
    try:
        c = LoopbackCluster(temp)
        yield c
    finally:
        if c is not None:
            c.shutdown()
        kill_pids(cluster_pids(temp))
        shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# A head started with `ray start --head --block` (the job API, the autoscaler), on loopback
# ------------------------------------------------------------------------------------------
# The ports ``ray start --head`` would otherwise take at fixed defaults (6379 via --port,
# 8265, 10001; 52365 is given as 0): any other Ray on the machine has those too.  The rest
# (agent gRPC, metrics, runtime-env agent, node and object managers) are left to Ray: each
# process binds port 0 itself and publishes what it got.
HEAD_PORT_FLAGS = ("dashboard-port", "ray-client-server-port")


def _start_head(temp: str, log, num_cpus: int, args, env: dict, prepare):
    """``(process, dashboard url, gcs address)``; url None if ``ray start`` exited first."""
    import subprocess
    import time
    import urllib.request

    gcs_port = free_port()
    prepare(gcs_port)
    ports = {flag: free_port() for flag in HEAD_PORT_FLAGS}
    cmd = [venv_bin("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           "--dashboard-agent-listen-port=0", f"--num-cpus={num_cpus}",
           "--disable-usage-stats", f"--temp-dir={temp}", *args]
    cmd += [f"--{k}={v}" for k, v in ports.items()]
    proc = subprocess.Popen(cmd, env=subprocess_env(**env), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                return proc, None, None
            assert time.time() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(0.5)
    _wait_for_job_agent(url, proc, deadline)
    return proc, url, f"127.0.0.1:{gcs_port}"


def _wait_for_job_agent(url: str, proc, deadline: float):
    """The dashboard answers before the head's job agent has registered; until it has, a
    submitted job is refused ("No available agent to submit job", seen on a loaded 2-core
    machine).  Ready means: a no-op job is accepted and runs to the end."""
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as e:
            assert "No available agent" in str(e), e
            assert proc.poll() is None, "the Ray head exited while its job agent started"
            assert time.time() < deadline, "the head's job agent did not register in 120 s"
            time.sleep(0.5)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                            JobStatus.STOPPED):
        assert time.time() < deadline, "the probe job did not finish in 120 s"
        time.sleep(0.5)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)


def _stop_head(proc, temp: str):
    import signal
    import subprocess
    import time

    proc.send_signal(signal.SIGTERM)              # `ray start --block` stops its children
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    kill_pids(cluster_pids(temp))                 # workers and fake nodes use its temp dir
    time.sleep(1)


@contextlib.contextmanager
def head_process(prefix: str, num_cpus: int = 2, args=(), env: dict | None = None,
                 prepare=lambda gcs_port, temp: None):
    """A ``ray start --head`` process of its own (ports from :func:`free_port`, its own short
    ``--temp-dir``); yields ``(dashboard url, gcs address, temp dir)`` and afterwards stops
    every process of that head, asserting none survived."""
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")   # short: Ray's socket paths are long
    log = open(Path(temp) / "start.log", "w")
    proc = url = None
    try:
        proc, url, gcs = _start_head(temp, log, num_cpus, args, env or {},
                                     lambda port: prepare(port, temp))
        assert url, "the Ray head exited:\n" + (Path(temp) / "start.log").read_text()[-2000:]
        yield url, gcs, temp
    finally:
        if proc is not None:
            _stop_head(proc, temp)
        log.close()
        assert not cluster_pids(temp), "Ray processes of the test head survived"
        shutil.rmtree(temp, ignore_errors=True)
