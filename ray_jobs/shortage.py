"""Why a plan does not fit: the resource that is short (CPUs, memory, GPUs), node by node, and
the settings that change it -- the one line a :class:`~ray_jobs.sizing.PlacementError` says.

Each node's room for the actors asked is counted per resource alone (CPUs over
``cpus_per_actor``, memory over the actor's bytes, GPUs over the GPUs per actor); the node
holds the smallest of those counts, and a resource is *short* when the cluster's room by it
alone is less than what was asked (or, when none is short by itself, the one that binds on
the nodes).
"""
from __future__ import annotations

from dataclasses import dataclass

from ray_jobs.sizing import GB

# what changes each resource, in the config's own keys (docs/ray.md)
FIXES = {
    "CPUs": "give the nodes more CPUs (ray start --num-cpus) or lower cpus_per_actor "
            "(now {cpus:g})",
    "memory": "give the nodes more memory (ray start --memory; node_memory_gb overrides "
              "what Ray reports) or more, smaller stages",
    "GPUs": "add GPU nodes, or set gpus_per_actor (0: CPU workers)",
    "GPU memory": "use GPUs with more memory (gpu_memory_gb overrides what is detected) or "
                  "more, smaller stages",
}
MAX_NODES_LISTED = 4
ENOUGH = 10 ** 9     # room by a resource that does not limit the count (a GPU's memory)


@dataclass
class Room:
    """One node: what it has of each resource (printable) and how many actors each alone allows."""

    node: str
    have: dict
    fits: dict

    def holds(self) -> int:
        return int(min(self.fits.values()))


def cpu_rooms(nodes, cpus: float, actor_bytes: float, node_memory_gb=None) -> list:
    """Rooms of CPU nodes for actors of ``cpus`` CPUs and ``actor_bytes`` of memory each."""
    out = []
    for n in nodes:
        mem = node_memory_gb * GB if node_memory_gb else n.memory
        out.append(Room(n.name, {"CPUs": f"{n.cpus:g} CPUs", "memory": _gb(mem)},
                        {"CPUs": int(n.cpus // cpus), "memory": int(mem // actor_bytes)}))
    return out


def gpu_rooms(nodes, gpus: float, gpu_bytes: float, gpu_memory) -> list:
    """Rooms of GPU nodes for actors of ``gpus`` GPUs, each GPU holding ``gpu_bytes``;
    ``gpu_memory(node)``: bytes per GPU of that node."""
    out = []
    for n in nodes:
        per = gpu_memory(n) or 0
        by_gpu = int(n.gpus // gpus) if gpus else 0
        out.append(Room(n.name, {"GPUs": f"{n.gpus:g} GPUs", "GPU memory": f"{_gb(per)} each"},
                        {"GPUs": by_gpu, "GPU memory": ENOUGH if per >= gpu_bytes else 0}))
    return out


def room_for(rooms: list) -> int:
    """How many actors the nodes hold in all."""
    return sum(r.holds() for r in rooms)


def shortage(what: str, wanted: int, rooms: list, cpus: float = 1, extra: str = "") -> str:
    """``"<what>: the cluster has room for H of N, short of <resource> (node ...: <what it
    has> -> <room by it>, ...): <fixes>"``."""
    held = room_for(rooms)
    resources = list(rooms[0].fits) if rooms else []
    short = [res for res in resources if sum(r.fits[res] for r in rooms) < wanted]
    if not short:     # no resource short alone: the ones that bind node by node
        short = sorted({min(r.fits, key=r.fits.get) for r in rooms}, key=resources.index)
    nodes = "; ".join(_node_line(r) for r in rooms[:MAX_NODES_LISTED])
    if len(rooms) > MAX_NODES_LISTED:
        nodes += f"; and {len(rooms) - MAX_NODES_LISTED} more node(s)"
    fixes = "; ".join(FIXES[res].format(cpus=cpus) for res in short)
    return (f"{what}: the cluster has room for at most {held} of {wanted}, short of "
            f"{' and '.join(short)} ({nodes}): {fixes}{'; ' + extra if extra else ''}; "
            "or add nodes")


def _node_line(room: Room) -> str:
    parts = [f"{room.have[res]} -> " + ("enough" if room.fits[res] >= ENOUGH else
                                         str(room.fits[res])) for res in room.fits]
    return f"node {room.node}: " + ", ".join(parts)


def _gb(n: float) -> str:
    return f"{n / GB:.3g} GB"
