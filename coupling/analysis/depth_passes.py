"""The depth-wise measure in two passes over the blocks, so that memory does not grow with depth.

Pass 1 (:func:`decompose_layers`): block by block, its local functions (a compute-precision
copy of the block, :class:`coupling.jacobian.fastpath.FastBlock`), the Jacobian ``J^l_tt`` of
every traced token and its top-K factors ``(U, S, V, s_{K+1})``; the block copy is dropped
before the next block is touched.  Only the ``d x K`` factors stay.

Pass 2 (:func:`couple_layers`): block by block again, ``J^l`` is rebuilt (the same arithmetic,
so the same bits) for its rows ``U_{l'}^T J^l V_{l'}`` against every layer's stored factors.

Dense Jacobians (the exact route, :func:`coupling.spectrum.svd.dense_pays`) cost ``d`` products to rebuild, so
pass 1 keeps them when all of them together take no more memory than one block's compute
copy (the peak stays O(1) blocks); otherwise pass 2 rebuilds them too.

``hold(l)``: a context manager that makes block ``l``'s weights present while it is worked on
(weights read from disk one block at a time: :class:`coupling.model.block_range.BlockRange`);
``None`` when every block is in memory.  The local scan runs both passes over all layers; a
pipeline stage (``ray_jobs.stage``) over its own, the stages exchanging the factors between
the passes.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch

from coupling.analysis.steps import (couple_token, decompose_token, depth_part,
                                     layer_jacobians, traced_tokens)
from coupling.model.trajectory import ForwardRecord
from coupling.spectrum.svd import resolve_method

if TYPE_CHECKING:
    from coupling.settings.scan_settings import ScanSettings


def held(hold, l: int):
    """``hold(l)``, or nothing to do when every block is in memory."""
    return nullcontext() if hold is None else hold(l)


def holder(blocks, settings: ScanSettings):
    """``hold(l)`` for a :class:`~coupling.model.block_range.BlockRange` that reads its blocks
    one at a time (None when they are resident): straight into float32, the compute
    precision, or into the model dtype under ``--deflate-ln``, whose norm-placement replay
    runs the block as the forward did (the compute copy is then made from it)."""
    if blocks is None or not getattr(blocks, "lazy", False):
        return None
    dtype = blocks.dtype if settings.deflate_ln else torch.float32
    return lambda l: blocks.hold(l, dtype)


def decompose_layers(record: ForwardRecord, layers, settings: ScanSettings, model=None,
                     hold=None, keep_dense: bool | None = None) -> tuple:
    """Pass 1 over ``layers``: ``(kept, factors)``.

    ``factors``: ``{t: {l: SVDResult}}`` per traced token (what other block ranges need);
    ``kept``: ``{"J": {t: {l: J}} or None, "functions": {str(l): [kind, reason]},
    "deflation": {str(l): record}}`` -- ``J`` holds the dense Jacobians when they are kept
    (``keep_dense``; default: when they fit in one block's compute copy, see the module
    docstring), else None and :func:`couple_layers` rebuilds them.
    """
    tokens = traced_tokens(record.n_tokens, settings)
    keep = keep_dense if keep_dense is not None else _dense_fits(record, layers, tokens, settings)
    factors, dense, functions = {t: {} for t in tokens}, {t: {} for t in tokens}, {}
    record.cache["deflation"] = {}       # filled by layer_jacobians (--deflate-ln)
    for l in layers:
        with held(hold, l):
            blocks = {}                  # this block's FastBlock, shared by the traced tokens
            for t in tokens:
                jac, svds = decompose_token(record, [l], t, settings, model, blocks, functions)
                factors[t][l] = svds[l]
                if keep and isinstance(jac[l], torch.Tensor):
                    dense[t][l] = jac[l]
            del blocks, jac              # the block's compute copy goes before the next block
    complete = keep and all(set(dense[t]) == set(layers) for t in tokens)
    return ({"J": dense if complete else None, "functions": functions,
             "deflation": dict(record.cache["deflation"])}, factors)


def couple_layers(record: ForwardRecord, layers, kept: dict | None, all_factors: list,
                  settings: ScanSettings, model=None, hold=None) -> dict:
    """Pass 2 over ``layers``: their rows of the normalized and raw grids against every
    layer's factors (``all_factors``: each block range's ``factors`` from
    :func:`decompose_layers`, on this device), averaged over the traced tokens -- the
    ``coupling.analysis.steps.depth_part`` of ``layers``.  ``kept``: what pass 1 kept
    (None: nothing, e.g. on a restarted actor)."""
    kept = kept or {"J": None, "functions": {}, "deflation": {}}
    tokens = traced_tokens(record.n_tokens, settings)
    svds = {t: {l: f for part in all_factors for l, f in part[t].items()} for t in tokens}
    grids = {t: [] for t in tokens}
    flags = {t: {} for t in tokens}
    for l in layers:
        with held(hold, l):
            blocks = {}
            for t in tokens:
                J = (kept["J"][t][l] if kept["J"] is not None else
                     layer_jacobians(record, [l], t, settings, model, blocks=blocks)[l])
                grid, flag = couple_token({l: J}, svds[t], record.n_layers, settings.k)
                grids[t].append(grid)
                flags[t].update(flag)
            del blocks, J
    rows = [{v: np.concatenate([g[v] for g in grids[t]], axis=0) for v in ("normalized", "raw")}
            for t in tokens]
    spectra = {l: svds[tokens[-1]][l] for l in layers}
    return depth_part(rows, [flags[t] for t in tokens], spectra, kept["functions"],
                      kept["deflation"])


def _dense_fits(record: ForwardRecord, layers, tokens, settings: ScanSettings) -> bool:
    """Whether every dense ``J^l_tt`` of ``layers`` fits in one block's float32 copy."""
    d = record.hidden_states.shape[-1]
    if (resolve_method(settings.svd, d, settings.k, record.hidden_states.device) != "exact"
            or not len(layers)):
        return False
    block = sum(p.numel() for p in record.call(layers[0]).module.parameters())
    return len(tokens) * len(layers) * d * d <= block
