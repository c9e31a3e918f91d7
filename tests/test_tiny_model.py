"""The shipped tiny causal LM (coupling/data/tiny) is trained, loadable offline and reproducible.

Known answers used here: a uniform predictor scores ln(V) nats/token, so a trained model must
be well below it and below its own step-0 checkpoint; byte-level BPE without a prefix space
must round-trip text exactly; eager and SDPA attention compute the same function.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "coupling" / "data" / "tiny"
SCRIPT = REPO / "scripts" / "train_tiny.py"
PROMPT = "What is the capital of France? The capital is"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(TINY, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def record():
    return json.loads((TINY / "training.json").read_text())


@pytest.fixture(scope="module")
def heldout_ids(tokenizer):
    ids = tokenizer((TINY / "heldout_sample.txt").read_text())["input_ids"]
    return torch.tensor(ids[:2049])  # 16 windows of 128 tokens + 1 target


def checkpoint_dirs() -> list[Path]:
    return sorted((TINY / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, window: int = 128) -> float:
    """Mean next-token loss over non-overlapping ``window``-token chunks of ``ids``."""
    n = (len(ids) - 1) // window
    x = torch.stack([ids[i * window:(i + 1) * window + 1] for i in range(n)])
    logits = model(input_ids=x[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()


def load_script():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------- shipped folder


def test_shipped_files_and_size_budget():
    for name in ["config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "training.json", "heldout_sample.txt"]:
        assert (TINY / name).is_file(), name
    total = sum(p.stat().st_size for p in TINY.rglob("*") if p.is_file())
    assert total <= 10_000_000, f"coupling/data/tiny is {total / 1e6:.2f} MB > 10 MB"
    assert (TINY / "model.safetensors").stat().st_size <= 4_200_000


def test_config_is_tied_gpt2_matching_record(model, record):
    cfg = model.config
    assert cfg.model_type == "gpt2" and cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    m = record["model"]
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (
        m["n_layer"], m["n_embd"], m["n_head"], m["n_positions"])
    assert sum(p.numel() for p in model.parameters()) == m["parameters"]
    assert model.dtype == torch.float32


def test_eager_and_sdpa_attention_agree(model, tokenizer):
    from transformers import AutoModelForCausalLM
    sdpa = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation="sdpa").eval()
    x = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, sdpa(x).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_round_trips_prompt(tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    assert tokenizer.decode(ids) == PROMPT
    assert tokenizer.eos_token == EOT and tokenizer.eos_token_id == 0
    assert 0 not in ids  # no special tokens are added to a prompt
    assert 512 <= len(tokenizer) <= 1024
    assert len(ids) < len(PROMPT) / 2  # BPE merges, not bytes


def test_model_is_trained(model, tokenizer, heldout_ids, record):
    loss = heldout_loss(model, heldout_ids)
    assert loss < math.log(len(tokenizer)) - 2.5  # uniform guessing scores ln V
    # the sample is a slice of the held-out split the script scored in full
    assert abs(loss - record["eval_loss"]) < 0.5
    assert math.isclose(record["eval_perplexity"], math.exp(record["eval_loss"]), rel_tol=1e-9)


def capital_mass(model, tokenizer) -> float:
    """Next-token probability after PROMPT of the first tokens of the generated capitals."""
    capitals = load_script().make_corpus.CAPITALS
    firsts = {tokenizer(" " + city)["input_ids"][0] for _, city in capitals}
    x = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(x).logits[0, -1].softmax(-1)[sorted(firsts)].sum().item()


def test_model_has_learnt_the_generated_template(model, tokenizer):
    # the tiny model learns that a city name follows, not which city (it says " B…")
    from transformers import AutoModelForCausalLM
    untrained = AutoModelForCausalLM.from_pretrained(checkpoint_dirs()[0]).eval()
    assert capital_mass(model, tokenizer) > 0.5
    assert capital_mass(untrained, tokenizer) < 0.1


def test_checkpoints_load_and_loss_falls_with_training(tokenizer, heldout_ids, record):
    from transformers import AutoModelForCausalLM
    dirs = checkpoint_dirs()
    steps = [int(d.name[5:]) for d in dirs]
    assert 6 <= len(dirs) <= 10 and steps[0] == 0 and steps[-1] == record["args"]["steps"]
    losses = {}
    for d in (dirs[0], dirs[len(dirs) // 2], dirs[-1]):
        state = json.loads((d / "trainer_state.json").read_text())
        assert state["step"] == int(d.name[5:])
        assert state["tokens_seen"] == state["step"] * record["args"]["batch_size"] * \
            record["args"]["seq_len"]
        ckpt = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        assert ckpt.dtype == torch.float32  # float16 storage is upcast on load
        losses[state["step"]] = heldout_loss(ckpt, heldout_ids)
    first, *_, last = losses.values()
    assert first > math.log(len(tokenizer)) - 0.2  # step 0 is untrained
    assert last < first - 2.5
    recorded = [json.loads((d / "trainer_state.json").read_text())["eval_loss"] for d in dirs]
    assert recorded[-1] < recorded[0] - 2.5


def test_final_checkpoint_is_the_final_model_in_float16(model, heldout_ids):
    from transformers import AutoModelForCausalLM
    ckpt = AutoModelForCausalLM.from_pretrained(checkpoint_dirs()[-1]).eval()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q, p.half().float(), atol=0, rtol=0, msg=name)


# ------------------------------------------------------------------- training script


def test_checkpoint_schedule_is_log_spaced():
    tt = load_script()
    assert tt.checkpoint_steps(1600, None) == [0, 16, 32, 64, 128, 256, 512, 1024, 1600]
    assert tt.checkpoint_steps(10, "0,5,10") == [0, 5, 10]
    with pytest.raises(ValueError, match="outside"):
        tt.checkpoint_steps(10, "0,20")


@pytest.mark.parametrize("argv, match", [
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--seq-len", "512"], "exceeds --n-positions"),
    (["--steps", "0"], "at least 1"),
    (["--vocab-size", "200"], "more than 257"),
])
def test_bad_arguments_raise_value_error(argv, match, tmp_path):
    tt = load_script()
    with pytest.raises(ValueError, match=match):
        tt.parse_args(["--out", str(tmp_path)] + argv)


def test_training_script_runs_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "3", "--seed", "1",
           "--max-chars", "30000", "--vocab-size", "300", "--n-layer", "2", "--n-embd", "32",
           "--seq-len", "32", "--batch-size", "4", "--checkpoint-steps", "0,2,3",
           "--eval-windows", "2", "--log-every", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step     3" in run.stdout
    rec = json.loads((out / "training.json").read_text())
    assert rec["seed"] == 1 and rec["tokens_seen"] == 3 * 4 * 32
    assert rec["command"].startswith("python3 ") and "--steps 3" in rec["command"]
    assert [c["step"] for c in rec["checkpoints"]] == [0, 2, 3]
    for step in (0, 2, 3):
        state = json.loads((out / "checkpoints" / f"step-{step}" / "trainer_state.json")
                           .read_text())
        assert state["step"] == step and state["stored_dtype"] == "float16"

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok(PROMPT)["input_ids"]) == PROMPT
    m = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-2",
                                             attn_implementation="eager")
    assert m.config.n_layer == 2 and len(tok) == m.config.vocab_size == 300
