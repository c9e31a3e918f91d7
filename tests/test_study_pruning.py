"""Block pruning (coupling.experiments.study.pruning) on real tiny transformers built from configs."""
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from coupling.experiments.study import pruning

VOCAB = 61


def gpt2(n_layer=4, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


def llama(n_layer=3):
    torch.manual_seed(1)
    cfg = LlamaConfig(num_hidden_layers=n_layer, hidden_size=32, intermediate_size=64,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def ids(n=3, t=9, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def hooks(model):
    return [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in model.transformer.h]


@pytest.mark.parametrize("make", [gpt2, llama])
@torch.no_grad()
def test_skip_makes_the_block_the_identity_and_restores_exactly(make):
    model, x = make(), ids()
    # the first forward pass happens inside the context: transformers installs its
    # hidden-state capturing hooks then, and they must see the skipped output
    with pruning.skip_blocks(model, [1]):
        hs = model(x, output_hidden_states=True).hidden_states
        skipped_logits = model(x).logits
    assert torch.equal(hs[2], hs[1])              # after block 1 == before block 1
    assert not torch.equal(hs[1], hs[0])          # block 0 still runs
    assert not torch.equal(hs[3], hs[2])          # block 2 still runs
    before = model(x, output_hidden_states=True)
    assert torch.equal(before.hidden_states[1], hs[1])   # nothing upstream changed
    assert not torch.equal(before.hidden_states[2], hs[2])
    with pruning.skip_blocks(model, [0, 2]):
        pass
    after = model(x).logits
    assert torch.equal(before.logits, after)
    assert not torch.allclose(before.logits, skipped_logits)


@torch.no_grad()
def test_all_blocks_skipped_is_embeddings_norm_head():
    model, x = gpt2(), ids()
    with pruning.skip_blocks(model, range(4)):
        logits = model(x).logits
    tr = model.transformer
    emb = tr.wte(x) + tr.wpe(torch.arange(x.shape[1]))[None]
    by_hand = model.lm_head(tr.ln_f(emb))
    torch.testing.assert_close(logits, by_hand, rtol=0, atol=1e-6)


def test_skip_restores_hooks_even_after_an_error():
    model = gpt2()
    n_hooks = hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with pruning.skip_blocks(model, [0, 3]):
            raise RuntimeError("boom")
    assert hooks(model) == n_hooks
    with pytest.raises(ValueError, match="out of range"):
        with pruning.skip_blocks(model, [4]):
            pass


@torch.no_grad()
def test_angular_distance_matches_a_hand_computation():
    model = gpt2(n_layer=3)
    with torch.no_grad():     # a trained-like final norm (random init's is almost a no-op)
        model.transformer.ln_f.weight.uniform_(0.2, 2.0)
        model.transformer.ln_f.bias.normal_(0, 0.5)
    a, b = ids(3, 9, seed=1), ids(2, 9, seed=2)
    got = pruning.angular_distance(model, [a, b], batch_size=2)
    # by hand: the raw block outputs are HF's hidden states with ln_f taken out
    ln_f, model.transformer.ln_f = model.transformer.ln_f, torch.nn.Identity()
    per_token = []
    for x in (a, b):
        hs = [h.double().numpy() for h in model(x, output_hidden_states=True).hidden_states]
        cos = [np.sum(hs[l] * hs[l + 1], -1)
               / (np.linalg.norm(hs[l], axis=-1) * np.linalg.norm(hs[l + 1], axis=-1))
               for l in range(3)]
        per_token.append(np.stack([1 - c.ravel() for c in cos]))   # (L, tokens)
    expected = np.concatenate(per_token, axis=1).mean(axis=1)
    model.transformer.ln_f = ln_f
    hs = model(a, output_hidden_states=True).hidden_states   # last one carries ln_f
    naive_last = 1 - torch.nn.functional.cosine_similarity(hs[2], hs[3], dim=-1).mean()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert got.shape == (3,) and np.all((got > 0) & (got < 2))
    assert abs(float(naive_last) - got[2]) > 0.1   # the final-norm convention matters
    # one (N, T) array gives the same as the same rows passed as 1-D windows
    np.testing.assert_allclose(pruning.angular_distance(model, a),
                               pruning.angular_distance(model, list(a)), rtol=1e-5)
    with pytest.raises(ValueError, match="integer token ids"):
        pruning.angular_distance(model, [torch.rand(5)])


def test_neighbour_coupling_on_a_known_matrix():
    m = np.array([[0.0, 0.2, 0.9],
                  [0.4, 0.0, 0.6],
                  [0.5, 0.8, 0.0]])
    # block 0: neighbour 1 -> 1 - (0.2 + 0.4)/2 = 0.7
    # block 1: neighbours 0 and 2 -> mean(0.7, 1 - (0.6 + 0.8)/2 = 0.3) = 0.5
    # block 2: neighbour 1 -> 0.3
    np.testing.assert_allclose(pruning.neighbour_coupling(m), [0.7, 0.5, 0.3])
    m2 = m.copy()
    m2[0, 1] = np.nan                          # one direction missing: the other one counts
    np.testing.assert_allclose(pruning.neighbour_coupling(m2), [0.6, 0.45, 0.3])
    m3 = m.copy()
    m3[0, 1] = m3[1, 0] = np.nan               # block 0 has no neighbour left
    out = pruning.neighbour_coupling(m3)
    assert np.isnan(out[0]) and np.isclose(out[1], 0.3) and np.isclose(out[2], 0.3)
    stacked = np.stack([m, m3])                # (P, L, L): NaN-aware mean over prompts
    np.testing.assert_allclose(pruning.neighbour_coupling(stacked), [0.7, 0.5, 0.3])
    with pytest.raises(ValueError, match="square"):
        pruning.neighbour_coupling(np.zeros((2, 3)))


def test_pruning_orders_are_the_stated_permutations():
    nb = np.array([0.2, 0.9, np.nan, 0.5, 0.9])
    ang = np.array([0.30, 0.05, 0.10, 0.20, 0.01])
    orders = pruning.pruning_orders(nb, ang, n_random=4, seed=3)
    assert set(orders) == set(pruning.ORDER_NAMES)
    assert orders["coupling-most"] == [[1, 4, 3, 0, 2]]       # ties by block, NaN last
    assert orders["coupling-least"] == [[0, 3, 1, 4, 2]]
    assert orders["angular"] == [[4, 1, 2, 3, 0]]
    assert len(orders["random"]) == 4
    for reps in orders.values():
        for order in reps:
            assert sorted(order) == list(range(5))
    assert len({tuple(o) for o in orders["random"]}) > 1
    assert pruning.pruning_orders(nb, ang, n_random=4, seed=3) == orders
    assert pruning.pruning_orders(nb, ang, n_random=4, seed=4)["random"] != orders["random"]
    with pytest.raises(ValueError, match="equal length"):
        pruning.pruning_orders(nb, ang[:3])


class CountingLoss:
    """Held-out loss of a fixed batch; counts how often it was evaluated."""

    def __init__(self, x):
        self.x, self.calls = x, 0

    @torch.no_grad()
    def __call__(self, model):
        self.calls += 1
        return float(model(self.x, labels=self.x).loss)


def test_single_block_losses_and_pruning_curves():
    model = gpt2(n_layer=4, seed=5)
    eval_fn = CountingLoss(ids(4, 12, seed=3))
    base = eval_fn(model)
    single = pruning.single_block_losses(model, eval_fn)
    for l in range(4):
        with pruning.skip_blocks(model, [l]):
            assert single[l] == eval_fn(model)
    orders = {"a": [[2, 0, 1, 3]], "b": [[2, 1, 0, 3]], "random": [[3, 1, 2, 0], [0, 1, 2, 3]]}
    eval_fn.calls = 0
    curves = pruning.pruning_curves(model, orders, eval_fn, max_removed=3)
    assert list(curves.columns) == ["order", "rep", "n_removed", "removed", "eval_loss",
                                    "loss_increase"]
    assert len(curves) == 4 * 4
    start = curves[curves.n_removed == 0]
    assert (start.loss_increase == 0).all() and np.allclose(start.eval_loss, base)
    # distinct removed sets: {}, {2}, {0,2}, {1,2}, {0,1,2}, {3}, {1,3}, {1,2,3}, {0}, {0,1}
    assert eval_fn.calls == 10
    row = curves[(curves.order == "b") & (curves.n_removed == 2)].iloc[0]
    assert row.removed == "2,1"
    with pruning.skip_blocks(model, [1, 2]):
        assert row.eval_loss == eval_fn(model)
    assert np.isclose(row.loss_increase, row.eval_loss - base)
    one = curves[curves.n_removed == 1].set_index(["order", "rep"]).eval_loss
    assert one["a", 0] == single[2] and one["random", 1] == single[0]
    assert set(curves[curves.order == "random"].rep) == {0, 1}
    with pytest.raises(ValueError, match="max_removed"):
        pruning.pruning_curves(model, orders, eval_fn, max_removed=5)
    with pytest.raises(ValueError, match="not a permutation"):
        pruning.pruning_curves(model, {"bad": [[0, 0, 1, 2]]}, eval_fn, max_removed=1)
