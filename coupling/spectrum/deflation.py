"""LN deflation: find a block's trivial directions from where its norm sits, verify, remove.

Which directions of a block Jacobian ``J = J_f`` (``f = F - I``, the residual branch) are
"trivial" -- fixed by the architecture, shared by every layer, unrelated to what was learned --
depends on the placement of the normalization (docs/deflation.md has the derivation and the
measured numbers):

* **pre-norm** (GPT-2, Pythia: LayerNorm; Llama, Mistral: RMSNorm).  Every path from the block
  input into ``f`` starts with a norm.  A LayerNorm ignores shifts along the all-ones vector,
  so ``J 1 = 0`` exactly; nothing else is null (the second norm reads ``x + a(LN x)``, not
  ``x``), and an RMSNorm block has no null direction at all.  A null direction has singular
  value 0 and can never enter the top-K, so there is nothing to remove: deflation is a
  **verified no-op** (``J`` is returned unchanged, ``‖J 1‖ / ‖J‖₂`` is recorded).
* **post-norm** (BERT-style encoders; also the last block of any model when the final norm is
  folded into it, the paper's Eq. 7).  ``F = N ∘ G`` with ``N`` a norm, so ``J_F = J_N J_G``
  has an exact left null space ``W`` (that of ``J_N`` at its input: ``span{g⁻¹, g⁻¹ ŷ}`` for a
  LayerNorm of gain ``g``, ``span{g⁻¹ ŷ}`` for an RMSNorm) and an exact right null space
  ``Nin = null(J_F)`` of the same dimension.  Hence ``Wᵀ J_f = -Wᵀ`` and ``J_f Nin = -Nin``:
  the residual identity, seen through the norm, gives ``J_f`` an exact ``-I`` part of singular
  value 1 that every layer shares (at random init ``Nin ≈ W ≈ span{1, x}``, the top two
  singular values of every layer are 1.000 and a random encoder looks coupled).  Those are
  removed: ``J_defl = (I - P_W) J_f (I - P_Nin)``, only after checking both identities hold on
  the block's own Jacobian to within ``TOL``.

What is computed at run time, per block and traced token: the placement (by replaying the
block with hooks on its norm modules, :func:`norm_placement`), the candidate directions, and
the verification numbers (:class:`DeflationRecord`).  Nothing is removed where a check fails.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from coupling.jacobian.linop import LinearOperator, as_operator

# Exactness threshold for "J q = 0" / "J_f q = -q", relative to ‖J‖₂.  Float32 Jacobians carry
# round-off of a few u = 2**-24 = 6e-8 (measured: ‖J 1‖/‖J‖₂ = 6e-8 on GPT-2 blocks, null-space
# residuals 1e-8 on BERT), a LayerNorm's eps moves its scale null direction by eps/sigma^2
# (1e-12 for BERT); the nearest *non*-trivial candidate measured 5e-2 (GPT-2's centred input).
# 1e-4 leaves three orders above round-off and almost three below real structure.
TOL = 1e-4
# A right null space is only determined if the next singular value of J_F is well above TOL:
# its basis then moves by at most ~ round-off / gap (docs/deflation.md).
MIN_GAP = 100 * TOL


# ------------------------------------------------------------------------------------------
# Linear algebra: orthonormal bases and the projected operator
# ------------------------------------------------------------------------------------------
def _vec(v, i: int) -> torch.Tensor:
    t = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"vectors[{i}]: expected a tensor or numpy array, got {type(v).__name__}")
    if t.ndim != 1:
        raise ValueError(f"vectors[{i}]: expected a 1-D vector (d,), got shape {tuple(t.shape)}; "
                         "pass several vectors as a list")
    if not torch.isfinite(t).all():
        raise ValueError(f"vectors[{i}] has non-finite entries")
    return t.detach()


def deflation_basis(vectors: Sequence, include_ones: bool = False, d: int | None = None,
                    tol: float = 1e-6, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Orthonormal basis ``Q (d, r)`` of ``span(vectors [+ ones])``.

    Gram-Schmidt in float64 (two passes for stability), ones first when included; a
    vector is dropped when what is left of it after projecting out the previous ones is
    below ``tol`` times its norm (zero, repeated, or linearly dependent vectors).
    ``d`` is needed only when ``vectors`` is empty.  Returns ``dtype``, by default float64
    if any vector is float64, else float32 (``r`` may be 0: shape ``(d, 0)``).
    """
    vecs = [_vec(v, i) for i, v in enumerate(vectors)]
    dims = {v.shape[0] for v in vecs} | ({d} if d is not None else set())
    if len(dims) != 1:
        raise ValueError(f"vectors (and d) disagree on the dimension: {sorted(dims)}" if dims else
                         "no vectors given: pass d to get an empty (or all-ones) basis")
    d = dims.pop()
    if dtype is None:
        dtype = torch.float64 if any(v.dtype == torch.float64 for v in vecs) else torch.float32
    device = vecs[0].device if vecs else torch.device("cpu")
    cols = [v.to(torch.float64) for v in vecs]
    if include_ones:
        cols.insert(0, torch.ones(d, dtype=torch.float64, device=device))
    basis: list[torch.Tensor] = []
    for c in cols:
        c = c.to(device)
        norm0 = c.norm()
        for _ in range(2):  # re-orthogonalize once: classical GS loses orthogonality
            for q in basis:
                c = c - (q @ c) * q
        if norm0 > 0 and c.norm() > tol * norm0:
            basis.append(c / c.norm())
    Q = torch.stack(basis, 1) if basis else torch.zeros(d, 0, dtype=torch.float64, device=device)
    return Q.to(dtype)


