"""The distributed scan on several Ray nodes, and GPU placement planning on fake GPUs.

Cluster tests: ``ray.cluster_utils.Cluster`` on 127.0.0.1 (``ray_fixtures.LoopbackCluster``):
a head with no CPUs (drivers attach there) and worker raylets added per test, each with its
own CPUs, logical memory and a custom resource of its name (``{"node_a": 1}``).  Drivers run
as subprocesses (``sys.executable``), so this process never joins the cluster and the
session's own local Ray is untouched.  Every scan must reproduce ``coupling.scan.scan``'s
files (atol 1e-6; measured difference 0).

Planning tests (no cluster): the GPUs one replica needs, Accelerate's device map for them and
stage sizing per GPU memory, against sizes counted by hand.
"""
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from ray_fixtures import *  # noqa: F401,F403  (session fixtures)
from ray_fixtures import assert_same_as_local, loopback_cluster, ray_config, subprocess_env

from coupling.settings.scan_settings import ScanSettings
from ray_jobs.config import parse_config
from ray_jobs.placement import NodeInfo, plan_placement
from ray_jobs.sizing import (GB, ModelSizes, PlacementError, gpu_reserve, gpus_for_replica,
                             replica_device_map)

ROOT = Path(__file__).resolve().parents[1]

# A driver that slows each replica shard down (time to remove a node mid-scan).  The worker
# subclass is defined in __main__, so Ray ships it to the nodes by value.
SLOW_DRIVER = """
import sys, time, yaml
from ray_jobs.actors import ReplicaWorker
from ray_jobs.config import parse_config
from ray_jobs.scan import print_report, run_scan

class SlowReplica(ReplicaWorker):
    delay = float(sys.argv[4])          # read here: an actor's sys.argv is Ray's worker's

    def run(self, spec, shard):
        out = super().run(spec, shard)
        time.sleep(self.delay)
        return out

cfg = parse_config(yaml.safe_load(open(sys.argv[1])), out=sys.argv[2], address=sys.argv[3])
print_report(run_scan(cfg, workers={"replica": SlowReplica}))
"""


# ------------------------------------------------------------------------------------------
# Planning, no cluster
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_skeleton():
    """Untied Llama, d=256, 8 blocks, float32 -- sizes by hand: embedding 1000 x 256 x 4 =
    1,024,000 B; block = 4 d^2 (attention) + 3 d x 512 (MLP) + 2 d (norms) = 655,872
    parameters = 2,623,488 B; head = final norm 1,024 B + unembedding 1,024,000 B."""
    from transformers import LlamaConfig

    from ray_jobs.models import model_sizes
    from coupling.model.weights import build_skeleton, model_layout

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                      tie_word_embeddings=False)
    skeleton = build_skeleton(cfg)
    sizes = model_sizes(skeleton, model_layout(skeleton), "float32", 256)
    return skeleton, sizes


def test_llama_sizes_are_the_hand_counts(llama_skeleton):
    _, sizes = llama_skeleton
    assert sizes.blocks == [2_623_488] * 8
    assert (sizes.embedding, sizes.head) == (1_024_000, 1_025_024)
    assert sizes.whole == 8 * 2_623_488 + 1_024_000 + 1_025_024


