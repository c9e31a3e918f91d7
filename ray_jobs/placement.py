"""Where a model runs: replicas (it fits one node) or block-range stages (it does not).

Sizes come from the weightless skeleton (``ray_jobs.weights``), resources from ``ray.nodes()``.

* **replicas** -- the model (plus its working memory) fits one node: an actor pool, each actor
  one full copy (GPU actors spread a copy over the node's GPUs with Accelerate's
  ``device_map="auto"``), prompts sharded across actors.
* **stages** -- it does not: the ``L`` blocks are cut into ``S`` contiguous stages balanced by
  parameter bytes (embedding counted on the first stage, final norm + unembedding on the
  last), one actor per stage (one GPU, or one node's memory on CPU clusters), all in one
  placement group.  ``S`` is the smallest count whose largest stage fits.

Memory of one worker = weights + working memory + a fixed process overhead.  Working
memory = what one batched JVP/VJP chunk passes through a block (``chunk`` tangents of
``(n, d)`` with ~16 activations of that size each; ``(2, d)`` for the one-token products of
``jacobian: local`` in causal models, the second row standing for the attention over the prefix) and the float32 copy of one block that
bf16/fp16 models are differentiated in (both transient, once) + what is *held* per
layer and prompt until its coupling rows are done: the block's input/output, and the dense
``d x d`` float32 Jacobian per traced token when the SVD is exact (``d <= 2048`` under
``svd: auto``).  A stage holds its layers for every prompt in its pipeline (``in_flight``).
Lower ``chunk`` for very wide models.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from coupling.analysis import ScanSettings
from coupling.svd import resolve_method

GB = 1024 ** 3
PROCESS_OVERHEAD = int(0.5 * GB)   # python + torch + transformers in a worker process
# GPU memory by Ray accelerator type (``accelerator_type:<name>`` resource), in GB.
GPU_MEMORY_GB = {"A10G": 24, "L4": 24, "T4": 16, "V100": 16, "A100": 40, "A100-40G": 40,
                 "A100-80G": 80, "H100": 80, "H200": 141, "L40S": 48, "A40": 48,
                 "RTX6000": 24}
GPU_MEMORY_RESOURCE = "gpu_memory_gb"   # optional custom node resource (node total, GB)


class PlacementError(ValueError):
    """No node (or set of nodes) can hold the model as asked; the message says why."""


@dataclass
class NodeInfo:
    node_id: str
    cpus: float
    gpus: float
    memory: float                    # bytes of Ray's logical "memory" resource
    gpu_memory: float | None = None  # bytes per GPU
    label: str = ""                  # what the plan calls it: node type, or id + custom resources

    @property
    def name(self) -> str:
        return self.label or self.node_id[:8]


@dataclass
class ModelSizes:
    """Parameter bytes of a model's parts in the dtype it will run in."""

    blocks: list           # bytes per block
    embedding: int         # everything before the blocks (first stage)
    head: int              # final norm + unembedding (last stage)
    whole: int             # one full copy (tied weights once)
    d_model: int
    dtype_bytes: int = 4   # bytes per parameter of the dtype the model runs in
    causal: bool = False   # a causal LM: local (one-token) Jacobians apply

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def stage_bytes(self, lo: int, hi: int) -> int:
        return (sum(self.blocks[lo:hi]) + (self.embedding if lo == 0 else 0)
                + (self.head if hi == self.n_layers else 0))


@dataclass
class Placement:
    kind: str                                   # "replicas" | "stages"
    n_actors: int
    ranges: list = field(default_factory=list)  # stages: [(lo, hi), ...] 0-based blocks
    cpus: float = 1
    gpus: float = 0
    memory: int = 0                             # bytes per actor (largest stage)
    stage_memory: list = field(default_factory=list)
    reason: str = ""
    hosts: list = field(default_factory=list)   # replicas: [(node, count)]; stages: node per stage
    device_map: dict | None = None              # GPU replicas: Accelerate's map for one copy
    gpu_budget: int = 0                         # GPU replicas/stages: weight bytes per GPU

    def describe(self) -> str:
        if self.kind == "replicas":
            return f"replicas x{self.n_actors} ({self.reason})"
        spans = ", ".join(f"{lo + 1}-{hi}" for lo, hi in self.ranges)
        return f"stages x{self.n_actors} [blocks {spans}] ({self.reason})"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n_actors": self.n_actors,
                "ranges": [list(r) for r in self.ranges], "cpus": self.cpus, "gpus": self.gpus,
                "memory_bytes": self.memory, "stage_memory_bytes": self.stage_memory,
                "reason": self.reason, "hosts": [list(h) if isinstance(h, tuple) else h
                                                 for h in self.hosts],
                "device_map": self.device_map, "gpu_budget_bytes": self.gpu_budget}