class DeflatedOperator(LinearOperator):
    """``(I - Q_out Q_out^T) J (I - Q_in Q_in^T)`` from products with ``J`` only.

    ``J``: ``(d_out, d_in)`` tensor or LinearOperator; ``Q_out (d_out, r_out)`` and
    ``Q_in (d_in, r_in)`` orthonormal columns (``None`` = no projection on that side).
    Projections are done in at least float32; results come back in ``J``'s dtype.
    """

    def __init__(self, J, Q_out: torch.Tensor | None = None, Q_in: torch.Tensor | None = None):
        self.op = as_operator(J)
        self.shape = tuple(self.op.shape)
        self.dtype, self.device = self.op.dtype, self.op.device
        self._ct = torch.promote_types(self.dtype, torch.float32)
        self.Q_out = self._check_q(Q_out, self.shape[0], "Q_out")
        self.Q_in = self._check_q(Q_in, self.shape[1], "Q_in")

    def _check_q(self, Q, d, name):
        if Q is None:
            return None
        Q = torch.from_numpy(Q) if isinstance(Q, np.ndarray) else Q
        if Q.ndim != 2 or Q.shape[0] != d:
            raise ValueError(f"{name} must be ({d}, r) for an operator of shape {self.shape}, "
                             f"got {tuple(Q.shape)}")
        if Q.shape[1] == 0:
            return None
        gram = Q.double().T @ Q.double()
        if not torch.allclose(gram, torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device), atol=1e-4):
            raise ValueError(f"{name} must have orthonormal columns: build it with "
                             "deflation_basis(vectors)")
        return Q.detach().to(dtype=self._ct, device=self.device)

    @staticmethod
    def _project_out(Q, M):
        return M if Q is None else M - Q @ (Q.T @ M)

    def _matmat(self, M):
        M = self._project_out(self.Q_in, M.to(self._ct))
        Y = (self.op @ M).to(self._ct)
        return self._project_out(self.Q_out, Y).to(self.dtype)

    def _rmatmat(self, M):
        M = self._project_out(self.Q_out, M.to(self._ct))
        Z = self.op.rmatmat(M).to(self._ct)
        return self._project_out(self.Q_in, Z).to(self.dtype)