def test_gpus_per_replica_and_accelerates_map(llama_skeleton):
    skeleton, sizes = llama_skeleton
    # 12 MB per GPU: embedding + 4 blocks = 11.52 MB, 4 blocks + head = 11.52 MB -> 2 GPUs
    assert gpus_for_replica(sizes, 12_000_000, 8) == 2
    # 8 MB: a middle GPU holds 3 blocks (7.87 MB), an end GPU 2 (+ embedding or head):
    # 3 GPUs hold 7 of the 8 blocks -> 4
    assert gpus_for_replica(sizes, 8_000_000, 8) == 4
    with pytest.raises(PlacementError, match="does not fit 3 GPU"):
        gpus_for_replica(sizes, 8_000_000, 3)
    # Accelerate keeps the largest layer (one block) free on GPU 0: 12 - 2.62 = 9.38 MB take
    # the embedding + 3 blocks (8.89 MB); GPU 1 takes 4 blocks (10.49 MB); block 8 and the
    # head need a third GPU
    g, dmap = replica_device_map(skeleton, 12_000_000, 2, 8)
    assert g == 3
    assert dmap == {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0,
                    "model.layers.2": 0, "model.layers.3": 1, "model.layers.4": 1,
                    "model.layers.5": 1, "model.layers.6": 1, "model.layers.7": 2,
                    "model.norm": 2, "model.rotary_emb": 2, "lm_head": 2}
    # 8 MB: 5.38 MB on GPU 0 = embedding + 1 block, then 3 + 3 blocks, then 1 block + head
    g, dmap = replica_device_map(skeleton, 8_000_000, 4, 8)
    assert g == 4 and [dmap[f"model.layers.{i}"] for i in range(8)] == [0, 1, 1, 1, 2, 2, 2, 3]
    with pytest.raises(PlacementError, match="Accelerate cannot fit"):
        replica_device_map(skeleton, 12_000_000, 2, 2)


def _gb_model(blocks_gb, emb_gb, head_gb, d=8192):
    blocks = [int(b * GB) for b in blocks_gb]
    return ModelSizes(blocks, int(emb_gb * GB), int(head_gb * GB),
                      sum(blocks) + int((emb_gb + head_gb) * GB), d, dtype_bytes=2, causal=True)


def test_gpu_replicas_planned_per_node_from_fake_gpu_resources():
    s = ScanSettings(k=10, svd="lanczos", chunk=8)
    model = _gb_model([3] * 10, 1, 1)                 # 32 GB of bf16 weights
    nodes = [NodeInfo("n-four", 16, 4, 64 * GB, 24 * GB, "g4"),
             NodeInfo("n-one", 4, 1, 16 * GB, 24 * GB, "g1")]
    reserve = gpu_reserve(model, 64, s)
    # reserve = one chunk (8 x 2 x d x 4 x 16 B) + the fp32 copy of a block (6 GB) + held
    # layer state (10 x 64 x d x 8 B) + 0.5 GB CUDA context
    assert reserve == 8 * 2 * 8192 * 4 * 16 + 6 * GB + 10 * 64 * 8192 * 8 + GB // 2
    p = plan_placement(model, s, 64, nodes, n_shards=10)
    # 24 - 6.54 = 17.46 GB of weights per GPU: embedding + 5 blocks = 16 GB -> 2 GPUs a copy;
    # the 1-GPU node cannot hold a copy, the 4-GPU node holds two
    assert (p.kind, p.gpus, p.n_actors) == ("replicas", 2, 2)
    assert p.gpu_budget == 24 * GB - reserve and p.hosts == [("g4", 2, 1)]
    assert plan_placement(model, s, 64, nodes, n_shards=10, gpus_per_actor=4).n_actors == 1
    assert plan_placement(model, s, 64, nodes, n_shards=10, gpus_per_actor=0).gpus == 0


def test_stage_count_sized_per_gpu_memory():
    s = ScanSettings(k=10, svd="lanczos", chunk=8)
    model = _gb_model([5] * 20, 1, 1)                 # 102 GB of float32 weights
    model.dtype_bytes = 4                             # (no float32 copy to reserve)
    nodes = [NodeInfo(f"n{i}", 8, 2, 64 * GB, 16 * GB, f"t4-{i}") for i in range(4)]
    p = plan_placement(model, s, 32, nodes)
    # a 16 GB GPU holds 3 blocks (15 GB + 0.5 GB process + MBs of working memory), but an
    # end stage only 2 (embedding or head + 3 blocks = 16 GB): 2 + 3 x 6 + 2 = 22 >= 20
    # blocks need 8 stages, 7 hold only 19
    assert (p.kind, p.gpus, p.n_actors) == ("stages", 1, 8)
    assert max(model.stage_bytes(lo, hi) for lo, hi in p.ranges) == 15 * GB
    assert max(p.stage_memory) <= 16 * GB
    assert Counter(p.hosts) == {f"t4-{i}": 2 for i in range(4)}      # one stage per GPU
    with pytest.raises(PlacementError, match="stages=7: the largest stage needs"):
        plan_placement(model, s, 32, nodes, stages=7)
    # 3 nodes of 2 GPUs: the GPUs (one per stage) are short, not their memory
    with pytest.raises(PlacementError, match=r"in 8 stages .*room for at most 6 of 8, short of "
                       r"GPUs \(node t4-0: 2 GPUs -> 2, 16 GB each -> enough; node t4-1"):
        plan_placement(model, s, 32, nodes[:3])


