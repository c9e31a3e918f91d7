"""Held-out measures of a causal LM: loss, next-token accuracy and a multiple-choice benchmark.

The study relates coupling to "performance", so performance is measured three ways on the
held-out split of the one corpus every suite model shares:

- ``eval_loss``: mean next-token cross-entropy (nats/token) over non-overlapping windows;
- ``eval_acc``: how often the top-1 next-token prediction is right on the same windows;
- ``mc_acc``: a small HellaSwag-like benchmark built from held-out text: given a context of
  ``c`` tokens, pick the true ``m``-token continuation among ``n_choices`` spans of the same
  length (the others are cut from other, non-overlapping places of the held-out stream).
  The choice with the highest total log-probability wins; all choices have ``m`` tokens, so
  no length normalisation is needed. Chance is ``1 / n_choices``.

Everything here is deterministic given the stream and the seed, and works on any device the
model is on (windows are built on the CPU and moved to the model's device).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MC_FIELDS = ("context", "choices", "answer", "starts")


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of ``logits`` ``(B, T, V)`` against ``targets`` ``(B, T)``."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def window_indices(stream_len: int, seq_len: int, max_windows: int | None) -> list[int]:
    """Indices ``j`` of the windows ``[j*seq_len, (j+1)*seq_len + 1)`` that are scored.

    All of them, or ``max_windows`` spaced evenly over the stream (the held-out split runs
    from stdlib prose to generated sentences, so a prefix would be biased).
    """
    n_all = (stream_len - 1) // seq_len
    n = n_all if max_windows is None else min(n_all, max_windows)
    if n < 1:
        raise ValueError(f"held-out stream of {stream_len} tokens is shorter than one window "
                         f"of {seq_len}; use more held-out text or a shorter seq_len")
    return [i * n_all // n for i in range(n)]


@torch.no_grad()
def heldout_metrics(model, stream: torch.Tensor, seq_len: int, max_windows: int | None = None,
                    batch: int = 32) -> dict:
    """``{"eval_loss": nats/token, "eval_acc": top-1 next-token accuracy}`` on ``stream``.

    Windows are non-overlapping ``seq_len``-token inputs (each with its ``seq_len`` next-token
    targets), all of them or ``max_windows`` spread evenly. The loss is the mean over windows
    of each batch's mean loss weighted by its window count (every window has ``seq_len``
    targets, so this is the mean per token).
    """
    picked = window_indices(len(stream), seq_len, max_windows)
    was_training = model.training
    model.eval()
    device = _device(model)
    total, correct = 0.0, 0
    for i in range(0, len(picked), batch):
        idx = picked[i:i + batch]
        windows = torch.stack([stream[j * seq_len:(j + 1) * seq_len + 1] for j in idx])
        windows = windows.to(device)
        logits = model(input_ids=windows[:, :-1]).logits.float()
        targets = windows[:, 1:]
        total += next_token_loss(logits, targets).item() * len(idx)
        correct += (logits.argmax(-1) == targets).sum().item()
    model.train(was_training)
    return {"eval_loss": total / len(picked),
            "eval_acc": correct / (len(picked) * seq_len)}


# ------------------------------------------------------------------------------------------
# Multiple choice
# ------------------------------------------------------------------------------------------
@dataclass
class MCSet:
    """A multiple-choice set: ``context`` ``(N, c)``, ``choices`` ``(N, k, m)``, ``answer``
    ``(N,)`` (index of the true continuation) and ``starts`` ``(N,)`` (where each context
    begins in the held-out stream, for provenance). All int64."""

    context: np.ndarray
    choices: np.ndarray
    answer: np.ndarray
    starts: np.ndarray

    def __post_init__(self):
        for name in MC_FIELDS:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        n = len(self.answer)
        if self.context.ndim != 2 or self.choices.ndim != 3 or self.answer.shape != (n,) \
                or self.starts.shape != (n,) or len(self.context) != n or len(self.choices) != n:
            raise ValueError(f"inconsistent multiple-choice arrays: context {self.context.shape}"
                             f", choices {self.choices.shape}, answer {self.answer.shape}, "
                             f"starts {self.starts.shape}; rebuild the set")
        if n and not (0 <= self.answer.min() and self.answer.max() < self.choices.shape[1]):
            raise ValueError("multiple-choice answers outside [0, n_choices); rebuild the set")

    @property
    def n_choices(self) -> int:
        return self.choices.shape[1]


def mc_to_arrays(mc: MCSet, prefix: str = "mc_") -> dict:
    """``{prefix + field: array}`` for ``np.savez``."""
    return {prefix + name: getattr(mc, name) for name in MC_FIELDS}


def mc_from_arrays(arrays, prefix: str = "mc_") -> MCSet:
    """Inverse of :func:`mc_to_arrays` (``arrays``: a dict or an open ``.npz``)."""
    missing = [prefix + n for n in MC_FIELDS if prefix + n not in arrays]
    if missing:
        raise ValueError(f"multiple-choice arrays {missing} missing; rebuild the data folder")
    return MCSet(**{name: arrays[prefix + name] for name in MC_FIELDS})


def _spans_without(stream: np.ndarray, starts: np.ndarray, length: int,
                   boundary_id: int | None) -> np.ndarray:
    """The ``starts`` whose ``length``-token span does not contain ``boundary_id``."""
    if boundary_id is None or len(starts) == 0:
        return starts
    spans = stream[starts[:, None] + np.arange(length)]
    return starts[~(spans == boundary_id).any(axis=1)]


def build_multiple_choice(stream, n_items: int, context_len: int = 48, cont_len: int = 16,
                          n_choices: int = 4, seed: int = 0,
                          boundary_id: int | None = None) -> MCSet:
    """``n_items`` questions cut from ``stream`` (the held-out token stream).

    The stream is tiled into slots of ``context_len + cont_len`` tokens; a seeded permutation
    picks ``n_items`` slots as questions (context, then its true continuation) and tiles the
    remaining slots into ``cont_len``-token distractor spans, so no two spans of the set
    overlap. Spans containing ``boundary_id`` (the end-of-text token: a continuation across a
    document boundary is unpredictable) are never used. A distractor identical to the true
    continuation or to another choice of the same item (repeated text) is replaced by the
    next unused span. The true answer's position is drawn uniformly per item.
    """
    for name, v, lo in (("n_items", n_items, 1), ("context_len", context_len, 1),
                        ("cont_len", cont_len, 1), ("n_choices", n_choices, 2)):
        if int(v) != v or v < lo:
            raise ValueError(f"{name}={v!r} must be an integer >= {lo}")
    s = np.asarray(stream, dtype=np.int64).reshape(-1)
    slot = context_len + cont_len
    rng = np.random.default_rng(seed)
    slots = _spans_without(s, np.arange(len(s) // slot) * slot, slot, boundary_id)
    slots = rng.permutation(slots)
    items, rest = np.sort(slots[:n_items]), slots[n_items:]
    pool = (rest[:, None] + np.arange(slot // cont_len) * cont_len).reshape(-1)
    pool = rng.permutation(_spans_without(s, pool, cont_len, boundary_id))
    need = n_items * (n_choices - 1)
    if len(items) < n_items or len(pool) < need:
        raise ValueError(f"held-out stream of {len(s)} tokens is too short for {n_items} items "
                         f"of {n_choices} choices ({len(slots)} usable slots of {slot} tokens); "
                         "lower mc_items or use more held-out text")
    context = s[items[:, None] + np.arange(context_len)]
    true = s[items[:, None] + context_len + np.arange(cont_len)]
    answer = rng.integers(0, n_choices, size=n_items)
    choices = np.empty((n_items, n_choices, cont_len), dtype=np.int64)
    next_span = 0
    for i in range(n_items):
        picked = [true[i]]
        while len(picked) < n_choices:
            if next_span >= len(pool):
                raise ValueError("too few distinct distractor spans in the held-out stream; "
                                 "lower mc_items or use more held-out text")
            cand = s[pool[next_span]:pool[next_span] + cont_len]
            next_span += 1
            if not any(np.array_equal(cand, p) for p in picked):
                picked.append(cand)
        others = picked[1:]
        for j in range(n_choices):
            choices[i, j] = true[i] if j == answer[i] else others.pop()
    return MCSet(context=context, choices=choices, answer=answer, starts=items)


@torch.no_grad()
def choice_logprobs(model, mc: MCSet, batch: int = 64) -> torch.Tensor:
    """``(N, n_choices)`` total log-probability of each choice's tokens given its context.

    The context is run once per item and its KV cache repeated for the choices (48 + 4 x 15
    tokens per item instead of 4 x 63): the choice tokens then see exactly the keys and
    values a full-sequence pass would give them. ``batch`` counts sequences (item x choice).
    """
    from transformers.cache_utils import DynamicCache

    from coupling.model.blocks import cache_parameter

    n, k, m = mc.choices.shape
    c = mc.context.shape[1]
    n_positions = getattr(model.config, "n_positions", None)
    if n_positions is not None and c + m > n_positions:
        raise ValueError(f"multiple-choice sequences of {c + m} tokens exceed the model's "
                         f"{n_positions} positions; build the set with a shorter context")
    cache_arg = cache_parameter(model) or "past_key_values"
    was_training = model.training
    model.eval()
    device = _device(model)
    per_batch = max(1, batch // k)
    out = []
    for i in range(0, n, per_batch):
        ctx = torch.from_numpy(mc.context[i:i + per_batch]).to(device)
        ch = torch.from_numpy(mc.choices[i:i + per_batch]).to(device)          # (b, k, m)
        b = len(ctx)
        cache = DynamicCache()
        last = model(input_ids=ctx, use_cache=True, logits_to_keep=1,
                     **{cache_arg: cache}).logits[:, -1].float()
        # the context's last logits predict every choice's first token
        total = torch.log_softmax(last, dim=-1).gather(-1, ch[:, :, 0])       # (b, k)
        if m > 1:
            cache.batch_repeat_interleave(k)
            rest = model(input_ids=ch[:, :, :-1].reshape(b * k, m - 1), use_cache=True,
                         **{cache_arg: cache}).logits.float()
            targets = ch[:, :, 1:].reshape(b * k, m - 1, 1)
            logp = torch.log_softmax(rest, dim=-1).gather(-1, targets)
            total = total + logp.sum(dim=(1, 2)).reshape(b, k)
        out.append(total.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, k)


def multiple_choice_accuracy(model, mc: MCSet, batch: int = 64) -> float:
    """Fraction of items whose true continuation has the highest log-probability.

    ``batch`` counts sequences (item x choice) per forward pass; ties go to the lowest index.
    """
    if len(mc.answer) == 0:
        raise ValueError("empty multiple-choice set; build it with n_items >= 1")
    scores = choice_logprobs(model, mc, batch)
    return (scores.argmax(-1).numpy() == mc.answer).mean().item()
