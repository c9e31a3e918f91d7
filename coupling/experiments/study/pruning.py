"""Block pruning of causal LMs: skip decoder blocks and measure what the held-out loss loses.

The paper's Table 2 hints that strongly coupled blocks are redundant.  This module turns that
into a test: blocks are removed (made the identity, ``X^l = X^{l-1}``) in different orders and
the held-out loss is measured after each removal.  Orders:

* ``coupling-most`` / ``coupling-least``: by a block's coupling to its depth neighbours
  (:func:`neighbour_coupling`, from the scan's depth mis-coupling matrix), most / least
  coupled first;
* ``angular``: the "block influence" baseline of ShortGPT (Men et al. 2024), smallest angular
  distance ``1 - cos(X^{l-1}, X^l)`` first (:func:`angular_distance`);
* ``random``: seeded permutations, the floor any signal must beat.

The first and last blocks are *not* protected: every order may remove them.  A signal that
ranks block 0 as removable is then measured as such (removing it is usually expensive), so the
comparison between orders stays honest instead of being decided by a rule shared by all.

Blocks are indexed from 0 here (``model.transformer.h[l]``); the held-out loss comes from an
``eval_fn(model) -> float`` the caller supplies (it should run under ``torch.no_grad`` with the
model in eval mode).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from coupling.model.blocks import find_blocks

ORDER_NAMES = ("coupling-most", "coupling-least", "angular", "random")


@contextlib.contextmanager
def skip_blocks(model: nn.Module, blocks: Iterable[int]):
    """Within the context the listed blocks (0-based) return their input unchanged.

    A forward hook replaces each block's output by its input hidden states, in the block's own
    output format: a tensor (transformers 5.x GPT2Block / LlamaDecoderLayer) or a tuple whose
    first entry is the hidden states (transformers 4.x), the rest kept.  The hook is prepended
    so that transformers' own output-capturing hooks (``output_hidden_states``) see the
    skipped output.  The block still runs (and fills its KV cache, which nothing reads); only
    its output is discarded.  Hooks are removed on exit, whatever happened inside.
    """
    _, module_list = find_blocks(model)
    chosen = sorted({int(b) for b in blocks})
    bad = [b for b in chosen if not 0 <= b < len(module_list)]
    if bad:
        raise ValueError(f"blocks {bad} out of range: the model has blocks "
                         f"0..{len(module_list) - 1}")
    handles = [module_list[b].register_forward_hook(_identity_hook, with_kwargs=True,
                                                    prepend=True) for b in chosen]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _identity_hook(module, args, kwargs, output):
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"{type(module).__name__} got no hidden-state tensor as first argument "
                         "or 'hidden_states' keyword: cannot skip it")
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    raise ValueError(f"{type(module).__name__} returns {type(output).__name__}, not a tensor or "
                     "tuple: skipping it is not supported")


# ------------------------------------------------------------------------------------------
# Block-importance signals
# ------------------------------------------------------------------------------------------
def _as_windows(windows) -> list[torch.Tensor]:
    """Token-id windows as a list of (B, T) long tensors (one 2-D array is one batch)."""
    if isinstance(windows, (torch.Tensor, np.ndarray)):
        windows = [windows]
    items = []
    for w in windows:
        t = torch.as_tensor(w)
        t = t[None] if t.ndim == 1 else t
        if t.ndim != 2 or t.numel() == 0 or t.is_floating_point():
            raise ValueError("windows must be integer token ids: a (N, T) array or a list of "
                             f"non-empty 1-D/2-D sequences (got one of shape {tuple(t.shape)}, "
                             f"dtype {t.dtype})")
        items.append(t.long())
    if not items:
        raise ValueError("no windows given: pass held-out token ids, (N, T)")
    return items


@torch.no_grad()
def angular_distance(model: nn.Module, windows, batch_size: int = 8) -> np.ndarray:
    """ShortGPT's block influence: ``1 - cos(X^{l-1}, X^l)`` per block, shape ``(L,)``.

    Averaged over every token of every window (pooled, so a longer window weighs more).
    ``X^{l-1}`` is ``hidden_states[l-1]`` of ``output_hidden_states``; ``X^l`` is
    ``hidden_states[l]`` for all but the last block.  For the last block ``X^L`` is the
    block's *raw* output, read with a forward hook, i.e. **before** the final norm: HF's last
    hidden state has ``ln_f`` applied (GPT-2), which would add the norm's change of direction
    to the last block's influence.  Windows are not padded (no attention mask); the model is put
    in eval mode for the call and restored.
    """
    path, blocks = find_blocks(model)
    n_layers = len(blocks)
    device = next(model.parameters()).device
    sums, count = np.zeros(n_layers), 0
    last = {}
    handle = blocks[-1].register_forward_hook(
        lambda mod, args, out: last.__setitem__("out", out if isinstance(out, torch.Tensor)
                                                else out[0]))
    was_training = model.training
    model.eval()
    try:
        for group in _as_windows(windows):
            for start in range(0, len(group), batch_size):
                ids = group[start:start + batch_size].to(device)
                hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
                if len(hs) != n_layers + 1:
                    raise ValueError(f"{type(model).__name__} returned {len(hs)} hidden states "
                                     f"for {n_layers} blocks at {path!r}; expected {n_layers + 1}")
                states = list(hs[:n_layers]) + [last["out"]]
                for l in range(n_layers):
                    cos = torch.nn.functional.cosine_similarity(
                        states[l].double(), states[l + 1].double(), dim=-1)
                    sums[l] += float((1.0 - cos).sum())
                count += ids.numel()
    finally:
        handle.remove()
        model.train(was_training)
    return sums / count


def neighbour_coupling(normalized: np.ndarray) -> np.ndarray:
    """Coupling of each block to its depth neighbours, shape ``(L,)``.

    ``normalized`` is the depth mis-coupling matrix ``m~[l, l']`` (``(L, L)``, or
    ``(P, L, L)`` averaged over prompts first).  For block ``l`` each existing neighbour
    ``l' = l ± 1`` gives ``1 - (m~[l, l'] + m~[l', l]) / 2``; the result is their mean.  NaN
    entries are left out (a missing direction uses the other one); a block with no finite
    neighbour entry gets NaN.
    """
    m = np.asarray(normalized, dtype=float)
    if m.ndim == 3:
        with _quiet():
            m = np.nanmean(m, axis=0)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"normalized must be a square (L, L) matrix with L >= 2, got shape "
                         f"{np.shape(normalized)}")
    n = len(m)
    out = np.full(n, np.nan)
    with _quiet():
        for l in range(n):
            vals = [1.0 - np.nanmean([m[l, j], m[j, l]]) for j in (l - 1, l + 1) if 0 <= j < n]
            out[l] = np.nanmean(vals)
    return out


@contextlib.contextmanager
def _quiet():
    """Silence numpy's all-NaN RuntimeWarnings (an all-NaN neighbour pair is legitimate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _ranked(values: np.ndarray, descending: bool) -> list[int]:
    """Block indices sorted by value (stable: ties keep block order); NaN blocks last."""
    v = np.asarray(values, dtype=float)
    finite = [i for i in range(len(v)) if np.isfinite(v[i])]
    finite.sort(key=lambda i: -v[i] if descending else v[i])
    return finite + [i for i in range(len(v)) if not np.isfinite(v[i])]


def pruning_orders(coupling_nb, angular, n_random: int = 5, seed: int = 0) -> dict:
    """Removal orders, ``{name: [order, ...]}`` with every order a permutation of 0..L-1.

    ``coupling-most``: highest neighbour coupling first; ``coupling-least``: lowest first;
    ``angular``: smallest angular distance first (ShortGPT); ``random``: ``n_random``
    permutations from ``numpy.random.default_rng(seed)``.  Blocks with a NaN signal go last
    in the signal orders.  No block is protected (see the module docstring).
    """
    nb, ang = np.asarray(coupling_nb, dtype=float), np.asarray(angular, dtype=float)
    if nb.ndim != 1 or nb.shape != ang.shape or nb.size == 0:
        raise ValueError(f"coupling_nb and angular must be 1-D of equal length (one value per "
                         f"block), got shapes {nb.shape} and {ang.shape}")
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}")
    rng = np.random.default_rng(seed)
    return {"coupling-most": [_ranked(nb, descending=True)],
            "coupling-least": [_ranked(nb, descending=False)],
            "angular": [_ranked(ang, descending=False)],
            "random": [[int(i) for i in rng.permutation(nb.size)] for _ in range(n_random)]}