# ------------------------------------------------------------------------------------------
# A real multi-node cluster on loopback
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    with loopback_cluster() as c:
        yield c


@pytest.fixture
def nodes(cluster):
    """Adds nodes for one test (``nodes("node_a", cpus=1, memory_gb=2)``), removes them after."""
    added = []

    def add(name, **kw):
        added.append(name)
        return cluster.add(name, **kw)
    yield add
    for name in added:
        if name in cluster.nodes:
            cluster.remove(name)


def _scan(cluster, tmp_path, model_dir, name, *extra, driver=None, **keys):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(ray_config(model_dir, **keys)))
    out = tmp_path / name
    if driver:
        cmd = [sys.executable, "-c", driver, str(cfg), str(out), cluster.address, *extra]
    else:
        cmd = [sys.executable, "-m", "ray_jobs.scan", "--config", str(cfg), "--address",
               cluster.address, "--out", str(out), *extra]
    key = parse_config(ray_config(model_dir), out=str(out)).jobs[0].key
    return cmd, out, key


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _report(out, key) -> dict:
    return json.loads((out / "ray_scan.json").read_text())["report"]["models"][key]


@pytest.mark.slow
def test_three_stages_on_three_nodes_read_only_their_blocks(cluster, nodes, ray_model_dir,
                                                           local_reference, tmp_path):
    from coupling.model.loading import load_model

    for name in ("node_a", "node_b", "node_c"):          # one stage fits a node's 1 CPU
        nodes(name, cpus=1, memory_gb=2)
    cmd, out, key = _scan(cluster, tmp_path, ray_model_dir, "stages3", "--dry-run",
                          stages=3, shard_size=3)
    before = cluster.actors()
    dry = _run(cmd)
    assert dry.stdout.splitlines()[0] == f"plan {key}: stages x3, 1 CPU each (forced by config)"
    assert len([ln for ln in dry.stdout.splitlines() if ln.startswith("    stage ")]) == 3
    assert not out.exists() and cluster.actors() == before   # a dry run starts nothing
    proc = _run(cmd[:-1])
    assert proc.stdout.index(f"plan {key}: stages x3") < proc.stdout.index("shards computed")
    assert proc.stderr.index("started: shards 0/2") > 0
    rep = _report(out, key)
    names = cluster.node_names()
    where = [names[a["node_id"]] for a in rep["actors"]]
    assert sorted(where) == ["node_a", "node_b", "node_c"]       # one stage per node
    # each stage read exactly its own tensors: its blocks, + embeddings first, + head last
    model = load_model(ray_model_dir).model
    tr = model.transformer
    nbytes = lambda mods: 4 * sum(p.numel() for m in mods for p in m.parameters())  # noqa
    ranges = [tuple(r) for r in rep["placement"]["ranges"]]
    assert ranges[0][0] == 0 and ranges[-1][1] == 4 and len(ranges) == 3
    for (lo, hi), actor in zip(ranges, rep["actors"]):
        expect = nbytes(tr.h[lo:hi]) + (nbytes([tr.wte, tr.wpe]) if lo == 0 else 0) \
            + (nbytes([tr.ln_f, model.lm_head]) if hi == 4 else 0)
        assert actor["bytes_read"] == expect and actor["blocks"] == [lo, hi]
    assert sum(a["bytes_read"] for a in rep["actors"]) < 2 * nbytes([model])
    assert_same_as_local(out / key, local_reference)


