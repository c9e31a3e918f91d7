"""Binding a recorded Hugging Face block call and slicing it to a subset of tokens.

A block's recorded call (:class:`coupling.model.blocks.BlockCall`) is bound to the block's
signature, by name, so that every family (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, Gemma, Phi,
Falcon...) is handled by the same code; its per-token arguments (attention-mask rows and
columns, ``position_ids``, ``cache_position``, rotary ``position_embeddings``, ALiBi) are
then indexed to the query/key tokens a local function needs (:mod:`coupling.jacobian.fastpath`).
An argument that does not follow its rule raises :class:`_Unsliceable`, which the fast path
turns into a fallback to a longer prompt.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from coupling.model.blocks import CACHE_NAMES, BlockCall, cache_parameter

# Per-argument slicing rules: "qk" = (..., query, key) masks, "q" = per-query positions in the
# last dim, "q2" = per-query tables in dim -2 (rotary cos/sin), "k" = per-key biases.
SLICE_RULES = {
    "attention_mask": "qk", "causal_mask": "qk",
    "position_ids": "q", "cache_position": "q",
    "position_embeddings": "q2",
    "alibi": "k",
}


class _Unsliceable(Exception):
    pass


# ------------------------------------------------------------------------------------------
# binding and slicing a recorded call
# ------------------------------------------------------------------------------------------
def _bind(call: BlockCall, module) -> tuple[str, dict, str | None]:
    """``(hidden_name, other_arguments, cache_name)`` of a recorded call, all by name."""
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind_partial(*call.args, **call.kwargs)
    except TypeError as e:
        raise _Unsliceable(f"cannot bind the recorded call to {type(module).__name__}: {e}")
    flat = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise _Unsliceable(f"{type(module).__name__} takes *args")
        else:
            flat[name] = value
    hidden = next(iter(sig.parameters))
    if call.hidden_in_kwargs:
        hidden = "hidden_states"
    flat.pop(hidden, None)
    cache = cache_parameter(module)
    for alias in CACHE_NAMES:    # a recorded deprecated alias must not shadow the real cache
        if alias != cache:
            flat.pop(alias, None)
    return hidden, flat, cache


def _index_tensor(x: torch.Tensor, rule: str, n: int, q, k, block, name: str):
    """Gather the rows ``q`` / columns ``k`` of one per-token tensor (see ``SLICE_RULES``)."""
    if rule == "qk":
        if x.ndim >= 3 and x.shape[-2] in (n, 1) and x.shape[-1] == n:   # (.., query, key)
            if x.shape[-2] == n:
                x = x.index_select(-2, q)
            elif block is not None:
                x = x.expand(*x.shape[:-2], len(q), n)
            x = x.index_select(-1, k)
            if block is not None:   # copies of token t must not see each other
                x = x & ~block if x.dtype == torch.bool else \
                    x.masked_fill(block, torch.finfo(x.dtype).min)
            return x
        if x.ndim == 2 and x.shape[-1] == n and block is None:          # (batch, key) padding
            return x.index_select(-1, k)
    elif rule == "q" and x.shape[-1] == n:
        return x.index_select(-1, q)
    elif rule == "q2" and x.ndim >= 2 and x.shape[-2] == n:
        return x.index_select(-2, q)
    elif rule == "k" and x.shape[-1] == n:
        x = x.index_select(-1, k)
        return x.index_select(-2, q) if x.ndim >= 2 and x.shape[-2] == n else x
    if n not in x.shape:                # nothing per-token in it (e.g. a (1, 1, 1, 1) mask)
        return x
    raise _Unsliceable(f"argument {name!r} of shape {tuple(x.shape)} does not follow its rule")


def _index_value(value, rule: str | None, n: int, q, k, block, name: str):
    if isinstance(value, torch.Tensor):
        if rule is None:
            if n > 1 and n in value.shape:
                raise _Unsliceable(f"unknown per-token argument {name!r} {tuple(value.shape)}")
            return value
        dev = value.device
        return _index_tensor(value, rule, n, q.to(dev), k.to(dev),
                             None if block is None else block.to(dev), name)
    if isinstance(value, (tuple, list)):
        return type(value)(_index_value(v, rule, n, q, k, block, name) for v in value)
    if isinstance(value, dict):
        return {key: _index_value(v, rule, n, q, k, block, f"{name}[{key!r}]")
                for key, v in value.items()}
    return value


def _indexed_arguments(args: dict, n: int, q: Sequence[int], k: Sequence[int],
                       block: torch.Tensor | None = None, dtype=torch.float32,
                       device=None) -> dict:
    """The recorded arguments for query tokens ``q`` attending to key tokens ``k``.

    ``block`` ``(len(q), len(k))`` bool: extra (query, key) pairs to mask out.
    """
    q = torch.as_tensor(list(q), dtype=torch.long)
    k = torch.as_tensor(list(k), dtype=torch.long)
    out = {name: _index_value(v, SLICE_RULES.get(name), n, q, k, block, name)
           for name, v in args.items()}
    if block is not None and all(out.get(m) is None for m in ("attention_mask", "causal_mask")):
        # the recorded call had no mask (a causal kernel did the masking): build an additive one
        if "causal_mask" in out and "attention_mask" not in out:
            raise _Unsliceable("no attention mask to keep the copies of token t apart")
        out["attention_mask"] = torch.zeros(block.shape, dtype=dtype, device=device).masked_fill(
            block.to(device), torch.finfo(dtype).min)[None, None]
    return out


def is_causal(call: BlockCall) -> bool:
    """Whether the recorded call is causal: token ``t`` sees no token ``> t``.

    Read from the recorded attention mask when there is a ``(.., n, n)`` one (every entry
    above the diagonal masked: ``False`` or ``<= -1e4``); otherwise from the ``is_causal``
    flags of the block's attention modules (none -> not causal, the safe answer).
    """
    n = call.input.shape[1]
    if n == 1:
        return True
    try:
        _, args, _ = _bind(call, call.module)
    except _Unsliceable:
        args = dict(call.kwargs)
    masks = args.get("attention_mask", args.get("causal_mask"))
    masks = list(masks.values()) if isinstance(masks, dict) else [masks]
    if all(isinstance(m, torch.Tensor) and m.ndim >= 2 and m.shape[-2:] == (n, n) for m in masks):
        upper = torch.ones(n, n, dtype=torch.bool, device=masks[0].device).triu(1)
        return all(bool((~m[..., upper]).all()) if m.dtype == torch.bool
                   else bool((m[..., upper] <= -1e4).all()) for m in masks)
    flags = [m.is_causal for m in call.module.modules()
             if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)

