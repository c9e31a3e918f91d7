"""Trajectories ``X^0 ... X^L`` of a prompt through the blocks, with the blocks' real calls.

``X^l`` follows METHODS.md: Hugging Face's ``hidden_states`` (embedding output first, the last
entry after the model's final normalisation).  ``raw_last=True`` replaces the last entry by
the raw output of the last block (no final norm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import CallRecorder, BlockCall, find_blocks, find_final_norm
from .loading import LoadedModel


@dataclass
class ForwardRecord:
    """One forward pass: trajectory (L+1, n, d) in float32 and each block's recorded call."""

    hidden_states: torch.Tensor
    calls: list[BlockCall]
    block_path: str
    raw_last: torch.Tensor  # raw last-block output (1, n, d), before any final norm

    @property
    def n_layers(self) -> int:
        return len(self.calls)

    @property
    def n_tokens(self) -> int:
        return self.hidden_states.shape[1]


def model_inputs(inputs) -> dict:
    """Accept ``input_ids`` (tensor, list of ints) or a dict (``pixel_values`` for ViT...)."""
    if isinstance(inputs, dict):
        return dict(inputs)
    ids = torch.as_tensor(inputs)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"expected one prompt of token ids (1, n), got shape {tuple(ids.shape)}")
    return {"input_ids": ids}


@torch.no_grad()
def run_forward(loaded: LoadedModel, inputs, block_path: str | None = None) -> ForwardRecord:
    """One forward pass recording hidden states and every block's call."""
    model = loaded.model
    path, blocks = find_blocks(model, block_path, loaded.info.get("n_layers"))
    kwargs = model_inputs(inputs)
    device = loaded.device
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with CallRecorder(blocks) as rec:
        out = model(**kwargs, output_hidden_states=True, use_cache=False, return_dict=True)
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise ValueError(f"{type(model).__name__} returned no hidden_states: it cannot be scanned")
    if len(hs) != len(blocks) + 1:
        raise ValueError(f"{type(model).__name__} returned {len(hs)} hidden states for "
                         f"{len(blocks)} blocks (expected L+1): check block_path")
    missing = [i for i, c in enumerate(rec.calls) if c is None]
    if missing:
        raise ValueError(f"blocks {missing} were not called in the forward pass")
    traj = torch.stack([h[0].float() for h in hs])
    return ForwardRecord(traj, rec.calls, path, rec.calls[-1].output)


def trajectories(loaded: LoadedModel, inputs, raw_last: bool = False,
                 block_path: str | None = None) -> torch.Tensor:
    """``X^0..X^L`` as a float32 tensor of shape ``(L+1, n, d)``."""
    rec = run_forward(loaded, inputs, block_path)
    traj = rec.hidden_states
    if raw_last:
        traj = traj.clone()
        traj[-1] = rec.raw_last[0].float()
    return traj


def logit_lens_head(loaded: LoadedModel):
    """Callable mapping ``(n, d)`` hidden states to logits: final norm + unembedding.

    Returns None when the model has no output embedding (e.g. a bare encoder or a ViT).
    """
    model = loaded.model
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None:
        return None
    norm = find_final_norm(model)

    @torch.no_grad()
    def head(h: torch.Tensor) -> torch.Tensor:
        h = h.to(unembed.weight.dtype)
        if norm is not None:
            h = norm(h)
        return unembed(h).float()

    return head
