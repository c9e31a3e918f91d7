"""Memory against depth: the depth-streaming scan of a Llama-7B-shaped model on a small machine.

Benchmarks to run by hand (results and commands in BENCHMARKS.md), never in the tests:

``build OUT [--layers 32]``
    a random Llama-7B-shaped bf16 model (d = 4096, 32/8 heads, ffn 11008, vocab 32000)
    written to disk TENSOR BY TENSOR: one safetensors shard per block plus one for the
    embedding, final norm and head, and the shard index.  Never more than one block in memory.
``depths OUT --depths 2,4,8,16,32 --results DIR``
    for each depth a folder of symlinks to the first N blocks' shards (and a config saying N),
    scanned with ``coupling scan --weights disk`` in a fresh process: one ~64-token prompt,
    K = 10, depth-wise coupling and regularity.  Records the scan's measured host peak
    (``VmHWM`` from the scan's start), the child's whole-process peak (``ru_maxrss``,
    interpreter included), the prediction and the wall time; ``DIR/depths.json`` and a figure.
``authors OUT --results DIR [--vjps 256]``
    time per block at d = 4096 of the authors' method (d full-prompt VJPs + full SVD):
    ``--vjps`` full-prompt VJPs measured and scaled to d, one full SVD of a d x d matrix
    measured; against this package's per-block time on the same block.  EXTRAPOLATED, said so.
``plan70b --results DIR``
    the 70B case on paper: the planner's prediction for a Llama-70B shape (80 blocks,
    d = 8192, GQA 64/8, ffn 28672, vocab 128256) in disk mode, and the disk reading time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
SHAPE_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
# one prompt of ~64 tokens with the packaged tokenizer (the tiny model's, 1024 ids < 32000)
PROMPT = ("The river rises in the mountains, runs through three countries and a dozen cities, "
          "and carries the snow of the high valleys down to the sea, where the old port still "
          "keeps the ships that once brought salt, wool and news from the far side of the world.")


def llama_config(n_layers: int, shape: dict = SHAPE_7B):
    import transformers as tf

    return tf.LlamaConfig(num_hidden_layers=n_layers, architectures=["LlamaForCausalLM"],
                          dtype="bfloat16", **shape)


# ------------------------------------------------------------------------------------------
# build: tensor by tensor
# ------------------------------------------------------------------------------------------
def build(out: Path, n_layers: int, seed: int = 0):
    """Random weights shard by shard (one block at a time) into ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from coupling.model.loading import TINY_MODEL_DIR
    from coupling.model.weights import INDEX_FILE, build_skeleton, model_layout

    out.mkdir(parents=True, exist_ok=False)
    config = llama_config(n_layers)
    skeleton = build_skeleton(config, "bfloat16")
    layout = model_layout(skeleton)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters(remove_duplicate=False)}
    gen = torch.Generator().manual_seed(seed)
    groups = [("rest", layout.embedding + layout.final_norm + layout.head)] + \
        [(f"block{i:03d}", names) for i, names in enumerate(layout.blocks)]
    weight_map, t0 = {}, time.time()
    for tag, names in groups:
        # norms at 1, every matrix N(0, 0.02^2) as Hugging Face initialises Llama
        tensors = {n: (torch.ones(shapes[n]) if len(shapes[n]) == 1 else
                       torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)
                   for n in names}
        fname = f"model-{tag}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del tensors
        print(f"{tag}: {len(names)} tensors, {time.time() - t0:.0f} s, "
              f"rss {peak_rss() / 1e9:.2f} GB", flush=True)
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY_MODEL_DIR).save_pretrained(out)