def deflate(J, in_vectors: Sequence = (), out_vectors: Sequence = (),
            include_ones: bool | str = False, tol: float = 1e-6) -> DeflatedOperator:
    """``(I - P_out) J (I - P_in)`` for the spans of ``out_vectors`` / ``in_vectors``.

    Pure linear algebra: *which* vectors are trivial for a block is decided (and verified)
    by :func:`deflate_block`.  ``include_ones``: add the all-ones vector on both sides
    (``True``), on one side (``"in"`` / ``"out"``) or nowhere (``False``).
    """
    if include_ones not in (True, False, "in", "out"):
        raise ValueError(f"include_ones must be True, False, 'in' or 'out', got {include_ones!r}")
    op = as_operator(J)
    d_out, d_in = op.shape
    # float64 bases; DeflatedOperator rounds them to its own compute dtype
    Q_in = deflation_basis(in_vectors, include_ones in (True, "in"), d=d_in, tol=tol,
                           dtype=torch.float64)
    Q_out = deflation_basis(out_vectors, include_ones in (True, "out"), d=d_out, tol=tol,
                            dtype=torch.float64)
    return DeflatedOperator(op, Q_out=Q_out, Q_in=Q_in)


# ------------------------------------------------------------------------------------------
# Where the norms sit: found by replaying the block with hooks on its norm modules
# ------------------------------------------------------------------------------------------
@dataclass
class Placement:
    """A block function's normalization placement.

    ``kind``: ``pre-norm`` (a norm reads the block input), ``post-norm`` (the function's output
    is a norm's output; wins over pre-norm), or ``none``.  ``norm``: ``layernorm`` (shift
    invariant), ``rmsnorm`` (scale invariant only) or ``other``, for the input norm(s)
    (pre-norm) or the output norm (post-norm).  ``out_norm`` / ``out_norm_input``: the output
    norm and its recorded input ``(n, d)`` (post-norm only).
    """

    kind: str
    norm: str
    out_norm: nn.Module | None = None
    out_norm_input: torch.Tensor | None = None


def _norm_modules(block: nn.Module) -> list:
    """Leaf modules named like a norm (LayerNorm, LlamaRMSNorm, GemmaRMSNorm...)."""
    return [m for m in block.modules()
            if "norm" in type(m).__name__.lower() and not any(True for _ in m.children())]


def norm_kind_of(norm: nn.Module, z: torch.Tensor) -> str:
    """``layernorm`` if ``norm`` ignores a shift along 1 at ``z (..., d)``, ``rmsnorm`` if it
    ignores only a rescaling, else ``other`` -- decided by the module itself, not its name."""
    with torch.no_grad():
        y = norm(z).float()
        scale = float(z.float().std()) or 1.0
        shifted = norm(z + scale).float()
        scaled = norm(2 * z).float()
    # shift invariance is exact (mean subtraction); scale invariance only up to eps / mean(z²)
    close = lambda a, tol: float((a - y).norm()) <= tol * float(y.norm())  # noqa: E731
    return ("layernorm" if close(shifted, 1e-3) else "rmsnorm" if close(scaled, 2e-2)
            else "other")


def norm_placement(call, final_norm: nn.Module | None = None) -> Placement:
    """Placement of ``f(X) = [final_norm](block(X)) - X`` for one recorded block call."""
    X = call.input
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
             for m in _norm_modules(call.module)]
    try:
        with torch.no_grad():
            Y = call.replay(X)
    finally:
        for h in hooks:
            h.remove()
    same = lambda a, b: a.shape == b.shape and torch.allclose(  # noqa: E731
        a.float(), b.float(), rtol=1e-5, atol=1e-6 * float(b.float().abs().max()))
    if final_norm is not None:
        return Placement("post-norm", norm_kind_of(final_norm, Y[0]), final_norm, Y[0].detach())
    for mod, inp, out in reversed(seen):
        if same(out, Y):
            return Placement("post-norm", norm_kind_of(mod, inp[0]), mod, inp[0].detach())
    readers = [(mod, inp) for mod, inp, _ in seen if same(inp, X)]
    if readers:
        kinds = {norm_kind_of(mod, inp[0]) for mod, inp in readers}
        return Placement("pre-norm", kinds.pop() if len(kinds) == 1 else "other")
    return Placement("none", "other")


