"""What one model needs where it runs: parameter bytes, worker memory, block ranges, GPU maps.

:mod:`ray_jobs.placement` decides between replicas and stages from these numbers; here they are
computed, from the sizes of the weightless skeleton (:class:`ModelSizes`, filled by
``ray_jobs.models``) and the scan settings:

* the memory of one worker (a replica, or a stage of blocks);
* the balanced contiguous block ranges of ``S`` stages (or of one replica's GPUs);
* the GPUs one replica needs and Accelerate's device map of one copy over them.

Memory of one worker = weights + working memory + a fixed process overhead.  Working
memory = what one batched JVP/VJP chunk passes through a block (``chunk`` tangents of
``(n, d)`` with ~16 activations of that size each; ``(2, d)`` for the one-token products of
``jacobian: local`` in causal models, the second row standing for the attention over the prefix) and the float32 copy of one block that
bf16/fp16 models are differentiated in (both transient, once) + what is *held* per
layer and prompt until its coupling rows are done: the block's input/output, and the dense
``d x d`` float32 Jacobian per traced token when the SVD is exact (``svd: auto`` on
CPU: ``d <= 2900 + 36 K``, ``coupling.spectrum.svd.dense_pays``).  A stage holds its layers for every prompt in its pipeline (``in_flight``).
Lower ``chunk`` for very wide models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from coupling.settings.scan_settings import ScanSettings
from coupling.spectrum.svd import may_be_dense

GB = 1024 ** 3
PROCESS_OVERHEAD = int(0.5 * GB)   # python + torch + transformers in a worker process


class PlacementError(ValueError):
    """No node (or set of nodes) can hold the model as asked; the message says why."""


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
    if may_be_dense(settings.svd, d, settings.k):
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

    from coupling.model.blocks import find_blocks

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