# ------------------------------------------------------------------------------------------
# Cluster resources
# ------------------------------------------------------------------------------------------
def cluster_nodes(gpu_memory_gb: float | None = None, autoscaler_config=None) -> list:
    """Nodes of the connected Ray cluster with their CPUs, GPUs and memory.

    With an autoscaling cluster the GPU workers may not exist yet: the node types of the
    launcher config (``autoscaler_config``: a path, default the head's
    ``~/ray_bootstrap_config.yaml`` when present) count as nodes too, up to their
    ``max_workers`` minus the alive nodes of the same shape; the placement group or the
    pending actors then make the autoscaler launch them.
    """
    import ray

    alive = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        gpus = float(res.get("GPU", 0))
        alive.append(NodeInfo(node["NodeID"], float(res.get("CPU", 0)), gpus,
                              float(res.get("memory", 0)),
                              _gpu_memory(res, gpus, gpu_memory_gb) if gpus else None,
                              _node_label(node["NodeID"], res)))
    path = Path(os.path.expanduser(autoscaler_config or "~/ray_bootstrap_config.yaml"))
    if autoscaler_config is None and not path.exists():
        return alive
    if not path.exists():
        raise ValueError(f"autoscaler_config {path} not found: give the cluster launcher YAML")
    import yaml
    return alive + launchable_nodes(yaml.safe_load(path.read_text()), alive, gpu_memory_gb)


def launchable_nodes(config: dict, alive=(), gpu_memory_gb: float | None = None) -> list:
    """Worker nodes a cluster-launcher config can still add (resources as declared there)."""
    out, budget = [], int(config.get("max_workers", 0))
    head = config.get("head_node_type")
    for name, t in config.get("available_node_types", {}).items():
        if name == head:
            continue
        res = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        running = sum(1 for n in alive if (n.cpus, n.gpus) == (cpus, gpus))
        count = max(0, min(int(t.get("max_workers", budget)), budget) - running)
        gpu_mem = _gpu_memory(res, gpus, gpu_memory_gb) if gpus else None
        out += [NodeInfo(f"{name}#{i}", cpus, gpus, res.get("memory", 0.0), gpu_mem,
                         f"{name} (to launch)") for i in range(count)]
    return out


# Ray's own resources; anything else on a node (node_a, gpu_memory_gb...) names it in the plan
_STANDARD = ("CPU", "GPU", "memory", "object_store_memory", "node:", "accelerator_type:")


def _node_label(node_id: str, res: dict) -> str:
    custom = sorted(k for k in res if not k.startswith(_STANDARD) and k != GPU_MEMORY_RESOURCE)
    return node_id[:8] + (f" [{','.join(custom)}]" if custom else "")


def _gpu_memory(res: dict, gpus: float, override_gb: float | None) -> float | None:
    if override_gb:
        return override_gb * GB
    if res.get(GPU_MEMORY_RESOURCE):
        return float(res[GPU_MEMORY_RESOURCE]) * GB / gpus
    for key in res:
        if key.startswith("accelerator_type:"):
            name = key.split(":", 1)[1]
            if name in GPU_MEMORY_GB:
                return GPU_MEMORY_GB[name] * GB
    return None


# ------------------------------------------------------------------------------------------
# Memory estimates
# ------------------------------------------------------------------------------------------
ACTIVATIONS = 16   # (n, d)-sized tensors a block's forward creates (attention, MLP, norms)


def chunk_memory(sizes: ModelSizes, n_tokens: int, settings: ScanSettings) -> int:
    """One batch of JVP/VJP tangents through one block: ``chunk`` products of ``(tokens, d)``
    with ~16 activations each, ``tokens = 2`` for one-token products (causal model, local
    Jacobians, no token-wise grids; the second row stands for the attention over the prefix)."""
    one_token = (sizes.causal and settings.jacobian == "local"
                 and "tokens" not in settings.measures)
    tokens = 2 if one_token else n_tokens
    return settings.products_per_batch(one_token) * tokens * sizes.d_model * 4 * ACTIVATIONS


