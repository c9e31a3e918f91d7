"""Fast (one-token / truncated-prompt) block Jacobians equal the full-prompt reference."""

import dataclasses
import os

import pytest
import torch
from torch import nn

from gap_tolerance import assert_close_by_gap, grid_tolerance, singular_value_tolerance
from coupling.jacobian.block_jacobian import BlockJacobian, exact_jacobians
from coupling.jacobian.fastpath import (FastBlock, NotCausalError, fast_jacobian, fast_operator,
                                        token_function)
from coupling.jacobian.token_jacobian import TokenJacobian
from coupling.measures.coupling_grids import depth_coupling
from coupling.measures.fastpath_svd import fast_depth_coupling, fast_svd
from coupling.model.blocks import BlockCall, CallRecorder, residual_branch
from coupling.model.hf_call import is_causal
from coupling.model.loading import LoadedModel, parse_dtype
from coupling.model.trajectory import run_forward
from coupling.model.zoo import CAUSAL, FAMILIES, build_random, random_inputs, small_config
from coupling.spectrum.svd import svd_of_dense

N = 7   # prompt length: t = 0, a middle token and the last one are all exercised
# Opt-in device and weight dtype (scripts/gpu_check.py runs this file on a GPU):
# COUPLING_TEST_DEVICE=cuda puts the models and products there; COUPLING_TEST_DTYPE=bfloat16
# builds the models that are float32 by default in bf16 (Jacobians stay float32).
DEVICE = torch.device(os.environ.get("COUPLING_TEST_DEVICE", "cpu"))
DTYPE = parse_dtype(os.environ.get("COUPLING_TEST_DTYPE", "float32"))


def _record(family, dtype=DTYPE, n_layers=2):
    cfg = small_config(family, n_layers=n_layers)
    model = build_random(cfg, dtype=dtype).to(DEVICE)
    lm = LoadedModel(model, None, cfg, {"n_layers": n_layers})
    return lm, run_forward(lm, random_inputs(family, n_tokens=N))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _reference(call, t1, t2, dtype=torch.float32):
    """The reference: d VJPs through the block applied to the whole prompt."""
    f = residual_branch(call, compute_dtype=dtype)
    return exact_jacobians(f, call.input.to(dtype), t2, [t1])[0]


@pytest.fixture(scope="module", params=CAUSAL)
def causal_record(request):
    return request.param, _record(request.param)[1]


