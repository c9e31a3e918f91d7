"""Parallel efficiency of replica workers over several Ray nodes on one machine.

    python scripts/bench_ray_nodes.py                          # 1, 2, 4 workers, sleep-bound
    python scripts/bench_ray_nodes.py --sleep 0 --prompts 24   # compute-bound: the 2 cores

A ``ray.cluster_utils.Cluster`` on 127.0.0.1: a head with no CPUs (the driver attaches there)
and 4 worker nodes of 1 CPU each (custom resources ``node_0`` ... ``node_3``).  The scan is
the real ``ray_jobs.scan.run_scan`` (shards, actor pool, result store, reduce) of a random
4-block GPT-2 (d=32, tiny tokenizer); each replica's ``run`` also sleeps ``--sleep`` s per
prompt.  Sleep-bound, the work of N replicas overlaps on any number of cores, so the
efficiency measures the scheduler and the driver (shard dispatch, result transfer, writing
shards), not the machine's 2 cores; with ``--sleep 0`` the analysis itself is the work and
the 2 cores cap the speed-up at 2.

Measured: prompts/s from the first shard after every actor is ready to the last shard (the
report's ``prompts_per_s``; actor start-up excluded), efficiency = rate(N) / (N x rate(1)).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(work: Path) -> str:
    from transformers import AutoTokenizer

    from coupling.model.loading import TINY_MODEL_DIR
    from coupling.model.zoo import save_random, small_config

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR / "checkpoints" / "step-0")
    return save_random(small_config("gpt2", n_layers=4, d=32, vocab=len(tok), max_pos=64),
                       work / "gpt2-4", seed=3, tokenizer=tok)


def start_cluster(temp: str, n_nodes: int):
    from ray.cluster_utils import Cluster

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ray_fixtures import free_port

    cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
        num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=False,
        gcs_server_port=free_port(), temp_dir=temp))
    for i in range(n_nodes):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", memory=2 * 1024 ** 3,
                         resources={f"node_{i}": 1})
    return cluster


def measure(args, model: str, work: Path) -> list:
    from ray_jobs.actors import ReplicaWorker
    from ray_jobs.config import parse_config
    from ray_jobs.scan import run_scan

    delay = args.sleep

    class SleepReplica(ReplicaWorker):
        """The real analysis, then ``delay`` s per prompt (waiting on I/O, say)."""

        def run(self, spec, shard):
            out = super().run(spec, shard)
            time.sleep(delay * len(shard))
            return out

    keys = dict(prompts="builtin", max_prompts=args.prompts, max_tokens=16, k=4, figures=False,
                measures="depth", threads=1, shard_size=args.shard_size)
    rows = []
    for n in args.workers:
        cfg = parse_config({"models": [{"path": model}], **keys, "replicas": n},
                           out=str(work / f"w{n}"))
        t0 = time.perf_counter()
        rep = run_scan(cfg, progress=False, workers={"replica": SleepReplica})
        wall = time.perf_counter() - t0
        m = next(iter(rep["models"].values()))
        nodes = sorted({a["node_id"][:8] for a in m["actors"]})
        rows.append({"workers": n, "prompts_per_s": m["prompts_per_s"], "seconds": m["seconds"],
                     "wall_s": wall, "nodes": len(nodes)})
        print(f"  {n} worker(s) on {len(nodes)} node(s): {m['prompts_per_s']:.2f} prompts/s "
              f"({m['seconds']:.1f} s with actor start-up; run_scan {wall:.1f} s)", flush=True)
    base = rows[0]["prompts_per_s"] / rows[0]["workers"]
    for r in rows:
        r["speedup"] = r["prompts_per_s"] / rows[0]["prompts_per_s"]
        r["efficiency"] = r["prompts_per_s"] / (r["workers"] * base)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=2, dest="shard_size")
    p.add_argument("--sleep", type=float, default=0.5, help="seconds per prompt in each replica")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    import ray

    from ray_jobs.connect import ray_env

    ray_env()
    work = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    cluster = None
    try:
        model = build_model(work)
        cluster = start_cluster(temp, max(args.workers))
        ray.init(address=cluster.address, log_to_driver=False)
        print(f"# bench_ray_nodes: {max(args.workers)} worker nodes x 1 CPU, {args.prompts} "
              f"prompts, shard {args.shard_size}, sleep {args.sleep} s/prompt", flush=True)
        rows = measure(args, model, work)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
    print("| workers | nodes used | prompts/s | speed-up | efficiency |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['nodes']} | {r['prompts_per_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['efficiency']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
