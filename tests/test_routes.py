"""The route to a layer's top-K and coupling row (coupling.spectrum.svd): dense or matrix-free,
as measured (BENCHMARKS.md, scripts/bench_routes.py); ARPACK on the dense matrix, and its
fall-back; coupling rows of a matrix-free one-token Jacobian from VJPs only."""
from __future__ import annotations

import numpy as np
import torch

from coupling.jacobian.fastpath import FastBlock
from coupling.jacobian.token_jacobian import TokenJacobian
from coupling.measures.coupling_grids import pairwise_coupling
from coupling.model.loading import LoadedModel
from coupling.model.trajectory import run_forward
from coupling.model.zoo import build_random, random_inputs, small_config
from coupling.analysis.steps import layer_jacobians
from coupling.jacobian.linop import LinearOperator
from coupling.settings.scan_settings import ScanSettings
from coupling.spectrum.svd import dense_top_k, resolve_method, svd_of_dense


def test_auto_takes_the_route_measured_cheaper_for_the_width_and_k():
    # BENCHMARKS.md "Dense or matrix-free" (1 thread): K = 10 dense 6.5x faster at d = 768,
    # 1.7x at 2048, 1.17x at 3072, matrix-free 2.0x faster at 4096; K = 50 dense at 4096 too
    assert resolve_method("auto", 768, 10) == "exact"
    assert resolve_method("auto", 2048, 10) == "exact"
    assert resolve_method("auto", 3072, 10) == "exact"
    assert resolve_method("auto", 4096, 10) == "lanczos"
    assert resolve_method("auto", 4096, 50) == "exact"
    assert resolve_method("auto", 8192, 50) == "lanczos"
    assert resolve_method("auto", 2048) == "exact"            # K not given: d <= 2048
    assert resolve_method("auto", 4096) == "lanczos"
    assert resolve_method("auto", 3072, 10, "cuda") == "lanczos"  # not measured off CPU
    assert resolve_method("lanczos", 768, 10) == "lanczos"


def test_the_scan_takes_the_route_the_rule_gives_for_its_own_k():
    """At d = 3072 the route depends on K (2900 + 36 K): the scan's layer step must ask with
    the scan's K, not fall back to the K-blind width cut-off (which says matrix-free)."""
    cfg = small_config("llama", n_layers=1, d=3072, heads=16, ffn=32, vocab=64)
    lm = LoadedModel(build_random(cfg), None, cfg, {"n_layers": 1})
    rec = run_forward(lm, random_inputs("llama", n_tokens=3, vocab=64))
    t = rec.n_tokens - 1
    free = layer_jacobians(rec, [1], t, ScanSettings(k=1), lm.model)[1]
    assert isinstance(free, LinearOperator) and free.n_products == 0   # nothing built yet
    dense = layer_jacobians(rec, [1], t, ScanSettings(k=10), lm.model)[1]
    assert isinstance(dense, torch.Tensor) and dense.shape == (3072, 3072)


def test_arpack_on_a_dense_matrix_is_exact_and_its_fall_back_says_so():
    """Known singular triplets of a d = 600 matrix (> 512: ARPACK's route), a gap of 1.5
    after K = 10; capped at one restart on a flat spectrum it falls back, exact, recorded."""
    d, k = 600, 10
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s = torch.cat([torch.linspace(3, 2, k), torch.linspace(1.3, 0.1, d - k)]).double()
    J = ((U * s) @ V.T).float()
    res = dense_top_k(J, k)
    assert res.fallback is None and res.S.dtype == torch.float32
    torch.testing.assert_close(res.S.double(), s[:k], rtol=1e-5, atol=0)
    assert abs(float(res.s_next) - 1.3) < 1e-5
    # Wedin: rounding J to float32 moves it by ||E|| <= eps32 ||J||_F ~ 6e-8 * 19 = 1.1e-6,
    # and single-precision ARPACK (float32 J) stops at residuals of the same order, so the
    # top-K subspace moves by at most ~2 ||E|| / (s_K - s_K+1) = 2.2e-6 / 0.7 = 3.2e-6
    assert torch.linalg.svdvals(res.V.double().T @ V[:, k:]).max() < 1e-5
    flat = ((U * torch.linspace(2.0, 1.0, d, dtype=torch.float64)) @ V.T).float()
    capped = dense_top_k(flat, k, maxiter=1)
    assert capped.fallback is not None and "ARPACK not converged in 1 restarts" in capped.fallback
    torch.testing.assert_close(capped.S, svd_of_dense(flat, k).S)


class _TransposeOnly(TokenJacobian):
    """The one-token operator with ``J @ M`` refused: whatever runs on it used VJPs only."""

    def _matmat(self, M):
        raise AssertionError("a J @ M product (double backward) was taken")


def test_coupling_rows_of_a_one_token_operator_use_vjps_and_equal_the_dense_rows():
    cfg = small_config("gpt2", n_layers=3)
    lm = LoadedModel(build_random(cfg), None, cfg, {"n_layers": 3})
    rec = run_forward(lm, random_inputs("gpt2", n_tokens=7))
    k, t = 4, 6
    blocks = [FastBlock(rec.call(l)) for l in (1, 2, 3)]
    dense = [fb.jacobian(t, t) for fb in blocks]
    svds = [svd_of_dense(J, k).as_tuple() for J in dense]
    lp = blocks[1].local(t, t)
    op = _TransposeOnly(lp.copies, lp.x, chunk=5)
    free = pairwise_coupling([op], svds, k=k, return_matrices=True)
    ref = pairwise_coupling([dense[1]], svds, k=k, return_matrices=True)
    assert op.n_products == 3 * k                      # one J^T product per reference vector
    # U^T J V is bilinear in J: only J's own float32 round-off differs (products vs rows)
    scale = float(np.abs(ref["A"]).max())
    np.testing.assert_allclose(free["A"], ref["A"], rtol=0, atol=1e-5 * scale)