def test_one_token_jacobian_equals_full_prompt(causal_record):
    family, rec = causal_record
    call = rec.calls[-1]
    fb = FastBlock(call)
    assert is_causal(call)
    for t in (N - 1, N // 2, 0):
        assert fb.local(t, t).kind == "one-token", family
        ref = _reference(call, t, t)
        for mode in ("vjp", "jvp"):
            assert _rel(fb.jacobian(t, t, mode=mode), ref) < 1e-5, (family, t, mode)


def test_operator_products_equal_full_prompt(causal_record):
    family, rec = causal_record
    call = rec.calls[0]
    t = N // 2
    ref = _reference(call, t, t)
    M = torch.randn(ref.shape[1], 5, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    op = fast_operator(call, t, t, chunk=2)      # 5 products in batches of 2, 2, 1
    assert isinstance(op, TokenJacobian)
    assert _rel(op @ M, ref @ M) < 1e-5, family
    assert _rel(op.T @ M, ref.T @ M) < 1e-5, family
    assert _rel(op @ M, ref @ M) < 1e-5, family  # repeated products: no state carried over
    # the plain one-token function also works under vmap (BlockJacobian's products)
    g = token_function(call, t)
    vop = BlockJacobian(g, call.input[:, t:t + 1].float(), 0, 0)
    assert _rel(vop @ M, ref @ M) < 1e-5, family
    assert _rel(vop.T @ M, ref.T @ M) < 1e-5, family


def test_context_jacobians_use_truncated_prompt(causal_record):
    family, rec = causal_record
    call = rec.calls[-1]
    fb = FastBlock(call)
    t2 = N - 3
    assert fb.local(1, t2).kind == "truncated"
    assert fb.local(1, t2).tokens == t2 + 1
    assert _rel(fast_jacobian(call, t2, t1=1), _reference(call, 1, t2)) < 1e-5, family
    allJ = fb.jacobians(t2)
    f = residual_branch(call)
    ref = exact_jacobians(f, call.input.float(), t2)   # .float(): bf16 models
    for t1 in range(N):
        if t1 <= t2:
            assert _rel(allJ[t1], ref[t1]) < 1e-5, (family, t1)
        else:
            assert allJ[t1].abs().max() == 0 and ref[t1].abs().max() == 0
    assert fb.jacobian(N - 1, 2).abs().max() == 0     # t1 > t2: nothing flows backwards


@pytest.mark.parametrize("family", CAUSAL)
def test_float64_is_tighter(family):
    _, rec = _record(family, dtype=torch.float64)
    call = rec.calls[-1]
    fb = FastBlock(call, compute_dtype=torch.float64)
    t = N - 2
    err = _rel(fb.jacobian(t, t), _reference(call, t, t, torch.float64))
    # GPT-2 and Falcon compute in float64 throughout.  The others run softmax / RMSNorm in
    # float32 even for float64 weights, so their own Jacobian is only float32-accurate.
    assert err < (1e-12 if family in ("gpt2", "falcon") else 1e-6), (family, err)


def test_products_never_push_the_whole_prompt_through_the_block():
    _, rec = _record("llama")
    call = rec.calls[0]
    seen = []   # tokens per block call

    def count(mod, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    hook = call.module.register_forward_pre_hook(count, with_kwargs=True)
    try:
        op = fast_operator(call, N - 1, N - 1, chunk=3)  # built + verified: may see N tokens
        seen.clear()
        d = op.shape[0]
        op @ torch.randn(d)                                  # one product = one token
        op.T @ torch.randn(d)
        assert seen and set(seen) == {1}
        seen.clear()
        op @ torch.randn(d, 5)                               # 5 products = copies 3 + 2
        op.T @ torch.randn(d, 5)
        assert seen and max(seen) == 3 and N not in seen
    finally:
        hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_recording_keys_values_in_the_forward_leaves_it_unchanged(family):
    """run_forward hands every block a recording cache: the trajectory is still the model's
    own forward, bit for bit (each block output and hidden state)."""
    cfg = small_config(family, n_layers=3)
    model = build_random(cfg).to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in random_inputs(family, n_tokens=N).items()}
    rec = run_forward(LoadedModel(model, None, cfg, {"n_layers": 3}), inputs)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    if family in CAUSAL:
        assert all(c.kv is not None for c in rec.calls), family
    for l in range(3):                     # X^0..X^{L-1}: the last may carry the final norm
        assert torch.equal(rec.hidden_states[l], plain[l][0].float()), (family, l)
    for i in range(2):
        assert torch.equal(rec.calls[i].output, plain[i + 1]), (family, i)


@pytest.mark.parametrize("family", CAUSAL)
def test_recorded_keys_values_spare_the_whole_prompt_block_call(family):
    """With the forward's keys/values the one-token function needs no block call on the whole
    prompt (without them: one, to record them), and gives the same Jacobian bit for bit."""
    _, rec = _record(family)
    call = rec.calls[-1]
    seen = []

    def count(mod, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    hook = call.module.register_forward_pre_hook(count, with_kwargs=True)
    try:
        recorded = FastBlock(call).jacobian(N - 2, N - 2)
        assert N not in seen, (family, seen)
        seen.clear()
        replayed = FastBlock(dataclasses.replace(call, kv=None)).jacobian(N - 2, N - 2)
        assert N in seen, (family, seen)
    finally:
        hook.remove()
    assert torch.equal(recorded, replayed), family


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_non_causal_blocks_fall_back_to_the_full_prompt(family):
    _, rec = _record(family)
    call = rec.calls[0]
    fb = FastBlock(call)
    assert not is_causal(call)
    n = call.input.shape[1]
    assert fb.local(1, 1).kind == "full"
    assert _rel(fb.jacobian(1, 1), _reference(call, 1, 1)) < 1e-6
    assert _rel(fb.jacobian(n - 1, 0), _reference(call, n - 1, 0)) < 1e-6  # t1 > t2 is not 0
    with pytest.raises(NotCausalError, match="not causal"):
        token_function(call, 1)


class CausalMeanBlock(nn.Module):
    """``x_t + W mean_{s<=t} x_s``: causal, but no attention mask and no cache argument."""

    is_causal = True

    def __init__(self, d):
        super().__init__()
        self.W = nn.Linear(d, d, bias=False)

    def forward(self, hidden_states):
        n = hidden_states.shape[1]
        counts = torch.arange(1, n + 1, dtype=hidden_states.dtype)[None, :, None]
        return hidden_states + self.W(hidden_states.cumsum(1) / counts)


def test_block_without_cache_falls_back_to_truncated_prompt_exactly():
    torch.manual_seed(0)
    d, n = 6, 5
    block = CausalMeanBlock(d).requires_grad_(False)
    with CallRecorder(nn.ModuleList([block])) as rec:
        block(torch.randn(1, n, d))
    call = rec.calls[0]
    fb = FastBlock(call)
    assert is_causal(call)
    with pytest.warns(RuntimeWarning, match="one-token function is not usable"):
        lp = fb.local(n - 1, n - 1)
    assert lp.kind == "truncated"
    W = block.W.weight
    for t1, t2 in [(n - 1, n - 1), (1, 3), (0, 0)]:   # analytic: J_{t1 t2} = W / (t2 + 1)
        torch.testing.assert_close(fb.jacobian(t1, t2), W / (t2 + 1), atol=1e-6, rtol=1e-6)


def test_bf16_weights_products_in_float32():
    _, rec = _record("llama", dtype=torch.bfloat16)
    call = rec.calls[0]
    J = fast_jacobian(call, N - 1)
    assert J.dtype == torch.float32
    assert _rel(J, _reference(call, N - 1, N - 1)) < 1e-5
    assert call.module.self_attn.q_proj.weight.dtype == torch.bfloat16  # model untouched


def test_svd_methods_agree_and_depth_coupling_matches_reference():
    _, rec = _record("gpt2", n_layers=3)
    k = 4
    fb = FastBlock(rec.calls[1])
    S = {m: fast_svd(fb, k, method=m)[0].S for m in ("dense", "dense-lanczos", "lanczos")}
    for m in ("dense-lanczos", "lanczos"):
        assert_close_by_gap(S[m], S["dense"], singular_value_tolerance(S["dense"], 32), True,
                            f"{m} values")
    res, op = fast_svd(fb, k, method="randomized", n_iter=2)
    assert res.S.shape == (k,) and isinstance(op, TokenJacobian)
    # the whole depth-wise grid against the reference pipeline (full prompt, full SVD)
    jacs = [_reference(c, N - 1, N - 1) for c in rec.calls]
    ref = depth_coupling(jacs, [svd_of_dense(J, k).as_tuple() for J in jacs], k)
    tol = grid_tolerance(jacs, jacs, k)
    for method in ("dense", "lanczos"):
        fast = fast_depth_coupling(rec.calls, k, method=method)
        assert_close_by_gap(fast["normalized"], ref["normalized"], tol.normalized,
                            tol.determined, f"{method} depth m~")


def test_bad_input_is_rejected_with_a_clear_message():
    _, rec = _record("gpt2")
    fb = FastBlock(rec.calls[0])
    with pytest.raises(ValueError, match="out of range"):
        fb.jacobian(N, N)
    with pytest.raises(ValueError, match="mode must be"):
        fb.jacobian(mode="forward")
    with pytest.raises(ValueError, match="unknown method"):
        fast_svd(fb, 3, method="svd")
    bad = BlockCall(0, rec.calls[0].module, (torch.zeros(2, N, 32),), {}, False)
    with pytest.raises(ValueError, match="one prompt"):
        FastBlock(bad)


def test_final_norm_folded_into_the_last_block():
    lm, rec = _record("llama")
    call, norm = rec.calls[-1], lm.model.model.norm
    f = residual_branch(call, final_norm=norm)
    ref = exact_jacobians(f, call.input.float(), N - 1, [N - 1])[0]
    assert _rel(fast_jacobian(call, N - 1, final_norm=norm), ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_copies_of_a_token_see_the_prefix_and_themselves_only(dtype):
    from coupling.model.hf_call import _indexed_arguments

    n, t, B = 5, 3, 3
    allowed = torch.ones(n, n, dtype=torch.bool).tril()            # causal
    mask = allowed if dtype == torch.bool else \
        torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    keys = list(range(t)) + [t] * B
    block = torch.cat([torch.zeros(B, t, dtype=torch.bool), ~torch.eye(B, dtype=torch.bool)], 1)
    args = {"attention_mask": mask[None, None], "position_ids": torch.arange(n)[None]}
    out = _indexed_arguments(args, n, [t] * B, keys, block)
    sees = out["attention_mask"][0, 0]
    sees = sees if dtype == torch.bool else sees == 0
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1]],
                            dtype=torch.bool)
    assert torch.equal(sees, expected)
    assert torch.equal(out["position_ids"], torch.full((1, B), t))
