"""LN deflation (coupling/spectrum/deflation.py) on REAL block Jacobians of GPT-2, Llama and BERT shapes.

The old premise (remove orth{1, x_in} / orth{1, y_out} from every block) is checked against
the blocks themselves: on pre-LN blocks only 1 is null and the centred input is not, so the
old projection changed real structure; on post-LN blocks the trivial part is an exact -I on
the left null space of the output norm and on the null space of J_F = J_f + I, which the old
candidates match only at g = 1 and small weights.
"""
import numpy as np
import pytest
import torch

from coupling.analysis.prompt import analyze_prompt
from coupling.analysis.steps import layer_function
from coupling.jacobian.block_jacobian import exact_jacobians
from coupling.jacobian.linop import DenseOperator
from coupling.model.loading import LoadedModel
from coupling.model.trajectory import run_forward
from coupling.model.zoo import build_random, random_inputs, small_config
from coupling.settings.scan_settings import ScanSettings
from coupling.spectrum.deflation import (TOL, DeflatedOperator, deflate, deflate_block,
                                         deflation_basis, norm_left_null, norm_placement)

D, N_TOK = 64, 6
T = N_TOK - 1


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _lm(family, init_range=None, ln_gains=False, d=D):
    cfg = small_config(family, n_layers=3, d=d)
    if init_range:
        cfg.initializer_range = init_range
    model = build_random(cfg, seed=1)
    if ln_gains:   # what training does to a post-LN encoder's norms: g != 1, b != 0
        g = _gen(5)
        for m in model.modules():
            if type(m).__name__ == "LayerNorm":
                m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
                m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
    return LoadedModel(model, None, cfg, {"n_layers": 3})


def _block(lm, l, last_block="raw"):
    """``(J^l_{tt} dense float64, its placement, x_in, y_out)`` at the last token."""
    rec = run_forward(lm, random_inputs(lm.config.model_type, n_tokens=N_TOK), last_block=last_block)
    settings = ScanSettings(last_block=last_block)
    f = layer_function(rec, l, settings, lm.model)
    call = rec.calls[l - 1]
    J = exact_jacobians(f, call.input.float(), T, [T])[0]
    final = rec.final_norm if l == rec.n_layers else None
    x, y = rec.hidden_states[l - 1, T].double(), rec.hidden_states[l, T].double()
    return J, norm_placement(call, final), x, y


def _ratio(J, v):
    J = J.double()
    return float((J @ (v / v.norm())).norm() / torch.linalg.matrix_norm(J, 2))


def _old_premise(J, x, y, ones=True):
    """What --deflate-ln did before: orth{1, x_in} in, orth{1, y_out} out, on every block."""
    return deflate(J, in_vectors=[x.float()], out_vectors=[y.float()], include_ones=ones).to_dense()


@pytest.fixture(scope="module")
def gpt2():
    return _lm("gpt2")


@pytest.fixture(scope="module")
def llama():
    return _lm("llama")


@pytest.fixture(scope="module")
def bert():
    return _lm("bert")


# ------------------------------------------------------------------------------------------
# Linear algebra
# ------------------------------------------------------------------------------------------
def test_deflation_basis_orthonormal_and_drops_degenerate():
    d = 7
    a = torch.randn(d, generator=_gen(0), dtype=torch.float64)
    b = torch.randn(d, generator=_gen(1), dtype=torch.float64)
    vecs = [a, torch.zeros(d, dtype=torch.float64), 2 * a, b, a - 3 * b, torch.ones(d, dtype=torch.float64)]
    Q = deflation_basis(vecs, include_ones=True)
    assert Q.shape == (d, 3) and Q.dtype == torch.float64       # span{1, a, b}
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=torch.float64))
    for v in (a, b, torch.ones(d, dtype=torch.float64)):       # each vector lies in span(Q)
        torch.testing.assert_close(Q @ (Q.T @ v), v)
    assert deflation_basis([], include_ones=False, d=5).shape == (5, 0)
    with pytest.raises(ValueError, match="pass d"):
        deflation_basis([], include_ones=True)
    with pytest.raises(ValueError, match="disagree"):
        deflation_basis([a, torch.ones(3)], include_ones=False)