def transient_memory(sizes: ModelSizes, n_tokens: int, settings: ScanSettings) -> int:
    """One chunk of batched JVP/VJP tangents through one block, plus the float32 copy of
    that block that bf16/fp16 models are differentiated in."""
    fp32_copy = max(sizes.blocks) * 4 // sizes.dtype_bytes if sizes.dtype_bytes != 4 else 0
    return chunk_memory(sizes, n_tokens, settings) + fp32_copy


def held_memory(n_layers: int, d: int, n_tokens: int, settings: ScanSettings) -> int:
    """What one prompt keeps per layer until its coupling rows are computed: the block's
    input and output, plus the dense Jacobian per traced token on the exact path (matrix-free
    operators are rebuilt, not kept)."""
    held = n_layers * n_tokens * d * 4 * 2
    if resolve_method(settings.svd, d) == "exact":
        targets = n_tokens if settings.token == "all" else 1
        held += n_layers * targets * d * d * 4
    return held


def pipeline_depth(n_stages: int, max_in_flight: int = 2) -> int:
    """Prompts a stage may hold at once: ``lookahead`` (= S) queued ahead of a prompt's
    coupling step + ``max_in_flight`` awaiting collection + the two being worked on."""
    return n_stages + max_in_flight + 2


def replica_memory(sizes: ModelSizes, n_tokens: int, settings: ScanSettings) -> int:
    d = sizes.d_model
    return (sizes.whole + transient_memory(sizes, n_tokens, settings)
            + held_memory(sizes.n_layers, d, n_tokens, settings) + PROCESS_OVERHEAD)


def stage_memory(sizes: ModelSizes, lo: int, hi: int, n_tokens: int,
                 settings: ScanSettings, in_flight: int = 2) -> int:
    """A stage holds its weights and its layers' state for ``in_flight`` prompts."""
    d = sizes.d_model
    return (sizes.stage_bytes(lo, hi) + transient_memory(sizes, n_tokens, settings)
            + held_memory(hi - lo, d, n_tokens, settings) * in_flight + PROCESS_OVERHEAD)