# ------------------------------------------------------------------------------------------
# Losses with blocks removed
# ------------------------------------------------------------------------------------------
def single_block_losses(model: nn.Module, eval_fn: Callable[[nn.Module], float]) -> np.ndarray:
    """Held-out loss with each block skipped alone, shape ``(L,)`` (absolute, not the
    increase: subtract ``eval_fn(model)`` for that)."""
    _, blocks = find_blocks(model)
    out = np.empty(len(blocks))
    for l in range(len(blocks)):
        with skip_blocks(model, [l]):
            out[l] = float(eval_fn(model))
    return out


def pruning_curves(model: nn.Module, orders: dict, eval_fn: Callable[[nn.Module], float],
                   max_removed: int) -> pd.DataFrame:
    """Loss after removing the first 0..max_removed blocks of every order.

    Columns: ``order, rep, n_removed, removed`` (the removed blocks in removal order,
    ``"3,5"``; empty for none), ``eval_loss``, ``loss_increase`` (vs nothing removed).  Each
    distinct *set* of removed blocks is evaluated once (orders sharing a prefix share it).
    The loss is not assumed to grow with ``n_removed``.
    """
    _, blocks = find_blocks(model)
    if not 0 <= int(max_removed) <= len(blocks):
        raise ValueError(f"max_removed must lie in 0..{len(blocks)} (the block count), "
                         f"got {max_removed}")
    cache: dict[frozenset, float] = {}

    def loss(removed) -> float:
        key = frozenset(removed)
        if key not in cache:
            with skip_blocks(model, removed):
                cache[key] = float(eval_fn(model))
        return cache[key]

    base = loss([])
    rows = []
    for name, reps in orders.items():
        for rep, order in enumerate(reps):
            if sorted(order) != list(range(len(blocks))):
                raise ValueError(f"order {name!r} rep {rep} is not a permutation of "
                                 f"0..{len(blocks) - 1}: {order}")
            for n in range(int(max_removed) + 1):
                removed = [int(b) for b in order[:n]]
                value = loss(removed)
                rows.append({"order": name, "rep": rep, "n_removed": n,
                             "removed": ",".join(map(str, removed)), "eval_loss": value,
                             "loss_increase": value - base})
    return pd.DataFrame(rows, columns=["order", "rep", "n_removed", "removed", "eval_loss",
                                       "loss_increase"])
