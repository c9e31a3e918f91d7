"""DeepSpeed ZeRO-2/3 checkpoints read directly, against the same weights via save_pretrained.

A small random GPT-2 is trained for two steps with ``deepspeed.initialize`` on CPU (gloo,
one process) in a subprocess -- DeepSpeed's distributed init and accelerator detection stay
out of the test process -- and saved both with ``engine.save_checkpoint`` and, gathered, with
``save_pretrained``.  The scan of the ZeRO checkpoint must equal the scan of the plain copy.

DeepSpeed compiles a shared-memory all-reduce C++ op on its first ``init_distributed`` on a
CPU machine (~3 min on 2 cores).  One process needs no inter-process all-reduce, so the
trainer marks the op incompatible (``deepspeed.ops.__compatible_ops__``, a dict DeepSpeed
keeps for exactly this lookup) and DeepSpeed falls back to plain gloo: nothing is compiled
and the whole file runs in about 30-40 s.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from gap_tolerance import assert_same_scan  # noqa: E402

from coupling.experiments.checkpoints import scan_checkpoints  # noqa: E402
from coupling.model.loading import TINY_MODEL_DIR, load_model  # noqa: E402
from coupling.model.zero import load_zero_checkpoint, resolve_tag  # noqa: E402
from coupling.model.zoo import save_random, small_config  # noqa: E402
from coupling.results.scan_output import read_scan_output  # noqa: E402
from coupling.scan import scan  # noqa: E402

STAGES = (2, 3)
SCAN = dict(prompts="builtin", max_prompts=2, k=4, figures=False, progress=False)


# ------------------------------------------------------------------------------------------
# The trainer (runs in a subprocess: python tests/test_zero.py INIT_DIR OUT_DIR)
# ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_with_deepspeed(init_dir: str, out_dir: str, stages=STAGES, steps: int = 2):
    """Train ``init_dir`` for ``steps`` with ZeRO at each stage; save ZeRO + plain copies."""
    import deepspeed
    import deepspeed.ops
    import transformers as tf

    # single process: no shared-memory all-reduce needed, so do not compile its C++ op
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(out_dir)
    summary = {}
    for stage in stages:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_pretrained(init_dir, attn_implementation="eager")
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)   # client optimizer: no C++ op
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        losses = []
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (2, 16))
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        engine.save_checkpoint(str(out / f"zero{stage}"), tag=f"global_step{steps}")
        # the same weights, gathered (ZeRO-3 partitions them) and saved the ordinary way
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        plain = tf.AutoModelForCausalLM.from_config(model.config)
        plain.load_state_dict(state)
        plain.save_pretrained(out / f"plain{stage}")
        summary[stage] = losses
    (out / "losses.json").write_text(json.dumps(summary))


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR / "checkpoints" / "step-0")
    init = tmp_path_factory.mktemp("init")
    save_random(small_config("gpt2", n_layers=3, d=32, vocab=len(tok), max_pos=64), init,
                tokenizer=tok)
    out = tmp_path_factory.mktemp("ds")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, str(init), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in STAGES:                       # the plain copy gets the tokenizer too
        tok.save_pretrained(out / f"plain{stage}")
    return {"init": init, "out": out, "tok": tok,
            "losses": json.loads((out / "losses.json").read_text())}


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_zero_weights_equal_the_gathered_weights(trained, stage):
    out = trained["out"]
    lm = load_zero_checkpoint(out / f"zero{stage}", trained["init"])
    plain = load_model(out / f"plain{stage}")
    init = load_model(trained["init"])
    zs, ps, is_ = lm.model.state_dict(), plain.model.state_dict(), init.model.state_dict()
    assert zs.keys() == ps.keys()
    for name in zs:
        assert torch.equal(zs[name], ps[name]), name
    # training moved the weights (the comparison is not init against init)
    assert not torch.equal(zs["transformer.h.0.attn.c_attn.weight"],
                           is_["transformer.h.0.attn.c_attn.weight"])
    assert lm.info["revision"] == "global_step2" and lm.info["format"] == "deepspeed-zero"
    assert lm.info["n_layers"] == 3 and lm.info["d_model"] == 32
    assert lm.tokenizer is not None


@pytest.mark.parametrize("stage", STAGES)
def test_zero_scan_equals_save_pretrained_scan(trained, stage, tmp_path):
    out = trained["out"]
    lm = load_zero_checkpoint(out / f"zero{stage}", trained["init"])
    a = scan(loaded=lm, out=str(tmp_path / "zero"), **SCAN)
    b = scan(str(out / f"plain{stage}"), out=str(tmp_path / "plain"), **SCAN)
    # coupling numbers within the tolerance their spectral gaps give (tests/gap_tolerance.py)
    assert_same_scan(a, b, atol=1e-9, ignore=("source",))


def test_checkpoint_spec_with_zero_entry(trained, tmp_path):
    """``{zero: DIR, config: DIR}`` in a checkpoint spec: step parsed from the tag."""
    out = trained["out"]
    spec = {"name": "ds-gpt2",
            "checkpoints": [{"zero": str(out / "zero2"), "config": str(trained["init"])},
                            {"path": str(trained["init"]), "step": 0}]}
    res = scan_checkpoints(spec, tmp_path / "series", progress=False, max_prompts=2, k=4)
    assert list(res["step"]) == [0, 2]
    plain = scan(str(out / "plain2"), out=str(tmp_path / "plain"), **SCAN)
    z = read_scan_output(tmp_path / "series" / "step-2")
    assert_same_scan(z, plain, atol=1e-9, ignore=("source",))
    assert z.manifest["model"]["format"] == "deepspeed-zero"


def test_bad_zero_directories_say_what_to_do(trained, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_tag(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no DeepSpeed checkpoint"):
        resolve_tag(tmp_path)
    with pytest.raises(ValueError, match="choose one of global_step2"):
        resolve_tag(trained["out"] / "zero2", "global_step7")
    assert resolve_tag(trained["out"] / "zero3") == "global_step2"


def test_config_that_does_not_fit_the_checkpoint(trained, tmp_path):
    other = save_random(small_config("gpt2", n_layers=2, d=32, vocab=len(trained["tok"]),
                                     max_pos=64), tmp_path / "other")
    with pytest.raises(ValueError, match="do not fit the model built from the config"):
        load_zero_checkpoint(trained["out"] / "zero2", other)


if __name__ == "__main__":
    train_with_deepspeed(sys.argv[1], sys.argv[2])
