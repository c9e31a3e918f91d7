"""The steps of one prompt's analysis, each a function of only what it needs.

``coupling.analysis.prompt.analyze_prompt`` (the whole model in one process) and the block-range
stages of the Ray pipeline (``ray_jobs.stage``) are both built from these, so the two give
the same numbers because they run the same code:

1. forward (``coupling.model.trajectory``): a ``ForwardRecord`` of the whole model, or of a
   stage's own blocks only (real calls and states; another layer is a clear error);
2. per traced token (:func:`traced_tokens`), :func:`decompose_token`: the Jacobians and
   SVDs of some layers -- only their ``d x K`` factors need to travel;
3. :func:`couple_token`: their rows of the ``L x L`` grids given every layer's factors,
   averaged over the traced tokens by :func:`depth_part`;
4. :func:`token_grids` at the layers :func:`token_layers` picks, and
   :func:`trajectory_regularity` of a full trajectory with the logit lens (:func:`lens_heads`);
5. :func:`assemble`: one :class:`PromptResult`, summary fields and spectral flags included.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from coupling.jacobian.block_jacobian import (BlockJacobian, exact_jacobians,
                                              exact_jacobians_from_input)
from coupling.jacobian.fastpath import FastBlock
from coupling.measures import regularity as reg
from coupling.measures.coupling_grids import (context_coupling_fixed_input,
                                              context_coupling_fixed_output, pairwise_coupling,
                                              token_grid_pairs, token_self_coupling)
from coupling.measures.coupling_scores import mean_off_diagonal, nan_off_diagonal
from coupling.model.blocks import find_final_norm, residual_branch
from coupling.model.hf_call import is_causal
from coupling.model.trajectory import ForwardRecord, lens_head
from coupling.spectrum.deflation import deflate_block, norm_placement
from coupling.spectrum.spectral_gap import undetermined, unit_roundoff
from coupling.spectrum.svd import dense_top_k, resolve_method, svd_of_dense, top_k_svd

if TYPE_CHECKING:
    from coupling.settings.scan_settings import ScanSettings


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
    # within round-off, coupling.spectrum.spectral_gap), "svd_fallback" (ARPACK fell back to dense)
    spectral_flags: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)  # token-wise grids (n, n)
    pca: np.ndarray | None = None               # (L+1, n, 2) projections
    timings: dict = field(default_factory=dict)
    # which function each Jacobian was taken of: {"depth": {l: [kind, reason]}, "tokens": ...}
    # kind: one-token | truncated | full (whole prompt); reason: why not the cheapest one
    jacobian_functions: dict = field(default_factory=dict)
    # --deflate-ln: {str(l): DeflationRecord dict} of the last traced token (coupling.spectrum.deflation)
    deflation: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Which tokens and layers are traced (decided here only)
# ------------------------------------------------------------------------------------------
def traced_tokens(n_tokens: int, settings: ScanSettings) -> list:
    """The tokens whose depth-wise Jacobians are taken: the last, or all of them."""
    return [n_tokens - 1] if settings.token == "last" else list(range(n_tokens))


def token_layers(settings: ScanSettings, n_layers: int) -> tuple:
    """The layers ``(l, l')`` of the token-wise grids: asked, or the middle two."""
    L = n_layers
    return tuple(settings.token_layers or (max(1, L // 2), min(L, L // 2 + 1)))


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
    return residual_branch(record.call(l),
                           final_norm=layer_norm_module(record, l, settings, model))


def fast_block(record: ForwardRecord, l: int, settings: ScanSettings, model=None) -> FastBlock:
    """The local functions of block ``l`` (1-based) for this prompt."""
    return FastBlock(record.call(l), final_norm=layer_norm_module(record, l, settings, model),
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
    dense = resolve_method(settings.svd, d, settings.k, record.hidden_states.device) == "exact"
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
            X = record.call(l).input.float()
            chunk = settings.products_per_batch(one_token=False)
            J = exact_jacobians(f, X, t, [t], chunk, f"layer {l}")[0] if dense else \
                BlockJacobian(f, X, t, t, chunk, f"layer {l}")
        if settings.deflate_ln:
            J = _deflated(J, record, l, t, settings, model)
        out[l] = J
    return out


def _deflated(J, record, l, t, settings, model):
    """``J^l_{tt}`` less its trivial directions, only where they are verified to be exact
    (post-norm blocks; pre-norm ones come back unchanged): ``coupling.spectrum.deflation``.  What was
    found and removed goes to ``record.cache["deflation"][l]`` (the last traced token's)."""
    key = ("placement", l)
    if key not in record.cache:     # where the norms sit: one block replay per layer
        final = layer_norm_module(record, l, settings, model)
        record.cache[key] = norm_placement(record.call(l), final)
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
    ``s_K / s_{K+1}`` gap against round-off, :mod:`coupling.spectrum.spectral_gap`), and whether
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


def decompose_token(record: ForwardRecord, layers, t: int, settings: ScanSettings, model=None,
                    blocks: dict | None = None, functions: dict | None = None) -> tuple:
    """Step 2 for one traced token ``t``: ``({l: J^l_tt}, {l: SVDResult})`` of ``layers``
    (``blocks``, ``functions``: see :func:`layer_jacobians`)."""
    jac = layer_jacobians(record, layers, t, settings, model, blocks=blocks, functions=functions)
    return jac, layer_svds(jac, settings)


def couple_token(jacobians: dict, svds: dict, n_layers: int, k: int) -> tuple:
    """Step 3 for one traced token: ``(rows, flags)``, the :func:`coupling_rows` of the
    layers of ``jacobians`` against every layer's factors ``svds`` and their
    :func:`spectral_flags`."""
    return (coupling_rows(jacobians, svds, n_layers, k),
            spectral_flags({l: svds[l] for l in jacobians}))


def depth_part(rows: list, flags: list, spectra: dict, functions: dict,
               deflation: dict) -> dict:
    """The depth-wise result of some layers, over the traced tokens: ``rows`` and ``flags``
    per token (:func:`couple_token`), ``spectra`` = ``{l: SVDResult}`` of the last token,
    ``functions`` / ``deflation`` as :func:`layer_jacobians` filled them.  What
    :func:`assemble` takes, one part per block range in layer order."""
    return {"normalized": np.mean([r["normalized"] for r in rows], axis=0),
            "raw": np.mean([r["raw"] for r in rows], axis=0),
            "spectra": dict(spectra), "flags": list(flags), "functions": dict(functions),
            "deflation": dict(deflation)}


# ------------------------------------------------------------------------------------------
# Token-wise grids and trajectory regularity
# ------------------------------------------------------------------------------------------
def token_grids(record: ForwardRecord, settings: ScanSettings, model=None) -> dict:
    """Token-wise coupling at layers ``(l, l')``: self, context fixed-input (``t1 = 0``),
    fixed-output (the last token).  ``record`` must hold both layers.  Returns
    ``{"grids": {name: (n, n)}, "layers": [l, l']}``."""
    L, n = record.n_layers, record.n_tokens
    l, lp = token_layers(settings, L)
    for x in (l, lp):
        if not 1 <= x <= L:
            raise ValueError(f"token layer {x} out of range 1..{L}")
    k = min(settings.k, record.hidden_states.shape[-1])
    causal = is_causal(record.call(l))
    # the three grids read only J_tt, J_{0 t} and J_{t, n-1}: 3n - 3 of the n(n+1)/2 pairs.
    # Layer l' first, kept only as its SVD factors; then layer l's Jacobians (the rows).
    pairs = token_grid_pairs(n, 0, n - 1, causal)
    J_lp = _token_jacobians(record, lp, settings, model, pairs)
    S = {key: svd_of_dense(M, k).as_tuple() for key, M in J_lp.items()}
    J_l = J_lp if l == lp else _token_jacobians(record, l, settings, model, pairs)
    del J_lp
    grids = {
        "self": token_self_coupling([J_l[(t, t)] for t in range(n)],
                                    [S[(t, t)] for t in range(n)], k)["normalized"],
        "fixed_input": context_coupling_fixed_input(J_l, S, 0, k, n=n,
                                                    causal=causal)["normalized"],
        "fixed_output": context_coupling_fixed_output(J_l, S, n - 1, k, n=n,
                                                      causal=causal)["normalized"]}
    return {"grids": grids, "layers": [l, lp]}


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
        X = record.call(layer).input.float()
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

def lens_heads(model, last_block: str) -> tuple:
    """``(head, last_head)`` of the logit lens: final norm + unembedding for ``X^0..X^{L-1}``
    and, when ``X^L`` already carries the final norm, the unembedding alone for it (else
    None: ``head`` for every layer).  ``(None, None)`` without an output embedding."""
    head = lens_head(model)
    if head is None or last_block != "with-final-norm":
        return head, None
    if isinstance(head, reg.LinearLens):
        return head, head._replace(norm=None)
    unembed = model.get_output_embeddings()
    return head, lambda h: unembed(h.to(unembed.weight.dtype)).float()


def trajectory_regularity(trajectory: torch.Tensor, lss_window: int, head=None,
                          last_head=None) -> dict:
    """Regularity of the full trajectory ``X^0..X^L`` ``(L+1, n, d)`` (``X^L`` as the
    scan's ``last_block`` says) and, given ``head`` (:func:`lens_heads`), the logit-lens
    entropy.  Returns ``{"summary": {...}, "layers": {name: (L+1,)}, "pca": array or None}``."""
    X = trajectory.double().cpu().numpy()          # (L+1, n, d)
    L, n = X.shape[0] - 1, X.shape[1]
    last = X[:, -1, :]
    lss_tok = reg.line_shape_score(X)
    summary = dict(
        lss=float(np.mean(lss_tok)), lss_last=float(lss_tok[-1]),
        expodistance=float(np.mean(reg.expodistance(X))),
        expodistance_last=float(reg.expodistance(last)),
        equidistance_cv=float(np.mean(reg.equidistance_cv(X))))
    layers = {"layer": np.arange(L + 1), "norm": np.linalg.norm(last, axis=-1),
              "norm_mean_tokens": reg.layer_norms(X).mean(axis=1),
              "step": np.concatenate([[np.nan], reg.step_sizes(last)])}
    if L + 1 >= lss_window:
        layers["windowed_lss"] = reg.windowed_lss(last, lss_window)
    else:
        layers["windowed_lss"] = np.full(L + 1, np.nan)
    if head is not None:
        H = reg.logit_lens_entropy(trajectory, head, last_head)
        layers["entropy"] = H[:, -1]
        layers["entropy_mean_tokens"] = H.mean(1)
    # a 2-component PCA fitted on the last layer's n states needs n >= 3
    pca = reg.pca_projection(X, 2).projections.astype(np.float32) if n >= 3 else None
    return {"summary": summary, "layers": layers, "pca": pca}


# ------------------------------------------------------------------------------------------
# The prompt's result
# ------------------------------------------------------------------------------------------
def assemble(prompt_id: str, n_tokens: int, meta: dict | None, depth: list | None = None,
             tokens: dict | None = None, regularity: dict | None = None,
             timings: dict | None = None) -> PromptResult:
    """One :class:`PromptResult` from the parts: ``depth`` = the :func:`depth_part` of each
    block range in layer order (None: not measured), ``tokens`` = :func:`token_grids`,
    ``regularity`` = :func:`trajectory_regularity`."""
    res = PromptResult(prompt_id, n_tokens, dict(meta or {}), {}, {})
    if depth:
        res.depth_normalized = np.concatenate([p["normalized"] for p in depth], axis=0)
        res.depth_raw = np.concatenate([p["raw"] for p in depth], axis=0)
        res.summary["depth_mis_coupling_mean"] = float(mean_off_diagonal(res.depth_normalized))
        res.summary["depth_mis_coupling_raw_mean"] = float(mean_off_diagonal(res.depth_raw))
        res.summary["depth_nan_entries"] = nan_off_diagonal(res.depth_normalized, res.depth_raw)
        spectra = {l: s for p in depth for l, s in p["spectra"].items()}
        flags = [{l: f for p in depth for l, f in p["flags"][i].items()}
                 for i in range(len(depth[0]["flags"]))]          # per traced token
        record_spectra(res, spectra, flags)
        res.jacobian_functions["depth"] = {l: f for p in depth for l, f in p["functions"].items()}
        res.deflation = {l: d for p in depth for l, d in p["deflation"].items()}
    if tokens is not None:
        res.tokens = dict(tokens["grids"])
        res.meta["token_layers"] = list(tokens["layers"])
    if regularity is not None:
        res.summary.update(regularity["summary"])
        res.layers = regularity["layers"]
        res.pca = regularity["pca"]
    res.timings = dict(timings or {})
    return res