def test_deflated_operator_equals_dense_projections():
    d_out, d_in = 6, 5
    J = torch.randn(d_out, d_in, generator=_gen(2), dtype=torch.float64)
    Qi = deflation_basis([torch.randn(d_in, generator=_gen(3), dtype=torch.float64)], True)
    Qo = deflation_basis([], include_ones=True, d=d_out, dtype=torch.float64)
    op = DeflatedOperator(DenseOperator(J), Q_out=Qo, Q_in=Qi)
    dense = (torch.eye(d_out, dtype=torch.float64) - Qo @ Qo.T) @ J @ (
        torch.eye(d_in, dtype=torch.float64) - Qi @ Qi.T)
    torch.testing.assert_close(op.to_dense(), dense)
    M = torch.randn(d_out, 3, generator=_gen(4), dtype=torch.float64)
    torch.testing.assert_close(op.rmatmat(M), dense.T @ M)
    with pytest.raises(ValueError, match="orthonormal"):
        DeflatedOperator(J, Q_in=torch.ones(d_in, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(5, r\)"):
        DeflatedOperator(J, Q_in=torch.ones(3, 1))


def test_norm_left_null_is_the_analytic_one():
    """LayerNorm: span{g⁻¹, g⁻¹ ŷ}; RMSNorm: span{g⁻¹ ŷ} (not span{1, y} once g != 1)."""
    d = 16
    z = torch.randn(d, generator=_gen(7)) + 0.5
    ln = torch.nn.LayerNorm(d, eps=1e-12)
    ln.weight.data = 0.5 + torch.rand(d, generator=_gen(8))
    ln.bias.data = torch.randn(d, generator=_gen(9))
    W, slack = norm_left_null(ln, z, "layernorm")
    zh = ((z - z.mean()) / z.std(unbiased=False)).double()
    g = ln.weight.double()
    expect = deflation_basis([1 / g, zh / g])
    assert W.shape == (d, 2) and slack < 1e-6
    torch.testing.assert_close(W @ W.T, expect @ expect.T, atol=1e-5, rtol=0)
    y = ln(z).double()
    old = deflation_basis([y], include_ones=True)         # the old output candidate
    assert torch.linalg.matrix_norm(W @ W.T - old @ old.T, 2) > 0.1
    rms = lambda v: ln.weight * v / v.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    W1, _ = norm_left_null(rms, z, "rmsnorm")
    torch.testing.assert_close((W1 @ W1.T).double(), (lambda q: q @ q.T)(
        deflation_basis([z.double() / g])), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# Pre-LN: a verified no-op, where the old premise changed real structure
# ------------------------------------------------------------------------------------------
def test_gpt2_block_only_ones_is_null_and_nothing_is_removed(gpt2):
    J, place, x, y = _block(gpt2, 2)
    assert (place.kind, place.norm) == ("pre-norm", "layernorm")
    ones = torch.ones(D, dtype=torch.float64)
    assert _ratio(J, ones) < 1e-6                       # exact null (measured 7e-8)
    assert _ratio(J, x - x.mean()) > 1e-2               # the centred input is NOT (5e-2)
    assert _ratio(J.T, ones) > 1e-1 and _ratio(J.T, y) > 1e-1   # no output-side norm at all
    Jd, rec = deflate_block(J, place, T)
    assert Jd is J and rec.verified and rec.removed_in == rec.removed_out == 0
    assert rec.null_ones < TOL
    # the old projection changed the spectrum: real structure, not a null direction
    s, s_old = torch.linalg.svdvals(J.double()), torch.linalg.svdvals(_old_premise(J, x, y).double())
    assert (s[:10] - s_old[:10]).abs().max() > 1e-2 * s[0]


def test_llama_block_has_no_null_direction(llama):
    J, place, x, y = _block(llama, 2)
    assert (place.kind, place.norm) == ("pre-norm", "rmsnorm")
    assert _ratio(J, x) > 1e-2                          # RMSNorm's x is not null in the block
    assert _ratio(J, torch.ones(D, dtype=torch.float64)) > 1e-2
    Jd, rec = deflate_block(J, place, T)
    assert Jd is J and rec.removed_in == 0 and np.isnan(rec.null_ones)


@pytest.mark.parametrize("family", ["gpt_neox", "phi", "falcon", "gemma"])
def test_placement_of_other_causal_families_is_pre_norm(family):
    lm = _lm(family, d=32)
    rec = run_forward(lm, random_inputs(family, n_tokens=4))
    place = norm_placement(rec.calls[1])
    assert place.kind == "pre-norm"
    assert place.norm == ("rmsnorm" if family == "gemma" else "layernorm")


# ------------------------------------------------------------------------------------------
# Post-LN: the exact -I part, verified and removed
# ------------------------------------------------------------------------------------------
def test_bert_deflation_removes_the_two_unit_singular_values(bert):
    J, place, x, y = _block(bert, 2)
    assert (place.kind, place.norm) == ("post-norm", "layernorm")
    s = torch.linalg.svdvals(J.double())
    assert abs(s[0] - 1) < 1e-3 and abs(s[1] - 1) < 1e-3 and s[2] < 0.2   # 1.000, 1.000, 0.05
    Jd, rec = deflate_block(J, place, T)
    assert rec.verified and rec.removed_in == rec.removed_out == 2
    assert rec.residual_in < TOL and rec.residual_out < TOL and rec.gap_in > 0.5
    sd = torch.linalg.svdvals(Jd.double())
    assert sd[0] < 0.2                                  # no unit singular value left
    # the rest of the spectrum is untouched (at init the trivial pair is an exact singular pair)
    assert rec.cos_in_out > 0.999
    torch.testing.assert_close(sd[:8], s[2:10], atol=2e-3 * float(s[2]), rtol=0)
    # what was removed: J_f acts as -I on the null space of J_F and, transposed, on W
    W, _ = norm_left_null(place.out_norm, place.out_norm_input[T], "layernorm")
    Jf = J.double()
    assert torch.linalg.matrix_norm(Jf.T @ W + W, 2) < TOL


def test_trained_like_bert_still_verifies_where_the_old_candidates_fail():
    """Non-unit LN gains and larger weights (what training does): the trivial directions
    leave the top of the spectrum and drift away from span{1, x} / span{1, y}."""
    lm = _lm("bert", init_range=0.1, ln_gains=True)
    J, place, x, y = _block(lm, 2)
    Jd, rec = deflate_block(J, place, T)
    assert rec.verified and rec.removed_in == 2 and rec.residual_out < TOL
    assert rec.cos_in_out < 0.95          # input and output trivial spaces differ now
    Jf, I = J.double(), torch.eye(D, dtype=torch.float64)
    Qi = deflation_basis([torch.ones(D, dtype=torch.float64), x])
    Qo = deflation_basis([torch.ones(D, dtype=torch.float64), y])
    # the old candidates are not singular subspaces: J leaks out of them
    assert torch.linalg.matrix_norm((I - Qo @ Qo.T) @ Jf @ Qi, 2) > 0.1
    assert torch.linalg.matrix_norm(Jf.T @ Qo + Qo, 2) > 0.1   # and not where J_f is -I


def test_failed_verification_removes_nothing(bert):
    """The output norm's left null space at another token does not fit this J: refused."""
    J, place, _, _ = _block(bert, 2)
    Jd, rec = deflate_block(J, place, 0)          # wrong token for J_{TT}
    assert Jd is J and not rec.verified and rec.removed_in == 0
    assert rec.residual_out > 1e-2 and rec.note.startswith("not removed")


def test_last_block_with_final_norm_is_post_norm_and_deflated(gpt2):
    J, place, _, _ = _block(gpt2, 3, last_block="with-final-norm")
    assert place.kind == "post-norm"
    Jd, rec = deflate_block(J, place, T)
    assert rec.verified and rec.removed_in == 2
    _, raw_place, _, _ = _block(gpt2, 3, last_block="raw")
    assert raw_place.kind == "pre-norm"


# ------------------------------------------------------------------------------------------
# In the scan
# ------------------------------------------------------------------------------------------
def test_scan_deflation_records_and_no_op_on_pre_ln(gpt2):
    ids = random_inputs("gpt2", n_tokens=N_TOK)["input_ids"]
    raw = ScanSettings(k=4, last_block="raw", measures=("depth",))
    plain = analyze_prompt(gpt2, ids, raw)
    defl = analyze_prompt(gpt2, ids, ScanSettings(k=4, last_block="raw", measures=("depth",),
                                                  deflate_ln=True))
    np.testing.assert_array_equal(plain.depth_normalized, defl.depth_normalized)  # a no-op
    assert plain.deflation == {}
    assert {r["placement"] for r in defl.deflation.values()} == {"pre-norm"}
    assert all(r["null_ones"] < TOL and r["removed_in"] == 0 for r in defl.deflation.values())
    eq7 = analyze_prompt(gpt2, ids, ScanSettings(k=4, measures=("depth",), deflate_ln=True))
    assert eq7.deflation["3"]["removed_out"] == 2 and eq7.deflation["2"]["removed_out"] == 0


def test_random_bert_looks_coupled_only_through_the_trivial_part(bert):
    """Plain, a random encoder's layers share the two unit singular pairs: m~ near 0 (as if
    perfectly coupled).  Deflated, it looks as uncoupled as a random decoder."""
    ids = random_inputs("bert", n_tokens=N_TOK)["input_ids"]
    plain = analyze_prompt(bert, ids, ScanSettings(k=4, measures=("depth",)))
    defl = analyze_prompt(bert, ids, ScanSettings(k=4, measures=("depth",), deflate_ln=True))
    assert plain.summary["depth_mis_coupling_mean"] < 0.05
    assert defl.summary["depth_mis_coupling_mean"] > 0.5
    assert all(r["verified"] and r["removed_in"] == 2 for r in defl.deflation.values())
    assert (defl.singular_values[:, 0] < 0.2).all() and (plain.singular_values[:, 1] > 0.99).all()


def test_layer_columns_line_up_with_the_layers_table(gpt2):
    from coupling.spectrum.deflation import layer_columns
    ids = random_inputs("gpt2", n_tokens=N_TOK)["input_ids"]
    res = analyze_prompt(gpt2, ids, ScanSettings(k=4, measures=("depth",), deflate_ln=True))
    cols = layer_columns(res.deflation, 3)
    assert all(len(v) == 4 for v in cols.values())               # layers 0..L
    assert list(cols["deflation_placement"]) == [None, "pre-norm", "pre-norm", "post-norm"]
    assert np.isnan(cols["deflation_removed_in"][0])
    assert list(cols["deflation_removed_in"][1:]) == [0, 0, 2]