@pytest.mark.slow
def test_node_removed_mid_scan_finishes_on_the_others(cluster, nodes, ray_model_dir,
                                                      local_reference, tmp_path):
    nodes("node_a", cpus=1, memory_gb=2)
    nodes("node_b", cpus=1, memory_gb=2)
    cmd, out, key = _scan(cluster, tmp_path, ray_model_dir, "lost", "1.0", driver=SLOW_DRIVER,
                          replicas=2, shard_size=1)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        shard_dir = out / "_shards" / key
        deadline = time.time() + 180
        while len(list(shard_dir.glob("shard-*.npz"))) < 1:     # both replicas are working
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no shard finished in 180 s"
            time.sleep(0.2)
        names = cluster.node_names()
        alive = [names[n] for cls, state, n in cluster.actors()
                 if cls == "SlowReplica" and state == "ALIVE"]
        assert sorted(alive) == ["node_a", "node_b"]
        cluster.remove("node_a")                               # SIGKILL its raylet + workers
        nodes("node_c", cpus=1, memory_gb=2)                   # a replacement comes up
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (stdout + stderr)[-4000:]
    done_before = len(list(shard_dir.glob("shard-*.npz")))
    rep = _report(out, key)
    assert rep["shards_computed"] == rep["prompts_computed"] == 6 == done_before
    names = cluster.node_names()
    ran = Counter(names.get(n, "removed") for cls, _, n in cluster.actors()
                  if cls == "SlowReplica")
    assert ran["node_c"] == 1 and ran["node_b"] == 1       # restarted on the new node
    assert_same_as_local(out / key, local_reference)       # every prompt once, same numbers


@pytest.mark.slow
def test_replicas_spread_by_the_resources_each_node_offers(cluster, nodes, ray_model_dir,
                                                           local_reference, tmp_path):
    nodes("node_a", cpus=2, memory_gb=1.5)      # two replicas (~0.5 GB each)
    nodes("node_b", cpus=1, memory_gb=1.5)      # one: a single CPU
    nodes("node_c", cpus=2, memory_gb=0.3)      # none: too little memory
    cmd, out, key = _scan(cluster, tmp_path, ray_model_dir, "spread", shard_size=2)
    # `coupling scan --ray ADDRESS --dry-run`: the same plan from the library's CLI
    before = cluster.actors()
    cli = _run([sys.executable, "-c", "import sys; from coupling.cli import main; "
                "sys.exit(main())", "scan", "--ray", cluster.address, "--dry-run", "--model",
                str(ray_model_dir), "--max-prompts", "6", "--max-tokens", "16", "--k", "4",
                "--no-figures", "--out", str(tmp_path / "cli")])
    assert cli.stdout.startswith("plan ") and "replicas x1," in cli.stdout.splitlines()[0]
    assert not (tmp_path / "cli").exists() and cluster.actors() == before   # none started
    proc = _run(cmd)
    names = cluster.node_names()
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"plan {key}: replicas x3, 1 CPU and ")
    room = {ln.split()[0]: ln for ln in lines[1:4] if "room for" in ln}
    assert "room for 2 replica(s)" in room[names_inv(names)["node_a"][:8]]
    assert "room for 1 replica(s)" in room[names_inv(names)["node_b"][:8]]
    assert names_inv(names)["node_c"][:8] not in room
    rep = _report(out, key)
    assert Counter(names[a["node_id"]] for a in rep["actors"]) == {"node_a": 2, "node_b": 1}
    assert rep["shards_computed"] == 3
    assert_same_as_local(out / key, local_reference)


def names_inv(names: dict) -> dict:
    return {v: k for k, v in names.items()}
