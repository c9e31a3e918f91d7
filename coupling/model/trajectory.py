"""Trajectories ``X^0 ... X^L`` of a prompt through the blocks, with the blocks' real calls.

``X^l`` is Hugging Face's ``hidden_states`` (embedding output first).  The last entry depends on
which function the last block is (``last_block``), so that ``X^L - X^{L-1} = f^L(X^{L-1})``
always holds for the ``f^L`` whose Jacobian is taken:

* ``"with-final-norm"`` (default, the paper's Eq. 7): ``F^L = norm(block_L(X))``, and ``X^L`` is
  Hugging Face's last hidden state, which already carries the final norm (GPT-2, Llama,
  NeoX, Phi, Falcon, Gemma; where it does not, e.g. ViT, the norm is applied here);
* ``"raw"``: ``F^L = block_L``, and ``X^L`` is the last block's recorded output, before the norm.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from coupling.measures.regularity import LinearLens
from coupling.model.blocks import BlockCall, CallRecorder, find_blocks, find_final_norm
from coupling.model.kv_cache import _PrefixKV
from coupling.model.loading import LoadedModel


@dataclass
class ForwardRecord:
    """One forward pass: trajectory (L+1, n, d) in float32 and each block's recorded call."""

    hidden_states: torch.Tensor
    calls: list[BlockCall]
    block_path: str
    raw_last: torch.Tensor  # raw last-block output (1, n, d), before any final norm
    last_block: str = "with-final-norm"   # what X^L is: see the module docstring
    final_norm: torch.nn.Module | None = field(default=None, repr=False)  # inside F^L, if any
    cache: dict = field(default_factory=dict, repr=False)   # per-layer facts found on demand
    # A pipeline stage records only its own blocks: ``hidden_states`` is then X^first ..
    # X^(first + len(calls)), ``calls`` blocks first .. first + len(calls) - 1 (0-based) and
    # ``model_layers`` the model's L.  A full record has first = 0 and model_layers = None.
    first: int = 0
    model_layers: int | None = None

    @property
    def n_layers(self) -> int:
        """The model's number of blocks ``L`` (also for a record of some blocks only)."""
        return self.model_layers if self.model_layers is not None else len(self.calls)

    @property
    def layers(self) -> range:
        """The layers (1-based) whose block calls this record holds."""
        return range(self.first + 1, self.first + len(self.calls) + 1)

    def call(self, l: int) -> BlockCall:
        """The recorded call of block ``l`` (1-based, as in the paper)."""
        if l not in self.layers:
            raise ValueError(f"layer {l} is not in this record (it holds layers "
                             f"{self.layers.start}..{self.layers.stop - 1} of "
                             f"{self.n_layers}): run that layer on the stage that owns it")
        return self.calls[l - 1 - self.first]

    def states(self) -> dict:
        """``{l: X^l (n, d)}`` of the layers this record holds."""
        return {self.first + i: x for i, x in enumerate(self.hidden_states)}

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


LAST_BLOCKS = ("with-final-norm", "raw")


def check_last_block(last_block: str) -> str:
    if last_block not in LAST_BLOCKS:
        raise ValueError(f"last_block must be one of {', '.join(LAST_BLOCKS)}, got "
                         f"{last_block!r} (CLI: --raw-last-block for 'raw')")
    return last_block


@torch.no_grad()
def run_forward(loaded: LoadedModel, inputs, block_path: str | None = None,
                last_block: str = "with-final-norm") -> ForwardRecord:
    """One forward pass recording hidden states and every block's call (``X^L`` as
    ``last_block`` says)."""
    check_last_block(last_block)
    model = loaded.model
    path, blocks = find_blocks(model, block_path, loaded.info.get("n_layers"))
    kwargs = model_inputs(inputs)
    device = loaded.device
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    # the keys/values of every block as its cache receives them, where the fast path can use
    # them (float32 blocks: a bf16 block's Jacobians are taken of a float32 copy), so that it
    # need not call each block on the whole prompt again
    float32 = next(model.parameters()).dtype == torch.float32
    with CallRecorder(blocks, kv_cache=_PrefixKV if float32 else None) as rec:
        out = model(**kwargs, output_hidden_states=True, use_cache=False, return_dict=True,
                    **_last_logits_only(model))
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
    raw = rec.calls[-1].output
    norm = find_final_norm(model)
    if norm is not None:
        normed = norm(raw)[0].float()
        if not torch.allclose(traj[-1], normed, rtol=1e-4, atol=1e-5 * float(normed.abs().max())):
            traj[-1] = normed    # Hugging Face left X^L before the final norm (ViT does)
    elif last_block == "with-final-norm" and not torch.equal(traj[-1], raw[0].float()):
        raise ValueError(f"{type(model).__name__}'s last hidden state is not its last block's "
                         "output and no final norm was found, so the last block's Jacobian "
                         "would not match X^L: scan with --raw-last-block")
    record = ForwardRecord(traj, rec.calls, path, raw, final_norm=norm)
    return with_last_block(record, last_block, model)


def _last_logits_only(model) -> dict:
    """``logits_to_keep=1`` where the model takes it: only the hidden states are kept, and the
    LM head on every token is ~45% of the blocks' forward at d = 768, V = 50257."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def with_last_block(record: ForwardRecord, last_block: str, model=None) -> ForwardRecord:
    """``record`` with ``X^L`` for ``last_block`` (the same object when it already is)."""
    check_last_block(last_block)
    if record.last_block == last_block:
        return record
    norm = record.final_norm or (find_final_norm(model) if model is not None else None)
    if last_block == "raw":
        norm = None
    if record.raw_last is None:   # a pipeline stage without the last block: X^L unknown here
        return dataclasses.replace(record, last_block=last_block, final_norm=norm, cache={})
    states = record.hidden_states.clone()
    raw = record.raw_last
    if norm is not None:
        with torch.no_grad():
            raw = norm(raw.to(next(norm.parameters(), raw).dtype))
    states[-1] = raw[0].float()
    return dataclasses.replace(record, hidden_states=states, last_block=last_block,
                               final_norm=norm, cache={})


def trajectories(loaded: LoadedModel, inputs, raw_last: bool = False,
                 block_path: str | None = None) -> torch.Tensor:
    """``X^0..X^L`` as a float32 tensor of shape ``(L+1, n, d)``."""
    return run_forward(loaded, inputs, block_path,
                       "raw" if raw_last else "with-final-norm").hidden_states


def logit_lens_head(loaded: LoadedModel):
    """Callable mapping ``(n, d)`` hidden states to logits: final norm + unembedding.

    Returns None when the model has no output embedding (e.g. a bare encoder or a ViT).
    """
    return lens_head(loaded.model)


def lens_head(model: torch.nn.Module):
    """:func:`logit_lens_head` of a model module (a pipeline stage holds the module only): a
    :class:`~coupling.measures.regularity.LinearLens` when the unembedding is a plain
    ``nn.Linear`` (the lens then streams it), else a closure over the module."""
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None:
        return None
    norm = find_final_norm(model)
    if is_plain_linear(unembed):
        return LinearLens(unembed.weight, unembed.bias, norm)

    @torch.no_grad()
    def head(h: torch.Tensor) -> torch.Tensor:
        h = h.to(unembed.weight.dtype)
        if norm is not None:
            h = norm(h)
        return unembed(h).float()

    return head


def is_plain_linear(module) -> bool:
    """Whether ``module`` computes ``x @ weight.T + bias`` and nothing else (not a quantized
    or otherwise overridden linear layer)."""
    return (isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward
            and not module._forward_hooks and not module._forward_pre_hooks)
