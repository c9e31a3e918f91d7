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
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import regularity as reg
from .blocks import find_final_norm, residual_branch
from .fastpath import FastBlock, is_causal
from .coupling_metrics import (context_coupling_fixed_input, context_coupling_fixed_output,
                               mean_off_diagonal, pairwise_coupling, token_self_coupling)
from .deflation import deflate
from .jacobian import BlockJacobian, exact_jacobians
from .svd import dense_top_k, resolve_method, svd_of_dense, top_k_svd
from .trajectory import ForwardRecord, logit_lens_head, run_forward

MEASURES = ("depth", "tokens", "regularity")
JACOBIAN_FUNCTIONS = ("local", "full")
# Products per batch.  One-token products are cheap and batch well up to ~128
# (BENCHMARKS.md); a product on many tokens holds their activations, so fewer at once.
DEFAULT_CHUNK = {"one-token": 128, "tokens": 64}


@dataclass
class ScanSettings:
    """Knobs of the per-prompt analysis (the CLI flags and YAML keys of the same names)."""

    k: int = 10
    svd: str = "auto"                 # auto | exact | randomized | lanczos
    jacobian: str = "local"           # local (fast, exact) | full (whole prompt, the reference)
    token: str = "last"               # last | all: which token's J^l_{tt} the depth grid uses
    measures: tuple = ("depth", "regularity")
    final_norm_in_last: bool = False  # f^L = norm(block_L(X)) - X (authors' release)
    deflate_ln: bool = False          # project out trivial LayerNorm/RMSNorm directions
    token_layers: tuple | None = None  # (l, l') for token-wise coupling, 1-based; default middle
    lss_window: int = 11
    n_iter: int = 4                   # randomized SVD power iterations
    oversample: int = 10
    seed: int = 0
    chunk: int | None = None          # products per batch (memory); None: 128 one-token, else 64

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
        if self.token_layers is not None:
            self.token_layers = tuple(int(x) for x in self.token_layers)

    def products_per_batch(self, one_token: bool) -> int:
        """``chunk``, or its default for one-token products / products on many tokens."""
        return self.chunk or DEFAULT_CHUNK["one-token" if one_token else "tokens"]

    def to_dict(self) -> dict:
        return asdict(self)


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
    tokens: dict = field(default_factory=dict)  # token-wise grids (n, n)
    pca: np.ndarray | None = None               # (L+1, n, 2) projections
    timings: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Jacobians and their SVDs, per layer
# ------------------------------------------------------------------------------------------
def norm_kind(model) -> str:
    norm = find_final_norm(model)
    return "rmsnorm" if norm is not None and "rms" in type(norm).__name__.lower() else "layernorm"


