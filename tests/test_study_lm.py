"""The study's LM data, training and evaluation (coupling/experiments/study/lm_data.py, lm.py, lm_eval.py).

Known answers used here: a hand-computed cross-entropy and top-1 accuracy over named windows;
the multiple-choice items checked against the stream they were cut from; GPT-2's
non-embedding parameter count ``L (12 d^2 + 13 d) + 2 d``; the shipped tiny model's step-0
checkpoint scores near chance (1/4) on held-out text and its final model far above it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from coupling.experiments.study.corpus import build_corpus
from coupling.experiments.study.lm import LMSpec, build_model, train_lm
from coupling.experiments.study.lm_data import (LMData, encode_stream, load_lm_data,
                                                load_tokenizer, prepare_lm_data, save_lm_data)
from coupling.experiments.study.lm_eval import (build_multiple_choice, heldout_metrics,
                                                mc_from_arrays, mc_to_arrays,
                                                multiple_choice_accuracy)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "coupling" / "data" / "tiny"
EOT_ID = 0


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def small_data(tokenizer):
    """build_corpus(60_000) with two stdlib documents moved to the held-out side.

    60 000 characters hold only ~150 held-out tokens (held-out files are ~4% of the stdlib),
    too few for windows and a multiple-choice set; two long training documents are not.
    """
    corpus = build_corpus(max_chars=60_000)
    by_length = sorted(range(len(corpus.train)), key=lambda i: -len(corpus.train[i]))
    held = set(by_length[1:3])  # the 2nd and 3rd longest: the longest stays for training
    train_ids = encode_stream(tokenizer, [d for i, d in enumerate(corpus.train) if i not in held])
    heldout_ids = encode_stream(tokenizer, [corpus.train[i] for i in sorted(held)]
                                + corpus.heldout)
    mc = build_multiple_choice(heldout_ids.numpy(), 24, 24, 8, seed=0, boundary_id=EOT_ID)
    return LMData(tokenizer, train_ids, heldout_ids, mc, {"corpus": corpus.describe()})


@pytest.fixture(scope="module")
def heldout_sample_ids(tokenizer):
    """Held-out text of the shipped tiny model (its training never saw these files)."""
    text = (TINY / "heldout_sample.txt").read_text()
    return encode_stream(tokenizer, text.split("<|endoftext|>")).numpy()


def tiny(step: int | None = None):
    from transformers import AutoModelForCausalLM
    folder = TINY if step is None else TINY / "checkpoints" / f"step-{step}"
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


# ------------------------------------------------------------------------------ training
SPEC = dict(name="t", n_layer=2, n_embd=32, n_head=2, steps=30, seq_len=32, batch_size=8,
            n_positions=64, eval_windows=16, checkpoint_steps=[0, 10])


def test_train_lm_learns_writes_checkpoints_and_is_bit_reproducible(small_data, tmp_path):
    lines = []
    spec = LMSpec(**SPEC)
    record = train_lm(spec, small_data, tmp_path / "run", threads=1, log=lines.append)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0", "step-10", "step-30"]
    states = [json.loads((ckpts / f"step-{s}" / "trainer_state.json").read_text())
              for s in (0, 10, 30)]
    assert states[0]["loss"] is None and states[0]["eval_loss"] > math.log(1024) - 0.3
    for s in states:
        assert set(s) >= {"step", "loss", "eval_loss", "eval_acc", "mc_acc", "tokens_seen", "lr"}
        assert s["tokens_seen"] == s["step"] * 8 * 32 and 0 <= s["mc_acc"] <= 1
    assert states[2]["eval_loss"] < states[0]["eval_loss"] - 0.5  # learnt something
    assert states[2]["eval_acc"] > states[0]["eval_acc"]
    assert states[1]["loss"] > states[2]["loss"]  # train loss of steps 1-10 vs 11-30
    assert sum("step" in line and "/30" in line for line in lines) == 10  # every 10% of steps

    # the record: written last, parameters by GPT-2's formula
    saved = json.loads((tmp_path / "run" / "training.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["spec"]["n_layer"] == 2 and saved["checkpoints"][-1] == states[2]
    assert saved["non_embedding_parameters"] == 2 * (12 * 32 ** 2 + 13 * 32) + 2 * 32
    assert saved["parameters"] == saved["non_embedding_parameters"] + (1024 + 64) * 32

    # a saved checkpoint is the model that was scored: float32, eager, same held-out loss
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(ckpts / "step-30", attn_implementation="eager")
    assert m.dtype == torch.float32 and m.config.n_layer == 2
    again = heldout_metrics(m, small_data.heldout_ids, 32, max_windows=16)
    assert again["eval_loss"] == pytest.approx(states[2]["eval_loss"], abs=1e-5)

    # same spec and seed into the same folder: the stale run is replaced, weights identical
    first = {s: load_file(ckpts / f"step-{s}" / "model.safetensors") for s in (10, 30)}
    train_lm(spec, small_data, tmp_path / "run", threads=1, log=lambda _: None)
    for s, tensors in first.items():
        second = load_file(ckpts / f"step-{s}" / "model.safetensors")
        assert tensors.keys() == second.keys()
        assert all(torch.equal(tensors[k], second[k]) for k in tensors), s
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no temp folders


def test_dropout_reaches_every_dropout_of_the_config(tokenizer):
    torch.manual_seed(0)
    model = build_model(tokenizer, n_layer=1, n_embd=16, n_head=2, n_positions=32, dropout=0.2)
    c = model.config
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.2, 0.2, 0.2)
    assert c._attn_implementation == "eager"


def test_default_checkpoint_schedule():
    assert LMSpec("a", steps=1000).schedule() == [0, 16, 32, 64, 128, 256, 512, 1000]
    assert LMSpec("a", steps=16).schedule() == [0, 16]
    assert LMSpec("a", steps=10, checkpoint_steps=[5, 0]).schedule() == [0, 5, 10]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(seq_len=256), "exceeds n_positions"),
    (dict(steps=0), "steps=0 must be an integer >= 1"),
    (dict(n_layer=2.5), "n_layer=2.5 must be an integer"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(lr=0.0), "lr=0.0"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(steps=100, checkpoint_steps=[0, 200]), r"\[200\] outside \[0, 100\]"),
    (dict(checkpoint_steps=[0, "8"]), "list of integers"),
    (dict(checkpoint_steps=8), "list of integers"),
    (dict(eval_windows=0), "eval_windows"),
    (dict(name="a/b"), "name"),
])
def test_bad_specs_raise_one_line_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        LMSpec(**{"name": "x", **kwargs})
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ held-out
def test_heldout_metrics_match_a_hand_computation(heldout_sample_ids):
    model = tiny()
    stream = torch.from_numpy(heldout_sample_ids[:50])  # (50 - 1) // 8 = 6 windows of 8
    got = heldout_metrics(model, stream, seq_len=8, max_windows=3, batch=2)
    nll, hits = [], []
    for j in (0, 2, 4):  # 3 of 6, evenly spaced
        w = stream[j * 8:j * 8 + 9]
        with torch.no_grad():
            logp = torch.log_softmax(model(w[None, :-1]).logits[0].double(), -1)
        nll += [-logp[t, w[t + 1]].item() for t in range(8)]
        hits += [int(logp[t].argmax()) == int(w[t + 1]) for t in range(8)]
    assert got["eval_loss"] == pytest.approx(sum(nll) / 24, abs=1e-5)
    assert got["eval_acc"] == sum(hits) / 24 and 0 < got["eval_acc"] < 1
    with pytest.raises(ValueError, match="shorter than one window"):
        heldout_metrics(model, stream[:8], seq_len=8)


# ------------------------------------------------------------------------------ multiple choice
def test_multiple_choice_items_are_cut_from_the_stream(heldout_sample_ids):
    s = heldout_sample_ids
    mc = build_multiple_choice(s, 40, context_len=24, cont_len=8, seed=3, boundary_id=EOT_ID)
    assert mc.context.shape == (40, 24) and mc.choices.shape == (40, 4, 8)
    slots = [(a, a + 32) for a in mc.starts.tolist()]
    windows = np.lib.stride_tricks.sliding_window_view(s, 8)
    for i, (a, _) in enumerate(slots):
        assert np.array_equal(mc.context[i], s[a:a + 24])
        assert np.array_equal(mc.choices[i, mc.answer[i]], s[a + 24:a + 32])
        for j in range(4):
            if j == mc.answer[i]:
                continue
            d = mc.choices[i, j]
            assert not np.array_equal(d, mc.choices[i, mc.answer[i]])
            found = np.flatnonzero((windows == d).all(axis=1))
            # found elsewhere in the stream, clear of every question's own context + answer
            assert any(all(p + 8 <= lo or p >= hi for lo, hi in slots) for p in found)
    assert not (mc.choices == EOT_ID).any() and not (mc.context == EOT_ID).any()
    assert len(set(mc.answer.tolist())) == 4 and np.bincount(mc.answer).max() < 20
    same = build_multiple_choice(s, 40, context_len=24, cont_len=8, seed=3, boundary_id=EOT_ID)
    other = build_multiple_choice(s, 40, context_len=24, cont_len=8, seed=4, boundary_id=EOT_ID)
    assert np.array_equal(same.choices, mc.choices) and not np.array_equal(other.starts, mc.starts)
    with pytest.raises(ValueError, match="too short"):
        build_multiple_choice(s, 1000, context_len=24, cont_len=8)


def test_untrained_model_is_near_chance_and_trained_model_far_above(heldout_sample_ids):
    from scipy.stats import binomtest
    mc = build_multiple_choice(heldout_sample_ids, 64, context_len=32, cont_len=8, seed=0,
                               boundary_id=EOT_ID)
    untrained = multiple_choice_accuracy(tiny(0), mc)
    trained = multiple_choice_accuracy(tiny(), mc)
    # chance is 0.25 (sd 0.054 for 64 items); wide margins, not a coin-flip threshold
    assert 0.05 <= untrained <= 0.45
    # the shipped model scores 0.52-0.69 over seeds 0-3 of this construction: assert only
    # that it beats chance at p < 0.001, which holds far inside that range
    assert binomtest(round(trained * 64), 64, 0.25, alternative="greater").pvalue < 1e-3
    assert trained > untrained


def test_choice_logprobs_with_shared_context_equal_full_sequences(heldout_sample_ids):
    from coupling.experiments.study.lm_eval import choice_logprobs
    model = tiny()
    mc = build_multiple_choice(heldout_sample_ids, 6, context_len=16, cont_len=5, n_choices=3,
                               seed=1)
    got = choice_logprobs(model, mc, batch=4)  # 1 item per batch: uneven last batch too
    for i in range(6):
        for j in range(3):
            x = torch.from_numpy(np.concatenate([mc.context[i], mc.choices[i, j]]))
            with torch.no_grad():
                logp = torch.log_softmax(model(x[None, :-1]).logits[0, 15:].double(), -1)
            want = logp.gather(-1, x[16:, None]).sum().item()
            assert got[i, j].item() == pytest.approx(want, abs=1e-3)


def test_multiple_choice_arrays_round_trip_through_npz(heldout_sample_ids, tmp_path):
    mc = build_multiple_choice(heldout_sample_ids, 10, seed=2)
    np.savez(tmp_path / "mc.npz", **mc_to_arrays(mc))
    with np.load(tmp_path / "mc.npz", allow_pickle=False) as z:
        back = mc_from_arrays(z)
    for name in ("context", "choices", "answer", "starts"):
        assert np.array_equal(getattr(back, name), getattr(mc, name))
    with pytest.raises(ValueError, match="missing"):
        mc_from_arrays({"mc_context": mc.context})


# ------------------------------------------------------------------------------ data folder
def test_prepare_save_load_round_trip(tmp_path):
    data = prepare_lm_data(TINY, max_chars=60_000, seed=0, mc_items=1, mc_context=16,
                           mc_continuation=8)
    desc = data.description
    assert desc["corpus"]["sha256"] == build_corpus(max_chars=60_000).sha256()
    assert desc["train_tokens"] == len(data.train_ids) > 10_000
    assert desc["tokenizer"]["vocab_size"] == len(data.tokenizer) == 1024
    assert data.train_ids.dtype == torch.int64 and data.mc.choices.shape == (1, 4, 8)
    save_lm_data(data, tmp_path / "data")
    save_lm_data(data, tmp_path / "data")  # over an existing folder
    back = load_lm_data(tmp_path / "data")
    assert torch.equal(back.train_ids, data.train_ids)
    assert torch.equal(back.heldout_ids, data.heldout_ids)
    assert np.array_equal(back.mc.choices, data.mc.choices)
    assert back.description == json.loads(json.dumps(desc))
    text = "What is the capital of France? The capital is Paris."
    assert back.tokenizer(text)["input_ids"] == data.tokenizer(text)["input_ids"]
    with pytest.raises(ValueError, match="save_lm_data"):
        load_lm_data(tmp_path / "nowhere")
