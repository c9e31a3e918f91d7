"""The s_K/s_{K+1} gap flag: matrices of known spectra, real round-off, real block Jacobians."""
import math

import pytest
import torch

from coupling.jacobian.block_jacobian import exact_jacobian
from coupling.jacobian.fastpath import FastBlock
from coupling.model.blocks import residual_branch
from coupling.model.loading import LoadedModel, load_model
from coupling.model.trajectory import run_forward
from coupling.model.zoo import build_random, random_inputs, small_config
from coupling.spectrum.spectral_gap import (ANGLE_TOL, angle_bound, min_relative_gap, relative_gap,
                                            roundoff_factor, undetermined, unit_roundoff)
from coupling.spectrum.svd import top_k_svd

EPS32 = float(torch.finfo(torch.float32).eps)


def orthogonal_pair(d, seed):
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return U, V


def max_sine(A, B):
    """Largest sine of the principal angles between the column spans of A and B."""
    Qa, _ = torch.linalg.qr(A.double())
    Qb, _ = torch.linalg.qr(B.double())
    return float(torch.linalg.matrix_norm(Qa - Qb @ (Qb.T @ Qa), ord=2))


def spectrum_with_gap(d, k, g):
    """Flat-ish spectrum (2 -> 1) with s_1 = 2 and relative gap (s_k - s_{k+1}) / s_1 = g."""
    s = torch.linspace(2.0, 1.0, d, dtype=torch.float64)
    s[k:] -= s[k] - (s[k - 1] - 2.0 * g)          # shift the tail: s_k - s_{k+1} = 2 g
    return s


def test_relative_gap_and_threshold_arithmetic():
    S = torch.tensor([4.0, 3.0, 2.0])
    assert relative_gap(S, torch.tensor(1.0)) == pytest.approx(0.25)
    assert math.isinf(relative_gap(S, None))                     # K = d: nothing left out
    d = 768
    e = (8 + math.sqrt(d)) * EPS32
    assert roundoff_factor(d) * EPS32 == pytest.approx(e)
    assert min_relative_gap(d, EPS32) == pytest.approx(e * (1 + 1 / ANGLE_TOL))
    assert 4e-4 < min_relative_gap(d, EPS32) < 4.5e-4              # the docstring's figure
    assert unit_roundoff(torch.bfloat16) == EPS32                   # Jacobians in float32
    assert unit_roundoff(torch.float64) == float(torch.finfo(torch.float64).eps)


@pytest.mark.parametrize("d,k", [(64, 5), (300, 10)])
def test_worst_case_roundoff_moves_the_subspace_past_tol_exactly_when_flagged(d, k):
    """Round-off-sized perturbation ``||E|| = c eps s_1`` aimed at the (k, k+1) pair (the
    worst case of Wedin's bound) and a random one of the same size, over gaps from far below
    to far above the threshold: flagged gaps are moved by ~ANGLE_TOL or more, unflagged ones
    by less than ANGLE_TOL, and the bound always holds."""
    U, V = orthogonal_pair(d, seed=d)
    e = roundoff_factor(d) * EPS32
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(d, d, generator=gen, dtype=torch.float64)
    threshold = min_relative_gap(d, EPS32)
    for factor in (1e-4, 1e-3, 0.3, 0.7, 1.5, 3.0, 100.0):
        g = factor * threshold
        s = spectrum_with_gap(d, k, g)
        J = (U * s) @ V.T
        s1 = float(s[0])
        aimed = e * s1 * (U[:, k:k + 1] @ V[:, k - 1:k].T + U[:, k - 1:k] @ V[:, k:k + 1].T)
        random = G * (e * s1 / torch.linalg.matrix_norm(G, 2))
        flagged = undetermined(s[:k], s[k], d, EPS32)
        assert flagged == (factor < 1)
        for E, worst in ((aimed, True), (random, False)):
            Jt = J + E
            Ut, St, Vt = torch.linalg.svd(Jt)
            angle = max_sine(Ut[:, :k], U[:, :k])
            # Wedin from the computed values of J + E, which is all a scan has
            assert angle <= angle_bound(St[:k], St[k], d, EPS32) * (1 + 1e-6)
            if not flagged:
                assert angle < ANGLE_TOL, (factor, worst, angle)
            elif worst:
                assert angle > 0.9 * ANGLE_TOL, (factor, angle)
                if factor <= 1e-3:
                    assert angle > 0.5            # the pair is mixed at random: arbitrary


@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_float32_pipeline_on_known_spectra(method):
    """J with known singular vectors stored in float32 and decomposed in float32 (the scan's
    precision): a near-degenerate cluster across s_K/s_{K+1} (relative splits 1e-9, below
    eps) is flagged from the computed values alone and its top-K subspace comes back
    arbitrary; a healthy gap (1e-2) is not flagged and comes back to well within tolerance."""
    d, k = 200, 10
    for seed in (0, 1, 2):
        U, V = orthogonal_pair(d, seed=10 + seed)
        tiny = torch.linspace(2.0, 1.0, d, dtype=torch.float64)
        tiny[k - 3:k + 3] = tiny[k - 3] - 1e-9 * torch.arange(6, dtype=torch.float64)  # 6-fold
        healthy = spectrum_with_gap(d, k, 1e-2)
        for s, expect_flag in ((tiny, True), (healthy, False)):
            J32 = ((U * s) @ V.T).float()
            res = top_k_svd(J32, k, method)
            assert res.s_next is not None and res.S.dtype == torch.float32
            flag = undetermined(res.S, res.s_next, d, unit_roundoff(J32.dtype))
            assert flag == expect_flag
            angle = max_sine(res.U, U[:, :k])
            if expect_flag:
                assert angle > 0.3, (seed, angle)   # arbitrary inside the cluster
            else:
                assert angle < 0.1 * ANGLE_TOL


def _float64_jacobian(call, t):
    return exact_jacobian(residual_branch(call, torch.float64), call.input.double(), t, t)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "tiny"])
def test_roundoff_model_bounds_real_block_jacobians(family):
    """The ``c`` of ``||E|| <= c eps ||J||``: the float32 Jacobian the scan takes (local path)
    and its float32 singular values against a float64 Jacobian of the same block at the same
    input.  Measured ratios are 0.8-4 (Jacobian) and up to 0.7 sqrt(d) (values)."""
    if family == "tiny":
        lm = load_model()
        ids = lm.tokenizer("What is the capital of France? The capital is",
                           return_tensors="pt").input_ids
    else:
        cfg = small_config(family, n_layers=2, d=64)
        lm = LoadedModel(build_random(cfg, seed=1), None, cfg, {"n_layers": 2})
        ids = random_inputs(family, n_tokens=9)["input_ids"]
    rec = run_forward(lm, ids)
    t = rec.n_tokens - 1
    for call in rec.calls[:2]:
        J64 = _float64_jacobian(call, t)
        J32 = FastBlock(call).jacobian(t, t)
        d = J64.shape[0]
        bound = roundoff_factor(d) * EPS32 * torch.linalg.matrix_norm(J64, 2)
        assert torch.linalg.matrix_norm(J32.double() - J64, 2) < bound / 2
        s32 = torch.linalg.svdvals(J32).double()
        assert (s32 - torch.linalg.svdvals(J64)).abs().max() < bound / 2