# ------------------------------------------------------------------------------------------
# Verification on the block's own Jacobian, and the removal
# ------------------------------------------------------------------------------------------
@dataclass
class DeflationRecord:
    """What deflation found and did for one ``J^l_{tt}`` (the per-layer record of a scan).

    ``removed_in`` / ``removed_out``: dimensions projected out on each side.
    ``null_ones``: ``‖J 1‖ / ‖J‖₂`` (pre-norm LayerNorm blocks: ~1e-7 = exact null).
    ``residual_in`` / ``residual_out``: ``‖J_f Q + Q‖₂ / ‖J_f‖₂`` and ``‖J_fᵀ Q + Q‖₂ / ‖J_f‖₂``
    on the post-norm candidates (0 = the ``-I`` identity holds exactly).
    ``gap_in``: the first non-null singular value of ``J_F = J_f + I`` over ``‖J_F‖₂`` (how
    well the input-side null space is determined).  ``cos_in_out``: smallest cosine between
    the input and output subspaces (1: an exact singular pair with singular value 1).
    ``norm_slack``: the output norm's own "null" singular values over its largest (its eps
    against tiny states); ``tolerance``: ``TOL + 2 norm_slack``, what the residuals must meet.
    """

    placement: str
    norm: str
    verified: bool
    removed_in: int = 0
    removed_out: int = 0
    null_ones: float = math.nan
    residual_in: float = math.nan
    residual_out: float = math.nan
    gap_in: float = math.nan
    cos_in_out: float = math.nan
    norm_slack: float = math.nan
    tolerance: float = TOL
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def spectral_norm(J, iters: int = 8, block: int = 4, seed: int = 0) -> float:
    """``‖J‖₂`` by block power iteration on ``JᵀJ`` (a lower bound within a few percent;
    the thresholds it scales are orders of magnitude apart)."""
    op = as_operator(J)
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(op.shape[1], block, generator=g, dtype=torch.float64)
    for _ in range(iters):
        V, _ = torch.linalg.qr(V)
        V = op.rmatmat((op @ V.to(op.dtype).to(op.device)).to(op.dtype)).double().cpu()
    V, _ = torch.linalg.qr(V)
    return float(torch.linalg.matrix_norm((op @ V.to(op.dtype).to(op.device)).double(), 2))


def _rel(M: torch.Tensor, scale: float) -> float:
    return float(torch.linalg.matrix_norm(M.double(), 2)) / scale if M.numel() else 0.0


def deflate_block(J, placement: Placement, t: int, tol: float = TOL):
    """``(J', DeflationRecord)``: ``J`` with its verified trivial directions removed.

    ``J``: the block's ``J_{tt}`` (dense tensor or operator) at token ``t``.  Pre-norm and
    unnormalized blocks come back unchanged (see the module docstring); post-norm blocks are
    projected on both sides only when both ``-I`` identities and the null-space gap verify.
    """
    if placement.kind == "post-norm":
        return _deflate_post_norm(J, placement, t, tol)
    rec = DeflationRecord(placement.kind, placement.norm, verified=True,
                          note=f"{placement.norm} {placement.kind}: no trivial direction; "
                               "nothing removed")
    if placement.kind == "pre-norm" and placement.norm == "layernorm":
        op = as_operator(J)
        ones = torch.full((op.shape[1], 1), op.shape[1] ** -0.5, dtype=op.dtype, device=op.device)
        rec.null_ones = _rel(op @ ones, spectral_norm(op))
        rec.verified = rec.null_ones <= tol
        rec.note = ("1 is an exact null direction: singular value 0, cannot enter the top-K; "
                    "nothing removed" if rec.verified else
                    "1 is NOT null here (unexpected for a pre-LN block); nothing removed")
    return J, rec


NULL_DIM = {"layernorm": 2, "rmsnorm": 1}   # shift + scale / scale invariance
# A norm whose own "null" singular values exceed this (relative) is not invariant enough for
# its directions to count as trivial: its eps against tiny states (eps / mean(z²); 1e-2 for
# GPT-2's final norm at random init, 1e-7 for BERT's).
MAX_NORM_SLACK = 5e-2


