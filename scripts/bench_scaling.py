"""Throughput of the distributed scan with 1 and 2 workers here, and the 70B plan on paper.

    python scripts/bench_scaling.py                     # local Ray on 127.0.0.1, 2 CPUs
    python scripts/bench_scaling.py --d 128 --layers 6 --prompts 16 --json runs/bench.json

Measured: prompts/s of replica placement with 1 and 2 actors, and of a 2-stage pipeline,
on a random GPT-2 (``--d``, ``--layers``; the tiny tokenizer's vocabulary), counted from the
first shard after the actors are ready (actor start-up -- a fresh Python importing torch and
transformers -- is reported separately as wall time).  The single-process local scan is the
baseline.

On paper: ``ray_jobs.placement`` planning Llama-2-70B (bf16, 80 blocks, d=8192) on eight
24 GB GPU nodes, memory per stage and bytes moved per prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(args) -> dict:
    import ray
    from transformers import AutoTokenizer

    from coupling.model.loading import TINY_MODEL_DIR
    from coupling.model.zoo import save_random, small_config
    from coupling.scan import scan
    from ray_jobs.config import parse_config
    from ray_jobs.connect import ray_env
    from ray_jobs.scan import run_scan

    ray_env()
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR / "checkpoints" / "step-0")
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    model = save_random(small_config("gpt2", n_layers=args.layers, d=args.d, heads=4,
                                     vocab=len(tok), max_pos=128), work / "model",
                        tokenizer=tok)
    keys = dict(prompts="builtin", max_prompts=args.prompts, max_tokens=args.tokens, k=args.k,
                figures=False, measures="depth,regularity", threads=1)
    t0 = time.perf_counter()
    scan(model, out=str(work / "local"), progress=False, **keys)
    local_s = time.perf_counter() - t0
    runs = {"local (1 process)": {"prompts_per_s": args.prompts / local_s, "wall_s": local_s,
                                  "workers": 1}}
    ray.init(address=args.address, num_cpus=None if args.address else 2,
             include_dashboard=False, log_to_driver=False,
             **({} if args.address else {"_node_ip_address": "127.0.0.1"}))
    try:
        for name, extra, workers in (("replicas x1", {"replicas": 1}, 1),
                                     ("replicas x2", {"replicas": 2}, 2),
                                     ("stages x2 (pipeline)", {"stages": 2}, 2)):
            cfg = parse_config({"models": [{"path": model}], **keys,
                                "shard_size": args.shard_size, **extra},
                               out=str(work / f"{name.split()[0]}{workers}"))
            t0 = time.perf_counter()
            rep = run_scan(cfg, progress=False)["models"][cfg.jobs[0].key]
            runs[name] = {"prompts_per_s": rep["prompts_per_s"], "workers": workers,
                          "wall_s": time.perf_counter() - t0}
            print(f"{name:24s} {rep['prompts_per_s']:.2f} prompts/s", file=sys.stderr)
    finally:
        ray.shutdown()
    base = runs["replicas x1"]["prompts_per_s"]
    for r in runs.values():
        r["speedup_vs_1_worker"] = r["prompts_per_s"] / base
    return {"model": f"gpt2 random, {args.layers} blocks, d={args.d}", "prompts": args.prompts,
            "max_tokens": args.tokens, "k": args.k, "cpus": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0], "runs": runs}


# ------------------------------------------------------------------------------------------
# On paper: Llama-2-70B over 8 nodes
# ------------------------------------------------------------------------------------------
def llama_sizes(n_layers=80, d=8192, ffn=28672, heads=64, kv_heads=8, vocab=32000, nbytes=2):
    from ray_jobs.sizing import ModelSizes

    block = (2 * d * d + 2 * d * d * kv_heads // heads + 3 * d * ffn + 2 * d) * nbytes
    emb = vocab * d * nbytes
    head = (vocab * d + d) * nbytes
    return ModelSizes([block] * n_layers, emb, head, block * n_layers + emb + head, d, nbytes,
                      causal=True)


def on_paper(n_tokens=256, k=10, nodes=8, gpu_gb=24) -> dict:
    from coupling.settings.scan_settings import ScanSettings
    from ray_jobs.placement import NodeInfo, plan_placement
    from ray_jobs.sizing import GB, chunk_memory, held_memory, pipeline_depth

    sizes = llama_sizes()
    s = ScanSettings(k=k, svd="lanczos")     # one-token products, 128 per batch
    gpus = [NodeInfo(f"n{i}", 4, 1, 16 * GB, gpu_gb * GB) for i in range(nodes)]
    p = plan_placement(sizes, s, n_tokens, gpus, stages=nodes)
    L, d, S, n = sizes.n_layers, sizes.d_model, nodes, n_tokens
    per_stage = [{"blocks": f"{lo + 1}-{hi}",
                  "weights_gib": sizes.stage_bytes(lo, hi) / GB,
                  "fp32_block_copy_gib": max(sizes.blocks) * 4 / sizes.dtype_bytes / GB,
                  "jvp_chunk_gib": chunk_memory(sizes, n, s) / GB,
                  "held_gib": held_memory(hi - lo, d, n, s) * pipeline_depth(S) / GB,
                  "total_gib": m / GB}
                 for (lo, hi), m in zip(p.ranges, p.stage_memory)]
    hidden = n * d * sizes.dtype_bytes                  # one stage boundary, model dtype
    factors_set = L * d * k * 2 * 4                     # U and V, float32, every layer
    traj = (L - L // S) * n * d * sizes.dtype_bytes     # other stages' slices -> last stage
    # each stage's L/S layers of factors go to the S-1 other stages
    moved = {"hidden_states_MB": (S - 1) * hidden / 1e6,
             "singular_vectors_one_set_MB": factors_set / 1e6,
             "singular_vectors_broadcast_MB": factors_set * (S - 1) / 1e6,
             "trajectory_to_last_stage_MB": traj / 1e6}
    moved["total_MB"] = moved["hidden_states_MB"] + moved["singular_vectors_broadcast_MB"] \
        + moved["trajectory_to_last_stage_MB"]
    params = sum(sizes.blocks) / 2 + (sizes.embedding + sizes.head) / 2
    return {"model": "Llama-2-70B (bf16)", "params_b": params / 1e9,
            "weights_gib": sizes.whole / GB,
            "nodes": f"{nodes} x {gpu_gb} GB GPU", "n_tokens": n, "k": k, "stages": per_stage,
            "bytes_per_prompt": moved}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=2)
    ap.add_argument("--address", help="existing Ray cluster (default: a local one, 2 CPUs)")
    ap.add_argument("--paper-only", action="store_true")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    out = {"paper": on_paper()}
    if not args.paper_only:
        out["measured"] = measure(args)
        print("\n| run | workers | prompts/s | vs 1 worker | wall s (incl. actor start) |")
        print("|---|---|---|---|---|")
        for name, r in out["measured"]["runs"].items():
            print(f"| {name} | {r['workers']} | {r['prompts_per_s']:.2f} | "
                  f"{r['speedup_vs_1_worker']:.2f} | {r['wall_s']:.1f} |")
    paper = out["paper"]
    print(f"\n{paper['model']}: {paper['params_b']:.1f}B params, {paper['weights_gib']:.1f} GiB, "
          f"on {paper['nodes']}, n={paper['n_tokens']} tokens, K={paper['k']}")
    print("| stage | blocks | weights GiB | fp32 block copy | JVP chunk | held | total GiB |")
    print("|---|---|---|---|---|---|---|")
    for i, st in enumerate(paper["stages"]):
        print(f"| {i} | {st['blocks']} | {st['weights_gib']:.2f} | {st['fp32_block_copy_gib']:.2f}"
              f" | {st['jvp_chunk_gib']:.2f} | {st['held_gib']:.2f} | {st['total_gib']:.2f} |")
    for key, v in paper["bytes_per_prompt"].items():
        print(f"  {key:34s} {v:9.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
