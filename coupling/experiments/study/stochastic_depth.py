"""Stochastic depth for Hugging Face ViTs: the DeiT/timm rule, applied with forward hooks.

Block ``i`` of ``L`` (0-based) is skipped with probability ``p_i = p * i / (L - 1)`` (0 for
the first block, ``p`` for the last), per sample, and a kept block's residual branch is
scaled by ``1 / (1 - p_i)`` so its expected output is unchanged.  One difference from timm:
timm drops the attention and the MLP branch of a block independently; a Hugging Face
``ViTLayer`` is one module, so here the whole block (both branches) is kept or skipped, the
unit the coupling scan measures.  The hooks act in train mode only and draw from torch's
global RNG.  :func:`vit_blocks` (the block list the hooks attach to) lives here too.
Used by :mod:`coupling.experiments.study.vit`.
"""
from __future__ import annotations

import contextlib

import torch


def vit_blocks(model) -> torch.nn.ModuleList:
    """The block list: ``vit.layers`` (transformers 5.2x) or ``vit.encoder.layer`` (older)."""
    vit = getattr(model, "vit", model)
    blocks = getattr(vit, "layers", None)
    if blocks is None and hasattr(vit, "encoder"):
        blocks = vit.encoder.layer
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no ViT block list (vit.layers or "
                         "vit.encoder.layer): pass a ViTForImageClassification or ViTModel")
    return blocks


def drop_path_rates(n_layer: int, p: float) -> list[float]:
    """DeiT/timm: ``torch.linspace(0, p, n_layer)``, 0 for the first block and ``p`` for the last."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"stochastic depth p must be in [0, 1], got {p!r}")
    return [p * i / (n_layer - 1) for i in range(n_layer)] if n_layer > 1 else [p]


def _drop_path_hook(p: float):
    def hook(module, args, kwargs, output):
        if not module.training or p == 0.0:
            return None                                   # eval: the block as it is
        x = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)       # one draw per sample
        keep = (torch.rand(shape, device=x.device) >= p).to(out.dtype)
        if p < 1.0:                                       # timm: no rescaling when nothing is kept
            keep = keep / (1.0 - p)
        new = x + keep * (out - x)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return hook


def add_stochastic_depth(model, rates) -> list:
    """Hooks skipping block ``i``'s residual branch with probability ``rates[i]`` per sample in
    train mode (``rates``: one per block, or a float ``p`` for the linear rule).  Returns the
    handles; ``handle.remove()`` undoes them.  Draws come from torch's global RNG."""
    blocks = vit_blocks(model)
    if isinstance(rates, (int, float)):
        rates = drop_path_rates(len(blocks), float(rates))
    rates = [float(r) for r in rates]
    if len(rates) != len(blocks) or not all(0.0 <= r <= 1.0 for r in rates):
        raise ValueError(f"stochastic depth needs {len(blocks)} rates in [0, 1], got {rates}")
    return [b.register_forward_hook(_drop_path_hook(r), with_kwargs=True)
            for b, r in zip(blocks, rates)]


@contextlib.contextmanager
def stochastic_depth(model, rates):
    """``with stochastic_depth(model, 0.2): ...`` -- :func:`add_stochastic_depth`, removed on exit."""
    handles = add_stochastic_depth(model, rates)
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
