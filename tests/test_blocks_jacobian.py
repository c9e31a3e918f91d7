"""Block isolation and block Jacobians on every supported family (small random configs)."""
import os

import pytest
import torch

from coupling.jacobian.block_jacobian import (BlockJacobian, NonFiniteJacobianError,
                                              exact_jacobian, exact_jacobians)
from coupling.model.blocks import BlockNotFoundError, find_blocks, residual_branch
from coupling.model.loading import LoadedModel, parse_dtype
from coupling.model.trajectory import run_forward, trajectories
from coupling.model.zoo import CAUSAL, FAMILIES, build_random, random_inputs, small_config

# Opt-in device and weight dtype (scripts/gpu_check.py runs this file on a GPU):
# COUPLING_TEST_DEVICE=cuda puts the models and products there; COUPLING_TEST_DTYPE=bfloat16
# builds the per-family models of the `record` fixture in bf16 (Jacobians stay float32).
DEVICE = torch.device(os.environ.get("COUPLING_TEST_DEVICE", "cpu"))
DTYPE = parse_dtype(os.environ.get("COUPLING_TEST_DTYPE", "float32"))


def _loaded(family, dtype=torch.float32):
    cfg = small_config(family)
    return LoadedModel(build_random(cfg, dtype=dtype).to(DEVICE), None, cfg, {"n_layers": 2})


@pytest.fixture(scope="module", params=FAMILIES)
def record(request):
    lm = _loaded(request.param, DTYPE)
    return request.param, lm, run_forward(lm, random_inputs(request.param))


def test_replay_is_bitwise(record):
    family, lm, rec = record
    assert rec.hidden_states.shape[0] == len(rec.calls) + 1
    for l, call in enumerate(rec.calls):
        assert torch.equal(call.replay(call.input), call.output), (family, l)
        assert torch.equal(rec.hidden_states[l], call.input[0].float()), (family, l)


def test_jacobian_matches_autograd_reference(record):
    family, lm, rec = record
    call = rec.calls[-1]
    f = residual_branch(call)
    X = call.input.float()        # no-op in float32; bf16 models are differentiated in float32
    n = X.shape[1]
    full = torch.autograd.functional.jacobian(f, X)[0, :, :, 0, :, :]  # (n, d, n, d)
    t2 = n - 1
    dense = exact_jacobians(f, X, t2)                                  # all t1 at once
    for t1 in range(n):
        torch.testing.assert_close(dense[t1], full[t2, :, t1, :], atol=1e-6, rtol=1e-5)
    op = BlockJacobian(f, X, 1, t2)
    M = torch.randn(X.shape[-1], 5, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.testing.assert_close(op @ M, full[t2, :, 1, :] @ M, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(op.T @ M, full[t2, :, 1, :].T @ M, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(op.to_dense(), dense[1], atol=1e-6, rtol=1e-5)
    if family in CAUSAL:  # no information flows backwards in time
        assert exact_jacobian(f, X, t1=n - 1, t2=0).abs().max() == 0
        assert exact_jacobian(f, X, t1=3, t2=2).abs().max() == 0


# RMSNorm families (Llama, Mistral, Qwen2, Gemma) and NeoX/Phi/ViT (softmax) upcast to float32 inside even
# for float64 weights, so central differences cannot reach 1e-6 there; they are checked
# against the autograd reference above.  LayerNorm families run end to end in float64.
@pytest.mark.parametrize("family", ["gpt2", "falcon", "bert"])
def test_jacobian_columns_match_central_differences_float64(family):
    lm = _loaded(family, dtype=torch.float64)
    rec = run_forward(lm, random_inputs(family))
    call = rec.calls[0]
    f = residual_branch(call, compute_dtype=torch.float64)
    X = call.input.double()
    n, d = X.shape[1], X.shape[2]
    t1, t2 = 1, n - 1
    op = BlockJacobian(f, X, t1, t2)
    h = 1e-5
    gen = torch.Generator().manual_seed(1)
    for j in torch.randint(0, d, (4,), generator=gen).tolist():
        E = torch.zeros_like(X)
        E[0, t1, j] = h
        fd = (f(X + E) - f(X - E))[0, t2] / (2 * h)
        col = op @ torch.nn.functional.one_hot(torch.tensor(j), d).double()
        rel = (col - fd).norm() / fd.norm()
        assert rel < 1e-6, (family, j, float(rel))


def test_bf16_model_jacobian_computed_in_float32():
    lm = _loaded("llama", dtype=torch.bfloat16)
    rec = run_forward(lm, random_inputs("llama"))
    call = rec.calls[0]
    f = residual_branch(call)                 # float32 copy of the bf16 block
    X = call.input.float()
    J = exact_jacobian(f, X, 2, 4)
    assert J.dtype == torch.float32 and torch.isfinite(J).all()
    assert next(call.module.parameters()).dtype == torch.bfloat16  # model itself untouched
    ref = residual_branch(call.cast(torch.float32))  # same weights, upcast on the fly
    assert torch.allclose(J, exact_jacobian(ref, X, 2, 4), atol=1e-6)


def test_non_finite_jacobian_names_layer_and_tokens():
    def f(X):
        return X * float("nan")
    X = torch.randn(1, 3, 4)
    with pytest.raises(NonFiniteJacobianError, match=r"layer 7 .*t1=0, t2=2"):
        exact_jacobian(f, X, 0, 2, name="layer 7")
    with pytest.raises(NonFiniteJacobianError, match="layer 7"):
        BlockJacobian(f, X, 0, 2, name="layer 7") @ torch.ones(4, 1)


def test_final_norm_option_changes_only_what_it_should():
    lm = _loaded("gpt2")
    rec = run_forward(lm, random_inputs("gpt2"))
    call = rec.calls[-1]
    norm = lm.model.transformer.ln_f
    f = residual_branch(call, final_norm=norm)
    X = call.input
    # norm(block(X)) - X at the last block reproduces HF's last hidden state minus X^{L-1}.
    torch.testing.assert_close((f(X) + X)[0], rec.hidden_states[-1])
    raw = trajectories(lm, random_inputs("gpt2"), raw_last=True)
    torch.testing.assert_close(raw[-1], call.output[0])


def test_unknown_architecture_says_how_to_point_at_blocks():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(BlockNotFoundError, match="block_path"):
        find_blocks(Odd())
    lm = _loaded("gpt2")
    path, blocks = find_blocks(lm.model, "transformer.h")
    assert len(blocks) == 2
    with pytest.raises(BlockNotFoundError, match="not an nn.ModuleList"):
        find_blocks(lm.model, "transformer.wte")