def depth_view(model: Path, n: int, root: Path) -> Path:
    """A folder of symlinks: the first ``n`` blocks of ``model`` and its other tensors."""
    from coupling.model.weights import INDEX_FILE

    view = root / f"l{n}"
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    index = json.loads((model / INDEX_FILE).read_text())["weight_map"]
    keep = {k: f for k, f in index.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
    for f in set(keep.values()):
        (view / f).symlink_to(model / f)
    (view / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    llama_config(n).save_pretrained(view)
    for f in model.glob("tokenizer*"):
        shutil.copy(f, view / f.name)
    return view


# ------------------------------------------------------------------------------------------
# depths: one scan per depth, each in a fresh process
# ------------------------------------------------------------------------------------------
def scan_once(view: Path, results: Path, weights: str, threads: int, svd: str = "auto") -> dict:
    prompts = results / "prompt.jsonl"
    prompts.write_text(json.dumps({"id": "river", "text": PROMPT}) + "\n")
    out = results / f"scan-{view.name}-{weights}"
    cmd = [sys.executable, "-m", "coupling.cli", "scan", "--model", str(view), "--dtype",
           "bfloat16", "--weights", weights, "--prompts", str(prompts), "--k", "10",
           "--no-figures", "--threads", str(threads), "--svd", svd, "--out", str(out),
           "--overwrite"]
    t0 = time.time()
    proc, child_peak = run_child(cmd)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    manifest = json.loads((out / "manifest.json").read_text())
    mem = manifest["memory"]
    row = {"blocks": int(view.name[1:]), "weights": weights, "wall_s": wall,
           "analysis_s": manifest["timings"]["analysis_s"], "load_s": manifest["timings"]["load_s"],
           "scan_peak_gb": mem["host_peak_bytes"] / 1e9,
           "process_peak_gb": child_peak / 1e9,
           "predicted_peak_gb": mem.get("predicted_peak_bytes", 0) / 1e9,
           "baseline_gb": mem.get("baseline_bytes", 0) / 1e9,
           "svd": svd, "cmd": " ".join(cmd[1:]), "stdout": proc.stdout.strip().splitlines()[-4:]}
    print(json.dumps(row), flush=True)
    return row


def run_child(cmd: list) -> tuple:
    """``(completed process, its own peak resident bytes)``: ``wait4`` gives this child's
    ``ru_maxrss`` alone (``RUSAGE_CHILDREN`` would be the largest of every child so far)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        out, err = _drain(p)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), usage.ru_maxrss * 1024


def _drain(p: subprocess.Popen) -> tuple:
    """stdout and stderr read to their end without reaping the child (threads: no deadlock
    when one pipe fills while the other is read)."""
    import threading

    box = {}
    readers = [threading.Thread(target=lambda k=k, f=f: box.__setitem__(k, f.read()))
               for k, f in (("out", p.stdout), ("err", p.stderr))]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    return box["out"], box["err"]


def depths(model: Path, ns: list, results: Path, threads: int, svd: str, weights: str = "disk"):
    """One scan per depth in ``weights`` mode; rows kept in ``depths.json`` by (depth, mode)."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / "depths.json"
    for n in ns:
        row = scan_once(depth_view(model, n, results / "views"), results, weights, threads, svd)
        done = json.loads(path.read_text()) if path.exists() else []
        done = [r for r in done if (r["blocks"], r["weights"]) != (n, weights)] + [row]
        path.write_text(json.dumps(sorted(done, key=lambda r: (r["weights"], r["blocks"])),
                                   indent=1))
        figure(done, ROOT / "docs" / "benchmarks" / "memory_vs_depth.png")


def figure(rows: list, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for mode, color in (("disk", "C0"), ("memory", "C1")):
        mine = sorted((r for r in rows if r["weights"] == mode), key=lambda r: r["blocks"])
        if not mine:
            continue
        n = [r["blocks"] for r in mine]
        ax.plot(n, [r["scan_peak_gb"] for r in mine], "o-", color=color,
                label=f"--weights {mode}: measured host peak")
        ax.plot(n, [r["predicted_peak_gb"] for r in mine], "s--", color=color, alpha=0.6,
                label=f"--weights {mode}: predicted (--dry-run)")
    n = sorted({r["blocks"] for r in rows})
    ax.plot(n, [1.09 * k + 0.5 for k in n], ":", color="grey",
            label="before streaming: ~1.09 GB/block (issue #21)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(k) for k in n])
    ax.set_ylim(0, max(16, max(r["scan_peak_gb"] for r in rows) * 1.3))
    ax.set_xlabel("blocks (Llama-7B shape, d = 4096, bf16)")
    ax.set_ylabel("peak resident memory (GB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"figure {path}")


# ------------------------------------------------------------------------------------------
# authors: d full-prompt VJPs + full SVD on one d = 4096 block, EXTRAPOLATED from a few hundred
# ------------------------------------------------------------------------------------------
def authors(model: Path, results: Path, vjps: int, threads: int, layer: int = 2):
    import torch

    from coupling.analysis.depth_passes import couple_layers, decompose_layers, holder
    from coupling.analysis.steps import layer_function
    from coupling.model.block_range import StreamedModel
    from coupling.settings.scan_settings import ScanSettings

    torch.set_num_threads(threads)
    results.mkdir(parents=True, exist_ok=True)
    view = depth_view(model, 4, results / "views")
    lm = StreamedModel(view, dtype="bfloat16")
    ids = torch.as_tensor(lm.tokenizer(PROMPT)["input_ids"])[None]
    record = lm.forward(ids)
    n, d = record.n_tokens, record.hidden_states.shape[-1]
    settings = ScanSettings(k=10)
    hold = holder(lm.blocks, settings)
    t0 = time.perf_counter()          # ours: both passes on this block (all 4 blocks' factors)
    kept, factors = decompose_layers(record, range(1, 5), settings, lm.model, hold)
    t_pass1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    couple_layers(record, range(1, 5), kept, [factors], settings, lm.model, hold)
    ours = {"pass1_per_block_s": t_pass1 / 4, "pass2_per_block_s": (time.perf_counter() - t0) / 4}
    with lm.blocks.hold(layer, torch.float32):      # theirs: full-prompt VJPs on block `layer`
        f = layer_function(record, layer, settings, lm.model)
        X = record.call(layer).input.float()
        _vjps(f, X, n - 1, 32)                      # warm-up
        t0 = time.perf_counter()
        _vjps(f, X, n - 1, vjps)
        per_vjp = (time.perf_counter() - t0) / vjps
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    torch.linalg.svd(A, full_matrices=False)
    svd_s = time.perf_counter() - t0
    row = {"d": d, "n_tokens": n, "threads": threads, "vjps_measured": vjps,
           "per_vjp_s": per_vjp, "full_svd_s": svd_s,
           "authors_per_block_s_EXTRAPOLATED": per_vjp * d + svd_s,
           **ours, "ours_per_block_s": ours["pass1_per_block_s"] + ours["pass2_per_block_s"]}
    row["ratio_EXTRAPOLATED"] = row["authors_per_block_s_EXTRAPOLATED"] / row["ours_per_block_s"]
    print(json.dumps(row), flush=True)
    (results / "authors.json").write_text(json.dumps(row, indent=1))


def _vjps(f, X, t, count: int, chunk: int = 32):
    """``count`` full-prompt VJPs ``e_i^T J_{t,t}`` of ``f`` (rows i < count), ``chunk`` at a
    time through one vmapped backward, as the authors' method takes all ``d`` of them."""
    import torch

    x = X.detach().requires_grad_(True)
    y = f(x)
    for start in range(0, count, chunk):
        B = min(chunk, count - start)
        cot = torch.zeros(B, *y.shape, dtype=y.dtype)
        cot[torch.arange(B), 0, t, torch.arange(start, start + B)] = 1.0
        (g,) = torch.autograd.grad(y, x, cot, retain_graph=True, is_grads_batched=True)
        del g


# ------------------------------------------------------------------------------------------
# plan70b: on paper
# ------------------------------------------------------------------------------------------
def plan70b(results: Path, n_tokens: int = 64):
    """The planner (``coupling.analysis.memory_plan.plan``) on a Llama-70B shape: the CPU of a
    24 GB machine, one H200 (141 GB, 139 GB taken as free after the CUDA context) and one
    24 GB GPU (22 GB free), each with the mode ``auto`` picks; and the disk reading time."""
    from coupling.analysis.memory_plan import MemoryPlanError, ParamCounts, plan
    from coupling.model.weights import build_skeleton
    from coupling.settings.scan_settings import ScanSettings

    config = llama_config(80, SHAPE_70B)
    skel = build_skeleton(config, "bfloat16")
    blocks = [sum(p.numel() for p in b.parameters()) for b in skel.model.layers]
    total = sum(p.numel() for p in skel.parameters())
    sizes = ParamCounts(blocks, total - sum(blocks), skel.model.embed_tokens.weight.numel(),
                       8192, 128256, 28672, 64, disk_bytes=2 * total, disk_params=total)
    settings = ScanSettings(k=10)
    out = {"n_params": total, "block_params": blocks[0], "bf16_weights_gb": 2 * total / 1e9}
    baseline = int(0.47e9)            # the interpreter, as measured at 7B (depths.json)
    cases = {"cpu, 24 GB machine": dict(available=int(22e9)),
             "H200 (139 GB free)": dict(available=int(22e9), device="cuda",
                                        device_available=int(139e9)),
             "24 GB GPU (22 GB free)": dict(available=int(22e9), device="cuda",
                                            device_available=int(22e9))}
    for name, kw in cases.items():
        for weights in ("auto", "memory", "disk"):
            try:
                p = plan(sizes, "bfloat16", settings, n_tokens, weights, baseline=baseline, **kw)
                row = {"mode": p.mode, "reason": p.reason, "host_peak_gb": p.peak_bytes / 1e9,
                       "host_parts_gb": {k: v / 1e9 for k, v in p.parts.items()}}
                if p.device_parts is not None:
                    row.update(device_peak_gb=p.device_peak_bytes / 1e9,
                               device_parts_gb={k: v / 1e9 for k, v in p.device_parts.items()})
            except MemoryPlanError as e:
                row = {"refused": str(e)}
            out[f"{name}, --weights {weights}"] = row
    read = 3 * 2 * sum(blocks)     # bytes per prompt: each block read 3 times (fwd, pass 1, 2)
    out["disk_read_gb_per_prompt"] = read / 1e9
    out["read_time_s"] = {f"{bw} GB/s": read / 1e9 / bw for bw in (0.5, 2.0, 7.0, 25.0)}
    print(json.dumps(out, indent=1))
    results.mkdir(parents=True, exist_ok=True)
    (results / "plan70b.json").write_text(json.dumps(out, indent=1))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--layers", type=int, default=32)
    for name in ("depths", "authors"):
        q = sub.add_parser(name)
        q.add_argument("model", type=Path)
        q.add_argument("--results", type=Path, required=True)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--depths", default="2,4,8,16,32")
        q.add_argument("--vjps", type=int, default=256)
        q.add_argument("--svd", default="auto")
        q.add_argument("--weights", default="disk", choices=("disk", "memory"))
    q = sub.add_parser("plan70b")
    q.add_argument("--results", type=Path, required=True)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.cmd == "build":
        build(a.out, a.layers)
    elif a.cmd == "depths":
        depths(a.model, [int(x) for x in a.depths.split(",")], a.results, a.threads, a.svd,
               a.weights)
    elif a.cmd == "authors":
        authors(a.model, a.results, a.vjps, a.threads)
    else:
        plan70b(a.results)


if __name__ == "__main__":
    main()