def norm_left_null(norm: nn.Module, z: torch.Tensor, kind: str, tol: float = TOL):
    """``(W, slack)``: orthonormal basis ``(d, r)`` of the left null space of the norm's
    Jacobian at ``z (d,)`` (float64) and its largest "null" singular value over the largest.

    ``r`` is 2 for a LayerNorm, 1 for an RMSNorm (their invariances), else the count below
    ``tol``.  ``slack`` is round-off (~1e-8) or, when the norm's eps is not negligible
    against ``mean(z²)``, about ``eps / mean(z²)``: how inexact the invariance itself is.
    """
    z = z.detach().float()
    Jn = torch.func.jacrev(lambda v: norm(v[None])[0].float())(z).detach().double()
    U, S, _ = torch.linalg.svd(Jn)
    r = NULL_DIM.get(kind, int((S <= tol * S[0]).sum()))
    slack = float(S[len(S) - r] / S[0]) if r else 0.0
    return U[:, len(S) - r:], slack


def _deflate_post_norm(J, placement: Placement, t: int, tol: float):
    dense = J if isinstance(J, torch.Tensor) else as_operator(J).to_dense()
    Jf = dense.double().cpu()
    d = Jf.shape[0]
    rec = DeflationRecord("post-norm", placement.norm, verified=False)
    W, rec.norm_slack = norm_left_null(placement.out_norm, placement.out_norm_input[t],
                                       placement.norm, tol)
    _, S, Vh = torch.linalg.svd(Jf + torch.eye(d, dtype=torch.float64))   # J_F = J_f + I
    r = W.shape[1]
    N = Vh[d - r:].T
    scale = spectral_norm(Jf)
    # the block inherits the norm's own inexactness (measured: residual = 0.75 slack);
    # anything beyond it is structure, not the trivial -I part
    rec.tolerance = tol + 2 * rec.norm_slack
    rec.residual_out = _rel(Jf.T @ W + W, scale)
    rec.residual_in = _rel(Jf @ N + N, scale)
    rec.gap_in = float(S[d - r - 1] / S[0]) if r < d else 0.0
    rec.cos_in_out = float(torch.linalg.svdvals(W.T @ N).min()) if r else math.nan
    problems = [msg for bad, msg in (
        (r == 0, "the output norm has no null direction"),
        (rec.norm_slack > MAX_NORM_SLACK, f"the norm is not invariant (slack {rec.norm_slack:.1e})"),
        (rec.residual_out > rec.tolerance, f"J_fᵀW ≠ -W ({rec.residual_out:.1e})"),
        (rec.residual_in > rec.tolerance, f"J_f N ≠ -N ({rec.residual_in:.1e})"),
        (rec.gap_in < 10 * rec.tolerance,
         f"null space of J_F not separated (gap {rec.gap_in:.1e})"))
        if bad]
    if problems:
        rec.note = "not removed: " + "; ".join(problems)
        return J, rec
    rec.verified, rec.removed_in, rec.removed_out = True, r, r
    rec.note = (f"removed the exact -I part: {r} output directions (left null of the output "
                f"norm) and {r} input directions (null space of J_f + I)")
    out = DeflatedOperator(J, Q_out=W, Q_in=N)
    return (out.to_dense() if isinstance(J, torch.Tensor) else out), rec


LAYER_COLUMNS = ("placement", "verified", "removed_in", "removed_out", "null_ones",
                 "residual_in", "residual_out", "gap_in", "cos_in_out", "norm_slack")


def layer_columns(deflation: dict, n_layers: int) -> dict:
    """``PromptResult.deflation`` as ``deflation_<field>`` columns of ``(L+1,)`` values, one
    per layer ``0..L`` like layers.parquet (layer 0 and layers without a record: NaN/None)."""
    out = {}
    for name in LAYER_COLUMNS:
        values = [deflation.get(str(l), {}).get(name) for l in range(n_layers + 1)]
        numeric = name not in ("placement", "verified")
        out[f"deflation_{name}"] = (np.array([np.nan if v is None else v for v in values], float)
                                    if numeric else np.array(values, dtype=object))
    return out
