"""Everything measured on one prompt: the unit of work of the local scan and of Ray actors.

``analyze_prompt(lm, input_ids, settings)`` runs one forward pass, takes the block Jacobians
of the traced token, their top-K SVDs, the depth-wise (and optionally token-wise) coupling,
and the trajectory-regularity measures, and returns a ``PromptResult`` of plain numpy arrays.

``analyze_prompt`` is the local orchestrator over the steps of ``coupling.analysis.steps``
(forward -> per-layer Jacobians and SVDs -> coupling rows -> token grids and regularity ->
assembly); the block-range stages of the Ray pipeline (``ray_jobs.stage``) call the same steps.

Which function the Jacobians are taken of (``ScanSettings.jacobian``):

* ``local`` (default): the smallest one that gives them exactly (``coupling.jacobian.fastpath``). In a
  causal block ``J_tt`` comes from the one-token function (the prefix's keys/values held
  fixed, as in generation) and ``J_{t1 t2}`` from the block on ``X[:, :t2+1]``; non-causal
  blocks (BERT, ViT) use the whole prompt.  Each local function is checked once against the
  whole prompt and falls back, with a warning, if it does not match.
* ``full``: the block on the whole prompt for every product, the paper authors' method.  Same
  numbers to float32 round-off, ~n times the cost per product (BENCHMARKS.md).
"""
from __future__ import annotations

import time
from contextlib import ExitStack

from coupling.analysis.depth_passes import couple_layers, decompose_layers, held, holder
from coupling.analysis.steps import (PromptResult, assemble, lens_heads, token_grids,
                                     token_layers, trajectory_regularity)
from coupling.model.block_range import StreamedModel
from coupling.model.trajectory import ForwardRecord, run_forward, with_last_block
from coupling.settings.scan_settings import ScanSettings

__all__ = ["analyze_prompt", "jacobian_function_report"]


# ------------------------------------------------------------------------------------------
# The whole prompt: the steps of coupling.analysis.steps on the whole model
# ------------------------------------------------------------------------------------------
def analyze_prompt(lm, input_ids, settings: ScanSettings, prompt_id: str = "prompt",
                   meta: dict | None = None, record: ForwardRecord | None = None) -> PromptResult:
    """``lm``: a ``LoadedModel`` (every weight in memory) or a ``StreamedModel`` (each
    block read from disk for its turn); either way one block is in compute precision at a
    time (``coupling.analysis.depth_passes``)."""
    timings = {}
    t0 = time.perf_counter()
    if record is None:
        record = (lm.forward(input_ids, settings.last_block) if isinstance(lm, StreamedModel)
                  else run_forward(lm, input_ids, last_block=settings.last_block))
    else:      # a record made elsewhere: X^L as settings.last_block says
        record = with_last_block(record, settings.last_block, lm.model)
    timings["forward"] = time.perf_counter() - t0
    d = record.hidden_states.shape[-1]
    if settings.k > d:
        raise ValueError(f"K={settings.k} is larger than the model width d={d}: lower --k")
    hold = holder(getattr(lm, "blocks", None), settings)
    depth = tokens = regularity = None
    if "depth" in settings.measures:
        t0 = time.perf_counter()
        layers = range(1, record.n_layers + 1)
        kept, factors = decompose_layers(record, layers, settings, lm.model, hold)
        depth = [couple_layers(record, layers, kept, [factors], settings, lm.model, hold)]
        timings["depth"] = time.perf_counter() - t0
    if "tokens" in settings.measures:
        t0 = time.perf_counter()
        with ExitStack() as both:      # the two token layers' blocks (out of range: the error)
            for l in set(token_layers(settings, record.n_layers)) & set(record.layers):
                both.enter_context(held(hold, l))
            tokens = token_grids(record, settings, lm.model)
        timings["tokens"] = time.perf_counter() - t0
    if "regularity" in settings.measures:
        t0 = time.perf_counter()
        regularity = trajectory_regularity(record.hidden_states, settings.lss_window,
                                           *lens_heads(lm.model, settings.last_block))
        timings["regularity"] = time.perf_counter() - t0
    return assemble(prompt_id, record.n_tokens, meta, depth, tokens, regularity, timings)


# ------------------------------------------------------------------------------------------
# Which function the Jacobians were taken of (reported, so a slow fall-back is never silent)
# ------------------------------------------------------------------------------------------
FUNCTION_NAMES = {"one-token": "one-token", "truncated": "truncated prompt",
                  "full": "whole prompt", "zero": "zero"}


def jacobian_function_report(results, n_layers: int, mean_tokens: float | None = None) -> dict:
    """Per layer, which function the depth-wise ``J^l_{tt}`` were taken of, over all prompts.

    Returns ``{"layers": {l: {kind: prompts}}, "reasons": {l: reason}, "line": str}``; ``line``
    is the summary's ``Jacobians`` line: ``one-token on 12/12 layers``, or the layers that used a
    longer function, why, and the expected slowdown per product.
    """
    layers, reasons = {}, {}
    for r in results:
        for l, (kind, reason) in (r.jacobian_functions or {}).get("depth", {}).items():
            l = int(l)
            layers.setdefault(l, {}).setdefault(kind, 0)
            layers[l][kind] += 1
            if reason:
                reasons.setdefault(l, reason)
    return {"layers": {str(l): layers[l] for l in sorted(layers)},
            "reasons": {str(l): reasons[l] for l in sorted(reasons)},
            "line": _function_line(layers, reasons, n_layers, mean_tokens)}


def _function_line(layers: dict, reasons: dict, n_layers: int, mean_tokens) -> str:
    if not layers:
        return "not computed (no depth measure)"
    fast = sorted(l for l, kinds in layers.items() if set(kinds) == {"one-token"})
    slow = sorted(set(layers) - set(fast))
    line = f"one-token on {len(fast)}/{n_layers} layers"
    if not slow:
        return line
    kinds = sorted({k for l in slow for k in layers[l]} - {"one-token"})
    named = ", ".join(FUNCTION_NAMES.get(k, k) for k in kinds)
    cost = (f"; ~{mean_tokens:.0f}x the tokens per product" if mean_tokens else "")
    why = reasons.get(slow[0], "")
    return (f"{line}; {named} on layer{'s' if len(slow) > 1 else ''} "
            f"{_ranges(slow)}{cost}" + (f" ({why})" if why else ""))


def _ranges(ls: list) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out, start = [], None
    for i, l in enumerate(ls):
        if start is None:
            start = l
        if i + 1 == len(ls) or ls[i + 1] != l + 1:
            out.append(str(start) if start == l else f"{start}-{l}")
            start = None
    return ", ".join(out)