# ------------------------------------------------------------------------------------------
# Balanced contiguous partition
# ------------------------------------------------------------------------------------------
def balanced_ranges(sizes: ModelSizes, n_stages: int) -> list:
    """``n_stages`` contiguous block ranges minimising the largest stage's parameter bytes.

    Exact dynamic programme over cut points, ``O(S L^2)``; every stage gets >= 1 block.
    """
    L = sizes.n_layers
    if not 1 <= n_stages <= L:
        raise PlacementError(f"stages={n_stages} must be between 1 and the model's {L} blocks")
    inf = float("inf")
    # best[s][j]: minimal max-stage bytes covering blocks [0, j) with s stages
    best = [[inf] * (L + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (L + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for j in range(s, L - (n_stages - s) + 1):
            for i in range(s - 1, j):
                cost = max(best[s - 1][i], sizes.stage_bytes(i, j))
                if cost < best[s][j]:
                    best[s][j], cut[s][j] = cost, i
    ranges, j = [], L
    for s in range(n_stages, 0, -1):
        i = cut[s][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


# ------------------------------------------------------------------------------------------
# GPUs of one replica
# ------------------------------------------------------------------------------------------
def gpu_reserve(sizes: ModelSizes, n_tokens: int, settings: ScanSettings) -> int:
    """What every GPU of a replica keeps free besides its weights: one chunk of products
    through a block (+ its float32 copy), the prompt's held layer state (all of it: the
    layers' GPU is not known before the map is made) and the CUDA context."""
    return (transient_memory(sizes, n_tokens, settings)
            + held_memory(sizes.n_layers, sizes.d_model, n_tokens, settings) + PROCESS_OVERHEAD)


def gpus_for_replica(sizes: ModelSizes, budget: float, max_gpus: int) -> int:
    """The fewest GPUs whose ``budget`` bytes (each) hold one copy's weights with no block
    split between GPUs: the fewest contiguous parts whose largest fits (``balanced_ranges``).

    A lower bound for Accelerate's own greedy map (``replica_device_map`` checks it)."""
    if budget <= 0:
        raise PlacementError(f"each GPU's memory is used up by the working memory alone "
                             f"({-budget / GB:.2f} GB short): lower chunk, or bigger GPUs")
    lo = max(1, math.ceil(sizes.whole / budget))
    for g in range(lo, min(max_gpus, sizes.n_layers) + 1):
        ranges = balanced_ranges(sizes, g)
        if max(sizes.stage_bytes(a, b) for a, b in ranges) <= budget:
            return g
    raise PlacementError(f"one copy ({sizes.whole / GB:.3g} GB of weights) does not fit "
                         f"{max_gpus} GPU(s) of {budget / GB:.3g} GB usable each: use "
                         "placement 'stages'")


def accelerate_device_map(skeleton, n_gpus: int, budget: int) -> dict | None:
    """Accelerate's ``infer_auto_device_map`` for ``n_gpus`` GPUs of ``budget`` bytes each,
    blocks never split; None when any part would be offloaded (cpu/disk).  Works on the
    weightless ``meta`` skeleton, so it runs on a CPU-only driver."""
    import logging

    from accelerate import infer_auto_device_map

    from coupling.blocks import find_blocks

    _, blocks = find_blocks(skeleton)
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)        # "Device 1 is not available": true here, irrelevant
    try:
        dmap = infer_auto_device_map(skeleton, max_memory={i: int(budget) for i in range(n_gpus)},
                                     no_split_module_classes=[type(blocks[0]).__name__])
    finally:
        log.setLevel(level)
    return dict(dmap) if all(isinstance(v, int) for v in dmap.values()) else None


def replica_device_map(skeleton, budget: int, first: int, max_gpus: int) -> tuple:
    """``(GPUs, device map)`` of one replica: from ``first`` (``gpus_for_replica``) up, the
    fewest GPUs Accelerate fills without offloading (it also keeps the largest layer's size
    free on GPU 0, so it can need one more than the partition bound)."""
    for g in range(first, max_gpus + 1):
        dmap = accelerate_device_map(skeleton, g, budget)
        if dmap is not None:
            return g, dmap
    raise PlacementError(f"Accelerate cannot fit one copy on {max_gpus} GPU(s) of "
                         f"{budget / GB:.3g} GB usable each: use placement 'stages'")


def device_map_summary(dmap: dict) -> dict:
    """``{gpu: [module names]}`` in model order, for the plan."""
    out: dict = {}
    for name, gpu in dmap.items():
        out.setdefault(gpu, []).append(name)
    return out


# ------------------------------------------------------------------------------------------
# The decision
# ------------------------------------------------------------------------------------------
def plan_placement(sizes: ModelSizes, settings: ScanSettings, n_tokens: int, nodes: list,
                   *, placement: str = "auto", stages: int | None = None,
                   replicas: int | None = None, n_shards: int = 1, cpus_per_actor: float = 1,
                   gpus_per_actor: float | None = None, node_memory_gb: float | None = None,
                   model_name: str = "model") -> Placement:
    """Choose replicas or stages for one model (see the module docstring).

    ``node_memory_gb`` overrides every node's usable memory (CPU workers) or, with GPUs,
    every GPU's memory; ``gpus_per_actor=0`` forces CPU workers.
    """
    if not nodes:
        raise PlacementError("the Ray cluster has no alive nodes")
    use_gpu = gpus_per_actor != 0 and any(n.gpus > 0 for n in nodes)
    devices = _devices(nodes, use_gpu, node_memory_gb, cpus_per_actor)
    if not devices:
        raise PlacementError(f"no node offers {cpus_per_actor} CPU(s) per worker: lower "
                             "cpus_per_actor or add nodes")
    need = replica_memory(sizes, n_tokens, settings)
    if placement == "replicas" or replicas is not None or (
            placement == "auto" and stages is None and _fits_node(need, nodes, use_gpu,
                                                                  node_memory_gb)):
        return _replicas(sizes, need, nodes, use_gpu, node_memory_gb, replicas, n_shards,
                         cpus_per_actor, gpus_per_actor, model_name,
                         gpu_reserve(sizes, n_tokens, settings))
    return _stages(sizes, settings, n_tokens, devices, stages, cpus_per_actor, use_gpu,
                   model_name)


def _devices(nodes, use_gpu, node_memory_gb, cpus_per_actor) -> list:
    """One entry per slot a stage can take: ``(node, bytes, stages it can run)``; one per GPU
    (one stage each), or one per node (CPU clusters: as many stages as its memory and its
    CPUs allow)."""
    out = []
    for n in nodes:
        if use_gpu:
            mem = node_memory_gb * GB if node_memory_gb else n.gpu_memory
            if n.gpus and mem is None:
                raise PlacementError(f"cannot tell the GPU memory of node {n.node_id[:8]}: set "
                                     "gpu_memory_gb in the config, or give the node a "
                                     f"'{GPU_MEMORY_RESOURCE}' resource (cluster.yaml)")
            out += [(n.name, mem, 1)] * int(n.gpus)
        elif n.cpus >= cpus_per_actor:
            out.append((n.name, node_memory_gb * GB if node_memory_gb else n.memory,
                        int(n.cpus // cpus_per_actor)))
    return out


def _node_capacity(n: NodeInfo, use_gpu, node_memory_gb) -> float:
    if use_gpu:
        per = node_memory_gb * GB if node_memory_gb else (n.gpu_memory or 0)
        return per * n.gpus
    return node_memory_gb * GB if node_memory_gb else n.memory


def _fits_node(need, nodes, use_gpu, node_memory_gb) -> bool:
    return any(_node_capacity(n, use_gpu, node_memory_gb) >= need for n in nodes)


def _replicas(sizes, need, nodes, use_gpu, node_memory_gb, forced, n_shards, cpus, gpus_opt,
              name, reserve=0) -> Placement:
    gpus, budget = 0, 0
    if use_gpu:
        # GPUs per replica: enough on every node that can hold a copy at all (conservative
        # when GPU sizes differ: a copy never lands on too little memory); blocks are never
        # split between GPUs, and every GPU keeps ``reserve`` free for the working memory
        fit = [n for n in nodes if _node_capacity(n, True, node_memory_gb) >= need]
        per_gpu = lambda n: node_memory_gb * GB if node_memory_gb else n.gpu_memory  # noqa
        budget = int(min((per_gpu(n) for n in fit), default=0) - reserve)
        most = int(max((n.gpus for n in fit), default=0))
        gpus = gpus_opt or (gpus_for_replica(sizes, budget, most) if fit else 1)
        per_node = [int(n.gpus // gpus) if n in fit else 0 for n in nodes]
    else:
        cap = lambda n: node_memory_gb * GB if node_memory_gb else n.memory  # noqa: E731
        per_node = [int(min(n.cpus // cpus, cap(n) // need)) for n in nodes]
    slots = sum(per_node)
    if slots == 0:
        best = max(_node_capacity(n, use_gpu, node_memory_gb) for n in nodes)
        raise PlacementError(f"{name} needs {need / GB:.2f} GB per replica but the largest node "
                             f"offers {best / GB:.2f} GB: use placement 'stages' (or auto)")
    n = min(slots, forced or slots, max(1, n_shards))
    if forced and forced > slots:
        raise PlacementError(f"replicas={forced} asked, but the cluster holds at most {slots} "
                             f"replicas of {name} ({need / GB:.2f} GB, {cpus} CPU each)")
    why = f"{need / GB:.2f} GB per copy fits one node" if not forced else "forced by config"
    return Placement("replicas", n, [], cpus, gpus, need if not use_gpu else 0, [need], why,
                     hosts=_group_hosts(nodes, per_node), gpu_budget=max(budget, 0))


def _group_hosts(nodes, per_node) -> list:
    """``[(node or node type, replicas it can hold, how many such nodes)]``; launchable nodes
    of one type are one row."""
    rows: dict = {}
    for node, k in zip(nodes, per_node):
        if k:
            key = (node.name, k)
            rows[key] = rows.get(key, 0) + 1
    return [(label, k, count) for (label, k), count in rows.items()]


def _stages(sizes, settings, n_tokens, devices, forced, cpus, use_gpu, name) -> Placement:
    biggest = max(d[1] for d in devices)
    counts = [forced] if forced else range(1, sizes.n_layers + 1)
    for S in counts:
        ranges = balanced_ranges(sizes, S)
        mems = [stage_memory(sizes, lo, hi, n_tokens, settings, pipeline_depth(S))
                for lo, hi in ranges]
        if max(mems) <= biggest:
            break
    else:
        if forced:
            raise PlacementError(f"{name} with stages={forced}: the largest stage needs "
                                 f"{max(mems) / GB:.3g} GB, more than any node/GPU offers "
                                 f"({biggest / GB:.3g} GB): use more stages")
        L = sizes.n_layers
        one = min(stage_memory(sizes, i, i + 1, n_tokens, settings, pipeline_depth(L))
                  for i in range(L))
        raise PlacementError(
            f"{name} cannot be placed: even split into {sizes.n_layers} one-block stages its "
            f"smallest stage needs {one / GB:.3g} GB and the largest node/GPU offers "
            f"{biggest / GB:.3g} GB (node_memory_gb / gpu_memory_gb, or bigger nodes)")
    hosts = _can_host(mems, devices, cpus, use_gpu)
    if hosts is None:
        raise PlacementError(f"{name} needs {S} stages of up to {max(mems) / GB:.3g} GB but the "
                             f"cluster has {len(devices)} {'GPUs' if use_gpu else 'nodes'} "
                             "able to host them: add nodes")
    why = "forced by config" if forced else \
        f"{sizes.whole / GB:.3g} GB of weights need {S} stage(s)"
    return Placement("stages", S, ranges, cpus, 1 if use_gpu else 0,
                     0 if use_gpu else max(mems), mems, why, hosts=hosts)


def _can_host(mems, devices, cpus, use_gpu) -> list | None:
    """Greedy first-fit of stage memories into devices, largest stage first, each device
    taking as many stages as its memory and its stage count allow; returns the node each
    stage would land on, or None when they do not all fit."""
    free = [[mem, slots, node] for node, mem, slots in sorted(devices, key=lambda d: -d[1])]
    hosts = [None] * len(mems)
    for s in sorted(range(len(mems)), key=lambda i: -mems[i]):
        for slot in free:
            if slot[1] > 0 and slot[0] >= mems[s]:
                slot[0] -= mems[s]
                slot[1] -= 1
                hosts[s] = slot[2]
                break
        else:
            return None
    return hosts


# ------------------------------------------------------------------------------------------
# The plan, as printed before any actor starts
# ------------------------------------------------------------------------------------------
def format_plan(key: str, p: Placement, sizes: ModelSizes) -> str:
    """Lines saying where ``key`` runs: replicas or stages, on which nodes or node types,
    the memory and resources of each actor (and each GPU's modules for GPU replicas)."""
    res = f"{p.cpus:g} CPU" + (f" + {p.gpus:g} GPU" if p.gpus else "")
    if p.kind == "replicas":
        lines = [f"plan {key}: replicas x{p.n_actors}, {res} and {_size(p.stage_memory[0])} "
                 f"each ({p.reason})"]
        lines += [f"    {label}: room for {k} replica(s)" + (f", x{count} nodes" if count > 1
                                                             else "")
                  for label, k, count in p.hosts]
        if p.device_map:
            lines.append(f"    one copy over {p.gpus:g} GPU(s), {_size(p.gpu_budget)} of "
                         "weights each at most (Accelerate device map):")
            lines += [f"      GPU {gpu}: {_compact(names) or 'the whole model'}"
                      for gpu, names in device_map_summary(p.device_map).items()]
        return "\n".join(lines)
    lines = [f"plan {key}: stages x{p.n_actors}, {res} each ({p.reason})"]
    for i, ((lo, hi), mem) in enumerate(zip(p.ranges, p.stage_memory)):
        ends = (" + embedding" if lo == 0 else "") + (" + head" if hi == sizes.n_layers else "")
        host = f" -> {p.hosts[i]}" if i < len(p.hosts) and p.hosts[i] else ""
        lines.append(f"    stage {i + 1}: blocks {lo + 1}-{hi}{ends}, weights "
                     f"{_size(sizes.stage_bytes(lo, hi))}, {_size(mem)} in all{host}")
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1024 ** 2:.2f} MB"


def _compact(names: list) -> str:
    """``model.layers.3, model.layers.4, model.layers.5`` -> ``model.layers.3-5``."""
    out, run = [], None          # run: [prefix, first, last]
    for name in names:
        prefix, _, idx = name.rpartition(".")
        if idx.isdigit() and run and run[0] == prefix and int(idx) == run[2] + 1:
            run[2] = int(idx)
            continue
        if run:
            out.append(f"{run[0]}.{run[1]}" + (f"-{run[2]}" if run[2] != run[1] else ""))
            run = None
        if idx.isdigit():
            run = [prefix, int(idx), int(idx)]
        else:
            out.append(name)
    if run:
        out.append(f"{run[0]}.{run[1]}" + (f"-{run[2]}" if run[2] != run[1] else ""))
    return ", ".join(out)
