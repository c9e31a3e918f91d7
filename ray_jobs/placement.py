"""Where a model runs: replicas (it fits one node) or block-range stages (it does not).

Sizes come from the weightless skeleton (``coupling.model.weights``), resources from
``ray.nodes()``.

* **replicas** -- the model (plus its working memory) fits one node: an actor pool, each actor
  one full copy (GPU actors spread a copy over the node's GPUs with Accelerate's
  ``device_map="auto"``), prompts sharded across actors.
* **stages** -- it does not: the ``L`` blocks are cut into ``S`` contiguous stages balanced by
  parameter bytes (embedding counted on the first stage, final norm + unembedding on the
  last), one actor per stage (one GPU, or one node's memory on CPU clusters), all in one
  placement group.  ``S`` is the smallest count whose largest stage fits.

The numbers these choices rest on (worker memory, balanced block ranges, GPUs and the device
map of one replica) are in :mod:`ray_jobs.sizing`.
Here: the nodes of the cluster, the decision (:func:`plan_placement`) and the plan as printed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from coupling.settings.scan_settings import ScanSettings
from ray_jobs.sizing import (GB, ModelSizes, PlacementError, balanced_ranges, device_map_summary,
                             gpu_reserve, gpus_for_replica, pipeline_depth, replica_memory,
                             stage_memory)
from ray_jobs.shortage import cpu_rooms, gpu_rooms, room_for, shortage

__all__ = ["GPU_MEMORY_GB", "GPU_MEMORY_RESOURCE", "NodeInfo", "Placement", "cluster_nodes",
           "node_info", "launchable_nodes", "plan_placement", "format_plan"]

# GPU memory by Ray accelerator type (``accelerator_type:<name>`` resource), in GB.
GPU_MEMORY_GB = {"A10G": 24, "L4": 24, "T4": 16, "V100": 16, "A100": 40, "A100-40G": 40,
                 "A100-80G": 80, "H100": 80, "H200": 141, "L40S": 48, "A40": 48,
                 "RTX6000": 24}
GPU_MEMORY_RESOURCE = "gpu_memory_gb"   # optional custom node resource (node total, GB)


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

    alive = [node_info(node, gpu_memory_gb) for node in ray.nodes() if node.get("Alive")]
    path = Path(os.path.expanduser(autoscaler_config or "~/ray_bootstrap_config.yaml"))
    if autoscaler_config is None and not path.exists():
        return alive
    if not path.exists():
        raise ValueError(f"autoscaler_config {path} not found: give the cluster launcher YAML")
    import yaml
    return alive + launchable_nodes(yaml.safe_load(path.read_text()), alive, gpu_memory_gb)


def node_info(node: dict, gpu_memory_gb: float | None = None) -> NodeInfo:
    """A node as ``ray.nodes()`` reports it (``NodeID``, ``Resources``)."""
    res = node.get("Resources", {})
    gpus = float(res.get("GPU", 0))
    return NodeInfo(node["NodeID"], float(res.get("CPU", 0)), gpus, float(res.get("memory", 0)),
                    _gpu_memory(res, gpus, gpu_memory_gb) if gpus else None,
                    _node_label(node["NodeID"], res))


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
        have = ", ".join(f"{n.name} {n.cpus:g}" for n in nodes[:4]) + \
            (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")
        raise PlacementError(f"no node offers {cpus_per_actor:g} CPU(s) per worker, short of "
                             f"CPUs (CPUs per node: {have}): lower cpus_per_actor or give the "
                             "nodes more CPUs (ray start --num-cpus), or add nodes")
    need = replica_memory(sizes, n_tokens, settings)
    if placement == "replicas" or replicas is not None or (
            placement == "auto" and stages is None and _fits_node(need, nodes, use_gpu,
                                                                  node_memory_gb)):
        return _replicas(sizes, need, nodes, use_gpu, node_memory_gb, replicas, n_shards,
                         cpus_per_actor, gpus_per_actor, model_name,
                         gpu_reserve(sizes, n_tokens, settings))
    return _stages(sizes, settings, n_tokens, nodes, devices, stages, cpus_per_actor, use_gpu,
                   node_memory_gb, model_name)


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


def _per_gpu(n: NodeInfo, node_memory_gb) -> float | None:
    return node_memory_gb * GB if node_memory_gb else n.gpu_memory


def _node_capacity(n: NodeInfo, use_gpu, node_memory_gb) -> float:
    if use_gpu:
        return (_per_gpu(n, node_memory_gb) or 0) * n.gpus
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
        per_gpu = lambda n: _per_gpu(n, node_memory_gb)  # noqa: E731
        budget = int(min((per_gpu(n) for n in fit), default=0) - reserve)
        most = int(max((n.gpus for n in fit), default=0))
        gpus = gpus_opt or (gpus_for_replica(sizes, budget, most) if fit else 1)
        per_node = [int(n.gpus // gpus) if n in fit else 0 for n in nodes]
    else:
        cap = lambda n: node_memory_gb * GB if node_memory_gb else n.memory  # noqa: E731
        per_node = [int(min(n.cpus // cpus, cap(n) // need)) for n in nodes]
    slots = sum(per_node)
    if slots == 0 or (forced and forced > slots):
        rooms = gpu_rooms(nodes, gpus, need / gpus, per_gpu) if use_gpu else \
            cpu_rooms(nodes, cpus, need, node_memory_gb)
        what = (f"replicas={forced} of {name} asked" if forced else f"one replica of {name}") + \
            f" ({cpus:g} CPU{f' + {gpus:g} GPU' if use_gpu else ''}, {need / GB:.2f} GB each)"
        raise PlacementError(shortage(what, forced or 1, rooms, cpus,
                                      "" if forced else "or use placement 'stages' (or auto)"))
    n = min(slots, forced or slots, max(1, n_shards))
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


def _stages(sizes, settings, n_tokens, nodes, devices, forced, cpus, use_gpu, node_memory_gb,
            name) -> Placement:
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
                                 f"({biggest / GB:.3g} GB), short of memory: use more stages, "
                                 "or nodes/GPUs with more (node_memory_gb / gpu_memory_gb "
                                 "override what Ray reports)")
        L = sizes.n_layers
        one = min(stage_memory(sizes, i, i + 1, n_tokens, settings, pipeline_depth(L))
                  for i in range(L))
        raise PlacementError(
            f"{name} cannot be placed: even split into {sizes.n_layers} one-block stages its "
            f"smallest stage needs {one / GB:.3g} GB and the largest node/GPU offers "
            f"{biggest / GB:.3g} GB (node_memory_gb / gpu_memory_gb, or bigger nodes)")
    hosts = _can_host(mems, devices, cpus, use_gpu)
    if hosts is None:
        rooms = gpu_rooms(nodes, 1, max(mems), lambda n: _per_gpu(n, node_memory_gb)) \
            if use_gpu else cpu_rooms(nodes, cpus, max(mems), node_memory_gb)
        each = "1 GPU" if use_gpu else f"{cpus:g} CPU"
        held = room_for(rooms)
        raise PlacementError(shortage(
            f"{name} in {S} stages ({each} and up to {max(mems) / GB:.3g} GB each)", S, rooms,
            cpus, f"or fewer stages (stages: {held})" if forced and held else ""))
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