def layer_norm_module(record: ForwardRecord, l: int, settings: ScanSettings, model=None):
    """The final norm when it is folded into block ``l`` (the last one), else ``None``."""
    if settings.final_norm_in_last and l == record.n_layers and model is not None:
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
                    model=None, kind: str = "layernorm", blocks: dict | None = None) -> dict:
    """``{l: J^l_{tt}}``: dense (exact path) or a matrix-free operator, optionally deflated.

    ``blocks``: a dict kept across calls for several tokens ``t`` of the same ``record``, so
    each layer's :class:`FastBlock` (its prefix keys/values, its checks) is built once.
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
        else:
            f = layer_function(record, l, settings, model)
            X = record.calls[l - 1].input.float()
            chunk = settings.products_per_batch(one_token=False)
            J = exact_jacobians(f, X, t, [t], chunk, f"layer {l}")[0] if dense else \
                BlockJacobian(f, X, t, t, chunk, f"layer {l}")
        if settings.deflate_ln:
            J = _deflated(J, record, l, t, kind, dense)
        out[l] = J
    return out


def _deflated(J, record, l, t, kind, dense):
    x_in = record.hidden_states[l - 1, t]
    x_out = record.hidden_states[l, t]
    ones = kind == "layernorm"
    J = deflate(J, in_vectors=[x_in], out_vectors=[x_out], include_ones=ones)
    return J.to_dense() if dense else J


def layer_svds(jacobians: dict, settings: ScanSettings) -> dict:
    out = {}
    for l, J in jacobians.items():
        if isinstance(J, torch.Tensor):
            if settings.svd == "exact":    # asked for the full SVD (the reference)
                out[l] = svd_of_dense(J, settings.k)
            else:                          # auto: the cheaper exact route for (d, K)
                out[l] = dense_top_k(J, settings.k, seed=settings.seed)
        else:
            out[l] = top_k_svd(J, settings.k, settings.svd, oversample=settings.oversample,
                               n_iter=settings.n_iter, seed=settings.seed)
    return out


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
    record = record or run_forward(lm, input_ids)
    timings["forward"] = time.perf_counter() - t0
    L, n, d = record.n_layers, record.n_tokens, record.hidden_states.shape[-1]
    if settings.k > d:
        raise ValueError(f"K={settings.k} is larger than the model width d={d}: lower --k")
    res = PromptResult(prompt_id, n, dict(meta or {}), {}, {})
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
    norm_grids, raw_grids, svals, blocks = [], [], [], {}
    for t in targets:
        jac = layer_jacobians(record, range(1, L + 1), t, settings, lm.model, kind, blocks)
        svds = layer_svds(jac, settings)
        grid = coupling_rows(jac, svds, L, settings.k)
        norm_grids.append(grid["normalized"])
        raw_grids.append(grid["raw"])
        svals.append(np.stack([svds[l].S.double().cpu().numpy() for l in range(1, L + 1)]))
    res.depth_normalized = np.mean(norm_grids, axis=0)
    res.depth_raw = np.mean(raw_grids, axis=0)
    res.singular_values = svals[-1]      # the last token's spectra
    res.summary["depth_mis_coupling_mean"] = float(mean_off_diagonal(res.depth_normalized))
    res.summary["depth_mis_coupling_raw_mean"] = float(mean_off_diagonal(res.depth_raw))


def _tokens(lm, record, settings, res):
    """Token-wise coupling at layers (l, l'): self, context fixed-input (t1=0), fixed-output (last)."""
    L, n = record.n_layers, record.n_tokens
    l, lp = settings.token_layers or (max(1, L // 2), min(L, L // 2 + 1))
    for x in (l, lp):
        if not 1 <= x <= L:
            raise ValueError(f"token layer {x} out of range 1..{L}")
    k = min(settings.k, record.hidden_states.shape[-1])
    causal = is_causal(record.calls[l - 1])   # a pipeline stage records only its own blocks
    # one VJP sweep per output token t2 gives J_{t1 t2} for every t1 at once; in a causal
    # block the local path takes it on X[:, :t2+1], the tokens t1 <= t2 can reach
    J = {layer: {} for layer in (l, lp)}
    for layer in {l, lp}:
        jacobians_at = _token_jacobians(record, layer, settings, lm.model)
        for t2 in range(n):
            all_t1 = jacobians_at(t2)
            for t1 in range(n):
                if not causal or t1 <= t2:
                    J[layer][(t1, t2)] = all_t1[t1]
    S = {key: svd_of_dense(M, k).as_tuple() for key, M in J[lp].items()}
    res.tokens["self"] = token_self_coupling([J[l][(t, t)] for t in range(n)],
                                             [S[(t, t)] for t in range(n)], k)["normalized"]
    res.tokens["fixed_input"] = context_coupling_fixed_input(J[l], S, 0, k, n=n,
                                                             causal=causal)["normalized"]
    res.tokens["fixed_output"] = context_coupling_fixed_output(J[l], S, n - 1, k, n=n,
                                                               causal=causal)["normalized"]
    res.meta["token_layers"] = [l, lp]


def _token_jacobians(record, layer, settings, model):
    """``t2 -> (n, d, d)``: the stack of ``J_{t1 t2}`` over all ``t1`` for one layer."""
    chunk = settings.products_per_batch(one_token=False)   # J_{t1 t2}: t2 + 1 tokens
    if settings.jacobian == "local":
        fb = fast_block(record, layer, settings, model)
        return lambda t2: fb.jacobians(t2, chunk=chunk)
    f = layer_function(record, layer, settings, model)
    X = record.calls[layer - 1].input.float()
    return lambda t2: exact_jacobians(f, X, t2, None, chunk, f"layer {layer}")


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
        H = reg.logit_lens_entropy(record.hidden_states, head, last_head)   # (L+1, n)
        layers["entropy"] = H[:, -1]
        layers["entropy_mean_tokens"] = H.mean(1)
    res.layers = layers
    if n >= 3:   # a 2-component PCA fitted on the last layer's n states needs n >= 3
        res.pca = reg.pca_projection(X, 2).projections.astype(np.float32)

