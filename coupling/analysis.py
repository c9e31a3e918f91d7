"""Everything measured on one prompt: the unit of work of the local scan and of Ray actors.

``analyze_prompt(lm, input_ids, settings)`` runs one forward pass, takes the block Jacobians
of the traced token, their top-K SVDs, the depth-wise (and optionally token-wise) coupling,
and the trajectory-regularity measures, and returns a ``PromptResult`` of plain numpy arrays.

The steps are separate functions so a block-range (pipelined) runner can do them per stage:
``layer_jacobians`` / ``layer_svds`` for its own layers, ``coupling_rows`` for its rows of the
``L x L`` grid given every layer's ``d x K`` singular-vector blocks.

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
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import regularity as reg
from .blocks import find_final_norm, residual_branch
from .fastpath import FastBlock, is_causal
from .coupling_metrics import (context_coupling_fixed_input, context_coupling_fixed_output,
                               mean_off_diagonal, nan_off_diagonal, pairwise_coupling,
                               token_grid_pairs, token_self_coupling)
from .deflation import deflate_block, norm_placement
from .jacobian import BlockJacobian, exact_jacobians, exact_jacobians_from_input
from .spectral_gap import undetermined, unit_roundoff
from .svd import dense_top_k, resolve_method, svd_of_dense, top_k_svd
from .settings import JACOBIAN_FUNCTIONS, MEASURES, parse_token_layers, settings_dataclass
from .trajectory import (LAST_BLOCKS, ForwardRecord, check_last_block, logit_lens_head,
                         run_forward, with_last_block)

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


@dataclass
class PromptResult:
    """Per-prompt measurements, numpy only (picklable, cheap to ship between Ray actors)."""

    prompt_id: str
    n_tokens: int
    meta: dict
    summary: dict                              # scalar per-prompt measures
    layers: dict                               # name -> (L+1,) per-layer curves
    depth_normalized: np.ndarray | None = None  # (L, L)
    depth_raw: np.ndarray | None = None         # (L, L)
    singular_values: np.ndarray | None = None   # (L, K) of the traced token's J^l_{tt}
    next_singular_values: np.ndarray | None = None  # (L,) its s_{K+1} (nan when K = d)
    # (L,) bool per layer, over every traced token: "undetermined" (the s_K/s_{K+1} gap is
    # within round-off, coupling.spectral_gap), "svd_fallback" (ARPACK fell back to dense)
    spectral_flags: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)  # token-wise grids (n, n)
    pca: np.ndarray | None = None               # (L+1, n, 2) projections
    timings: dict = field(default_factory=dict)
    # which function each Jacobian was taken of: {"depth": {l: [kind, reason]}, "tokens": ...}
    # kind: one-token | truncated | full (whole prompt); reason: why not the cheapest one
    jacobian_functions: dict = field(default_factory=dict)
    # --deflate-ln: {str(l): DeflationRecord dict} of the last traced token (coupling.deflation)
    deflation: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Jacobians and their SVDs, per layer
# ------------------------------------------------------------------------------------------
def norm_kind(model) -> str:
    norm = find_final_norm(model)
    return "rmsnorm" if norm is not None and "rms" in type(norm).__name__.lower() else "layernorm"


def layer_norm_module(record: ForwardRecord, l: int, settings: ScanSettings, model=None):
    """The final norm when it is folded into block ``l`` (the last one), else ``None``."""
    if settings.last_block == "with-final-norm" and l == record.n_layers and model is not None:
        return find_final_norm(model)
    return None


def layer_function(record: ForwardRecord, l: int, settings: ScanSettings, model=None):
    """``f^l`` (1-based ``l``) on the whole prompt, final norm folded into the last block if asked."""
    return residual_branch(record.calls[l - 1],
                           final_norm=layer_norm_module(record, l, settings, model))


def fast_block(record: ForwardRecord, l: int, settings: ScanSettings, model=None) -> FastBlock:
    """The local functions of block ``l`` (1-based) for this prompt."""
    return FastBlock(record.calls[l - 1], final_norm=layer_norm_module(record, l, settings, model),
                     name=f"layer {l}")


def layer_jacobians(record: ForwardRecord, layers, t: int, settings: ScanSettings,
                    model=None, kind: str = "layernorm", blocks: dict | None = None,
                    functions: dict | None = None) -> dict:
    """``{l: J^l_{tt}}``: dense (exact path) or a matrix-free operator, optionally deflated.

    ``blocks``: a dict kept across calls for several tokens ``t`` of the same ``record``, so
    each layer's :class:`FastBlock` (its prefix keys/values, its checks) is built once.
    ``functions``: filled with ``{str(l): [kind, reason]}``, the function each ``J^l`` was taken of
    (:meth:`FastBlock.function_used`), so a fall-back to a slower one is never silent.
    """
    d = record.hidden_states.shape[-1]
    dense = resolve_method(settings.svd, d) == "exact"
    blocks = {} if blocks is None else blocks
    out = {}
    for l in layers:
        if settings.jacobian == "local":
            if l not in blocks:
                blocks[l] = fast_block(record, l, settings, model)
            fb = blocks[l]
            chunk = settings.products_per_batch(one_token=fb.causal)
            J = fb.jacobian(t, t, chunk=chunk) if dense else fb.operator(t, t, chunk)
            if functions is not None:
                functions[str(l)] = list(fb.function_used(t, t))
        else:
            if functions is not None:
                functions[str(l)] = ["full", "asked for (--jacobian full)"]
            f = layer_function(record, l, settings, model)
            X = record.calls[l - 1].input.float()
            chunk = settings.products_per_batch(one_token=False)
            J = exact_jacobians(f, X, t, [t], chunk, f"layer {l}")[0] if dense else \
                BlockJacobian(f, X, t, t, chunk, f"layer {l}")
        if settings.deflate_ln:
            J = _deflated(J, record, l, t, settings, model)
        out[l] = J
    return out


def _deflated(J, record, l, t, settings, model):
    """``J^l_{tt}`` less its trivial directions, only where they are verified to be exact
    (post-norm blocks; pre-norm ones come back unchanged): ``coupling.deflation``.  What was
    found and removed goes to ``record.cache["deflation"][l]`` (the last traced token's)."""
    key = ("placement", l)
    if key not in record.cache:     # where the norms sit: one block replay per layer
        final = layer_norm_module(record, l, settings, model)
        record.cache[key] = norm_placement(record.calls[l - 1], final)
    J, rec = deflate_block(J, record.cache[key], t)
    if rec.placement == "post-norm" and not rec.verified:
        warnings.warn(f"--deflate-ln: layer {l} is post-norm but its trivial directions did "
                      "not verify, so nothing was removed there (see the deflation record)")
    record.cache.setdefault("deflation", {})[str(l)] = rec.to_dict()
    return J


def layer_svds(jacobians: dict, settings: ScanSettings) -> dict:
    """``{l: SVDResult}``: top-K triplets and ``s_{K+1}`` of each ``J^l`` (ARPACK capped at
    ``settings.arpack_maxiter`` restarts, its dense fall-back recorded in ``fallback``)."""
    out = {}
    for l, J in jacobians.items():
        if isinstance(J, torch.Tensor):
            if settings.svd == "exact":    # asked for the full SVD (the reference)
                out[l] = svd_of_dense(J, settings.k)
            else:                          # auto: the cheaper exact route for (d, K)
                out[l] = dense_top_k(J, settings.k, seed=settings.seed,
                                     maxiter=settings.arpack_maxiter)
        else:
            out[l] = top_k_svd(J, settings.k, settings.svd, oversample=settings.oversample,
                               n_iter=settings.n_iter, seed=settings.seed,
                               maxiter=settings.arpack_maxiter)
    return out


def spectral_flags(svds: dict) -> dict:
    """``{l: (undetermined, fell_back)}`` of one traced token's SVDs: whether the top-K
    subspace of ``J^l`` is not determined at the precision its values came in (the
    ``s_K / s_{K+1}`` gap against round-off, :mod:`coupling.spectral_gap`), and whether
    ARPACK fell back to the dense SVD."""
    out = {}
    for l, s in svds.items():
        d = min(s.U.shape[0], s.V.shape[0])
        out[l] = (undetermined(s.S, s.s_next, d, unit_roundoff(s.S.dtype)),
                  s.fallback is not None)
    return out


def record_spectra(res: PromptResult, last: dict, flags: list):
    """Store the depth-wise spectra: ``last`` = ``{l: SVDResult}`` of the last traced token
    (values, ``s_{K+1}``), ``flags`` = :func:`spectral_flags` of every traced token (a layer
    is flagged when any token's is), and their counts in the summary."""
    layers = sorted(last)
    res.singular_values = np.stack([last[l].S.double().cpu().numpy() for l in layers])
    res.next_singular_values = np.array([np.nan if last[l].s_next is None
                                         else float(last[l].s_next) for l in layers])
    res.spectral_flags = {name: np.array([any(f[l][i] for f in flags) for l in layers])
                          for i, name in enumerate(("undetermined", "svd_fallback"))}
    res.summary["depth_undetermined_layers"] = int(res.spectral_flags["undetermined"].sum())
    res.summary["depth_svd_fallbacks"] = int(res.spectral_flags["svd_fallback"].sum())


def coupling_rows(jacobians: dict, svds: dict, n_layers: int, k: int) -> dict:
    """Rows ``l`` (the keys of ``jacobians``) of the ``L x L`` grids, against all ``svds``.

    Returns ``{"normalized": (len(rows), L), "raw": (len(rows), L)}``; only ``d x K`` blocks
    of the other layers are needed, which is what a pipeline stage receives.
    """
    rows = sorted(jacobians)
    refs = [svds[l].as_tuple() if l in svds else None for l in range(1, n_layers + 1)]
    return pairwise_coupling([jacobians[l] for l in rows], refs, k=k,
                             variants=("normalized", "raw"))


# ------------------------------------------------------------------------------------------
# The whole prompt
# ------------------------------------------------------------------------------------------
def analyze_prompt(lm, input_ids, settings: ScanSettings, prompt_id: str = "prompt",
                   meta: dict | None = None, record: ForwardRecord | None = None) -> PromptResult:
    timings = {}
    t0 = time.perf_counter()
    if record is None:
        record = run_forward(lm, input_ids, last_block=settings.last_block)
    else:      # a record made elsewhere (a pipeline stage): X^L as settings.last_block says
        record = with_last_block(record, settings.last_block, lm.model)
    timings["forward"] = time.perf_counter() - t0
    n, d = record.n_tokens, record.hidden_states.shape[-1]
    if settings.k > d:
        raise ValueError(f"K={settings.k} is larger than the model width d={d}: lower --k")
    res = PromptResult(prompt_id, n, dict(meta or {}), {}, {})
    record.cache["deflation"] = res.deflation      # filled by _deflated, layer by layer
    if "depth" in settings.measures:
        t0 = time.perf_counter()
        _depth(lm, record, settings, res)
        timings["depth"] = time.perf_counter() - t0
    if "tokens" in settings.measures:
        t0 = time.perf_counter()
        _tokens(lm, record, settings, res)
        timings["tokens"] = time.perf_counter() - t0
    if "regularity" in settings.measures:
        t0 = time.perf_counter()
        _regularity(lm, record, settings, res)
        timings["regularity"] = time.perf_counter() - t0
    res.timings = timings
    return res


def _depth(lm, record, settings, res):
    L, n = record.n_layers, record.n_tokens
    kind = norm_kind(lm.model)
    targets = [n - 1] if settings.token == "last" else list(range(n))
    norm_grids, raw_grids, flags, blocks, functions = [], [], [], {}, {}
    for t in targets:
        jac = layer_jacobians(record, range(1, L + 1), t, settings, lm.model, kind, blocks,
                              functions)
        svds = layer_svds(jac, settings)
        grid = coupling_rows(jac, svds, L, settings.k)
        norm_grids.append(grid["normalized"])
        raw_grids.append(grid["raw"])
        flags.append(spectral_flags(svds))
    res.jacobian_functions["depth"] = functions
    res.depth_normalized = np.mean(norm_grids, axis=0)
    res.depth_raw = np.mean(raw_grids, axis=0)
    res.summary["depth_mis_coupling_mean"] = float(mean_off_diagonal(res.depth_normalized))
    res.summary["depth_mis_coupling_raw_mean"] = float(mean_off_diagonal(res.depth_raw))
    res.summary["depth_nan_entries"] = nan_off_diagonal(res.depth_normalized, res.depth_raw)
    record_spectra(res, svds, flags)     # the last token's spectra, every token's flags


def _tokens(lm, record, settings, res):
    """Token-wise coupling at layers (l, l'): self, context fixed-input (t1=0), fixed-output (last)."""
    L, n = record.n_layers, record.n_tokens
    l, lp = settings.token_layers or (max(1, L // 2), min(L, L // 2 + 1))
    for x in (l, lp):
        if not 1 <= x <= L:
            raise ValueError(f"token layer {x} out of range 1..{L}")
    k = min(settings.k, record.hidden_states.shape[-1])
    causal = is_causal(record.calls[l - 1])   # a pipeline stage records only its own blocks
    # the three grids read only J_tt, J_{0 t} and J_{t, n-1}: 3n - 3 of the n(n+1)/2 pairs.
    # Layer l' first, kept only as its SVD factors; then layer l's Jacobians (the rows).
    pairs = token_grid_pairs(n, 0, n - 1, causal)
    J_lp = _token_jacobians(record, lp, settings, lm.model, pairs)
    S = {key: svd_of_dense(M, k).as_tuple() for key, M in J_lp.items()}
    J_l = J_lp if l == lp else _token_jacobians(record, l, settings, lm.model, pairs)
    del J_lp
    res.tokens["self"] = token_self_coupling([J_l[(t, t)] for t in range(n)],
                                             [S[(t, t)] for t in range(n)], k)["normalized"]
    res.tokens["fixed_input"] = context_coupling_fixed_input(J_l, S, 0, k, n=n,
                                                             causal=causal)["normalized"]
    res.tokens["fixed_output"] = context_coupling_fixed_output(J_l, S, n - 1, k, n=n,
                                                               causal=causal)["normalized"]
    res.meta["token_layers"] = [l, lp]


def _token_jacobians(record, layer, settings, model, pairs) -> dict:
    """``{(t1, t2): J_{t1 t2}}`` (dense, d x d) of one layer for the token ``pairs`` asked.

    One VJP sweep at output ``t2`` gives ``J_{t1 t2}`` for every ``t1``; one JVP sweep at
    input ``t1`` gives it for every ``t2``.  Causal blocks on the local path: the diagonal
    from the one-token function, an output with several inputs asked by a VJP sweep (on
    ``X[:, :t2+1]``), an input with several outputs asked by a JVP sweep, what is left one
    Jacobian at a time.  Otherwise (non-causal blocks, or ``--jacobian full``, every product
    on the whole prompt): one VJP sweep per output token asked, keeping only its pairs.
    """
    chunk = settings.products_per_batch(one_token=False)
    by_out = {}
    for t1, t2 in sorted(pairs):
        by_out.setdefault(t2, []).append(t1)
    if settings.jacobian == "local":
        fb = fast_block(record, layer, settings, model)
        if fb.causal:
            return _causal_local_jacobians(fb, pairs, settings)
        sweep = lambda t2, t1s: fb.jacobians(t2, t1s, chunk=chunk)  # noqa: E731
    else:
        f = layer_function(record, layer, settings, model)
        X = record.calls[layer - 1].input.float()
        sweep = lambda t2, t1s: exact_jacobians(f, X, t2, t1s, chunk, f"layer {layer}")  # noqa: E731
    out = {}
    for t2, t1s in by_out.items():
        out.update({(t1, t2): J for t1, J in zip(t1s, sweep(t2, t1s))})
    return out


def _causal_local_jacobians(fb: FastBlock, pairs, settings) -> dict:
    """:func:`_token_jacobians` for a causal block on the local path (see there)."""
    chunk = settings.products_per_batch(one_token=False)
    todo = {p for p in pairs if p[0] <= p[1]}     # t1 > t2: zero in a causal block, unused
    out = {}
    rows = {}
    for t1, t2 in todo:
        if t1 != t2:
            rows.setdefault(t2, []).append(t1)
    for t2, t1s in rows.items():                  # outputs asked with several inputs
        if len(t1s) > 1:
            t1s = sorted(t1s + ([t2] if (t2, t2) in todo else []))
            out.update({(t1, t2): J for t1, J in zip(t1s, fb.jacobians(t2, t1s, chunk=chunk))})
    cols = {}
    for t1, t2 in todo - set(out):
        if t1 != t2:
            cols.setdefault(t1, []).append(t2)
    for t1, t2s in cols.items():                  # inputs asked with several outputs
        if len(t2s) > 1:
            J = exact_jacobians_from_input(fb.full_function(), fb.X, t1, chunk, fb.name)
            out.update({(t1, t2): J[t2] for t2 in t2s + ([t1] if (t1, t1) in todo else [])})
    one = settings.products_per_batch(one_token=True)
    for t1, t2 in sorted(todo - set(out)):        # the diagonal: one token each
        out[(t1, t2)] = fb.jacobian(t1, t2, chunk=one if t1 == t2 else chunk)
    return out


def _regularity(lm, record, settings, res):
    X = record.hidden_states.double().cpu().numpy()          # (L+1, n, d)
    L, n = record.n_layers, record.n_tokens
    last = X[:, -1, :]
    lss_tok = reg.line_shape_score(X)
    res.summary.update(
        lss=float(np.mean(lss_tok)), lss_last=float(lss_tok[-1]),
        expodistance=float(np.mean(reg.expodistance(X))),
        expodistance_last=float(reg.expodistance(last)),
        equidistance_cv=float(np.mean(reg.equidistance_cv(X))))
    layers = {"layer": np.arange(L + 1), "norm": np.linalg.norm(last, axis=-1),
              "norm_mean_tokens": reg.layer_norms(X).mean(axis=1),
              "step": np.concatenate([[np.nan], reg.step_sizes(last)])}
    if L + 1 >= settings.lss_window:
        layers["windowed_lss"] = reg.windowed_lss(last, settings.lss_window)
    else:
        layers["windowed_lss"] = np.full(L + 1, np.nan)
    head = logit_lens_head(lm)
    if head is not None:
        unembed = lm.model.get_output_embeddings()
        last_head = lambda h: unembed(h.to(unembed.weight.dtype)).float()  # noqa: E731
        normed = record.last_block == "with-final-norm"    # X^L already carries the norm
        H = reg.logit_lens_entropy(record.hidden_states, head, last_head if normed else None)
        layers["entropy"] = H[:, -1]
        layers["entropy_mean_tokens"] = H.mean(1)
    res.layers = layers
    if n >= 3:   # a 2-component PCA fitted on the last layer's n states needs n >= 3
        res.pca = reg.pca_projection(X, 2).projections.astype(np.float32)



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
