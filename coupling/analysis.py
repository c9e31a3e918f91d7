"""Everything measured on one prompt: the unit of work of the local scan and of Ray actors.

``analyze_prompt(lm, input_ids, settings)`` runs one forward pass, takes the block Jacobians
of the traced token, their top-K SVDs, the depth-wise (and optionally token-wise) coupling,
and the trajectory-regularity measures, and returns a ``PromptResult`` of plain numpy arrays.

``analyze_prompt`` is the local orchestrator over the steps of ``coupling.prompt_steps``
(forward -> per-layer Jacobians and SVDs -> coupling rows -> token grids and regularity ->
assembly); the block-range stages of the Ray pipeline (``ray_jobs.stage``) call the same steps.

Which function the Jacobians are taken of (``ScanSettings.jacobian``):

* ``local`` (default): the smallest one that gives them exactly (``coupling.fastpath``). In a
  causal block ``J_tt`` comes from the one-token function (the prefix's keys/values held
  fixed, as in generation) and ``J_{t1 t2}`` from the block on ``X[:, :t2+1]``; non-causal
  blocks (BERT, ViT) use the whole prompt.  Each local function is checked once against the
  whole prompt and falls back, with a warning, if it does not match.
* ``full``: the block on the whole prompt for every product, the paper authors' method.  Same
  numbers to float32 round-off, ~n times the cost per product (BENCHMARKS.md).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict

from .prompt_steps import (PromptResult, _token_jacobians, assemble, coupling_rows,
                           couple_token, decompose_token, depth_part, fast_block,
                           layer_function, layer_jacobians, layer_svds, lens_heads, norm_kind,
                           record_spectra, spectral_flags, token_grids, traced_tokens,
                           trajectory_regularity)
from .svd import resolve_method
from .settings import JACOBIAN_FUNCTIONS, MEASURES, parse_token_layers, settings_dataclass
from .trajectory import LAST_BLOCKS, ForwardRecord, check_last_block, run_forward, with_last_block

# names kept importable from here (the steps moved to coupling.prompt_steps)
__all__ = ["ScanSettings", "PromptResult", "analyze_prompt", "jacobian_function_report",
           "DEFAULT_CHUNK", "coupling_rows", "fast_block", "layer_function", "layer_jacobians",
           "layer_svds", "norm_kind", "record_spectra", "spectral_flags", "_token_jacobians"]


# Products per batch.  One-token products are cheap and batch well up to ~128
# (BENCHMARKS.md); a product on many tokens holds their activations, so fewer at once.
DEFAULT_CHUNK = {"one-token": 128, "tokens": 64}


@settings_dataclass("analysis")
class ScanSettings:
    """Knobs of the per-prompt analysis: the ``analysis`` settings of
    :mod:`coupling.settings` (fields, defaults and help are listed there, once)."""

    def __post_init__(self):
        if isinstance(self.measures, str):
            self.measures = tuple(m.strip() for m in self.measures.split(",") if m.strip())
        self.measures = tuple(self.measures)
        bad = [m for m in self.measures if m not in MEASURES]
        if bad:
            raise ValueError(f"unknown measure(s) {bad}: use a comma list of {', '.join(MEASURES)}")
        if self.token not in ("last", "all"):
            raise ValueError(f"--token must be 'last' or 'all', got {self.token!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"--k must be a positive integer, got {self.k!r}")
        resolve_method(self.svd, 10**6)  # validates the name
        if self.jacobian not in JACOBIAN_FUNCTIONS:
            raise ValueError(f"--jacobian must be one of {', '.join(JACOBIAN_FUNCTIONS)}, "
                             f"got {self.jacobian!r}")
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"--chunk must be a positive integer, got {self.chunk!r}")
        if self.arpack_maxiter is not None and (not isinstance(self.arpack_maxiter, int)
                                                or self.arpack_maxiter < 1):
            raise ValueError(f"arpack_maxiter must be a positive integer, got {self.arpack_maxiter!r}")
        if self.token_layers is not None:
            self.token_layers = parse_token_layers(self.token_layers)
        self._resolve_last_block()

    def _resolve_last_block(self):
        """Validate ``last_block``; map the deprecated ``final_norm_in_last`` onto it."""
        check_last_block(self.last_block)
        if self.final_norm_in_last is None:
            return
        alias = LAST_BLOCKS[0] if self.final_norm_in_last else "raw"
        if self.last_block != LAST_BLOCKS[0] and self.last_block != alias:
            raise ValueError(f"final_norm_in_last={self.final_norm_in_last} contradicts "
                             f"last_block={self.last_block!r}: drop final_norm_in_last")
        warnings.warn(f"final_norm_in_last is deprecated: use last_block: {alias}",
                      DeprecationWarning, stacklevel=3)
        self.last_block, self.final_norm_in_last = alias, None

    def products_per_batch(self, one_token: bool) -> int:
        """``chunk``, or its default for one-token products / products on many tokens."""
        return self.chunk or DEFAULT_CHUNK["one-token" if one_token else "tokens"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("final_norm_in_last")       # always resolved into last_block
        return d


# ------------------------------------------------------------------------------------------
# The whole prompt: the steps of coupling.prompt_steps on the whole model
# ------------------------------------------------------------------------------------------
def analyze_prompt(lm, input_ids, settings: ScanSettings, prompt_id: str = "prompt",
                   meta: dict | None = None, record: ForwardRecord | None = None) -> PromptResult:
    timings = {}
    t0 = time.perf_counter()
    if record is None:
        record = run_forward(lm, input_ids, last_block=settings.last_block)
    else:      # a record made elsewhere: X^L as settings.last_block says
        record = with_last_block(record, settings.last_block, lm.model)
    timings["forward"] = time.perf_counter() - t0
    d = record.hidden_states.shape[-1]
    if settings.k > d:
        raise ValueError(f"K={settings.k} is larger than the model width d={d}: lower --k")
    depth = tokens = regularity = None
    if "depth" in settings.measures:
        t0 = time.perf_counter()
        depth = [_depth(lm.model, record, settings)]
        timings["depth"] = time.perf_counter() - t0
    if "tokens" in settings.measures:
        t0 = time.perf_counter()
        tokens = token_grids(record, settings, lm.model)
        timings["tokens"] = time.perf_counter() - t0
    if "regularity" in settings.measures:
        t0 = time.perf_counter()
        regularity = trajectory_regularity(record.hidden_states, settings.lss_window,
                                           *lens_heads(lm.model, settings.last_block))
        timings["regularity"] = time.perf_counter() - t0
    return assemble(prompt_id, record.n_tokens, meta, depth, tokens, regularity, timings)


def _depth(model, record: ForwardRecord, settings: ScanSettings) -> dict:
    """Every layer's Jacobians, SVDs and coupling rows, one traced token at a time (only
    one token's Jacobians are held at once)."""
    L = record.n_layers
    rows, flags, blocks, functions = [], [], {}, {}
    record.cache["deflation"] = {}       # filled by layer_jacobians (--deflate-ln)
    for t in traced_tokens(record.n_tokens, settings):
        jac, svds = decompose_token(record, range(1, L + 1), t, settings, model, blocks,
                                    functions)
        grid, flag = couple_token(jac, svds, L, settings.k)
        rows.append(grid)
        flags.append(flag)
    return depth_part(rows, flags, svds, functions, record.cache.get("deflation", {}))


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
