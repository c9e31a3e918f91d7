"""The local scan survives a crash and a failing prompt.

* ``coupling scan`` (the embedded tiny model, built-in prompts) killed with SIGKILL mid-scan
  and rerun with the same command computes only the prompts that were not saved, every
  prompt ends up exactly once, and the output equals an uninterrupted run's (arrays equal:
  the same prompts on the same code give the same bits).  A different configuration refuses
  to mix with the saved prompts.
* A prompt that really fails -- one token's embedding is so large (1e18) that the blocks'
  float32 updates vanish beside it, so its trajectory does not move (``x^1 == x^0``, a zero
  step: LSS undefined) -- is recorded in ``failures.json`` with its layer, the other prompts
  finish with the same numbers as a scan without it, and the exit code is 3; ``--fail-fast``
  makes it fatal (exit code 2, nothing written).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from processes import kill_after_files

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 36
ARGS = ["--max-prompts", str(N_PROMPTS), "--k", "4", "--no-figures"]


def coupling(*args, **kw):
    return subprocess.run([sys.executable, "-m", "coupling.cli", "scan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, **kw)


def _assert_same_output(a: Path, b: Path, ignore=()):
    for name in ("summary.parquet", "layers.parquet"):
        x, y = (pd.read_parquet(d / name).drop(columns=list(ignore), errors="ignore")
                for d in (a, b))
        pd.testing.assert_frame_equal(x, y, check_exact=True)
    for name in ("depth_coupling.npz", "pca.npz"):
        x, y = np.load(a / name), np.load(b / name)
        assert sorted(x.files) == sorted(y.files)
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}:{key}")


def test_sigkill_mid_scan_then_rerun_computes_only_what_is_missing(tmp_path):
    ref = tmp_path / "ref"
    done = coupling("--out", str(ref), *ARGS)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    cmd = [sys.executable, "-m", "coupling.cli", "scan", "--out", str(out), *ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    saved = kill_after_files(proc, partial, "shard-*.npz", 5, timeout=240, poll=0.01)
    assert 5 <= len(saved) < N_PROMPTS, saved
    assert not out.exists()                                  # nothing final was written
    # the same --out with other settings does not mix with what is saved
    other = coupling("--out", str(out), *ARGS[:2], "--k", "3", "--no-figures")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith(
        f"coupling: error: {partial} holds shards of a different scan")
    assert sorted(p.name for p in partial.glob("shard-*.npz")) == saved
    # the same command resumes
    again = coupling("--out", str(out), *ARGS)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(saved)} of {N_PROMPTS} prompts already done" in again.stderr
    counts = json.loads((out / "manifest.json").read_text())["prompts"]
    assert counts == {"total": N_PROMPTS, "resumed": len(saved),
                      "computed": N_PROMPTS - len(saved), "failed": 0}
    summary = pd.read_parquet(out / "summary.parquet")
    assert summary.prompt_id.is_unique and len(summary) == N_PROMPTS
    _assert_same_output(out, ref)
    assert not partial.exists()                              # the shards went with the end


@pytest.fixture(scope="module")
def degenerate(tmp_path_factory):
    """A random GPT-2 in which token `` z`` is embedded at 1e18, and three prompts of which
    only the second holds that token."""
    import torch
    from transformers import AutoTokenizer

    from coupling.model.loading import TINY_MODEL_DIR, load_model
    from coupling.model.zoo import save_random, small_config

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    texts = {"cat": "The cat sat on the mat.", "zebra": "Quantum zebras juggle.",
             "sun": "It is a sunny day."}
    ids = {k: tok(v).input_ids for k, v in texts.items()}
    z = tok(" z").input_ids[0]
    assert z in ids["zebra"] and z not in ids["cat"] + ids["sun"]
    folder = tmp_path_factory.mktemp("degenerate")
    cfg = small_config("gpt2", n_layers=3, d=32, vocab=len(tok), max_pos=64)
    lm = load_model(save_random(cfg, folder / "random", tokenizer=tok))
    with torch.no_grad():
        lm.model.transformer.wte.weight[z] = 1e18
    lm.model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
    healthy = folder / "healthy.jsonl"
    healthy.write_text("".join(json.dumps({"id": k, "text": v}) + "\n"
                               for k, v in texts.items() if k != "zebra"))
    return folder / "model", prompts, healthy


def test_a_failing_prompt_is_recorded_and_the_others_finish(degenerate, tmp_path):
    model, prompts, healthy = degenerate
    base = ["--model", str(model), "--k", "4", "--no-figures"]
    run = coupling("--out", str(tmp_path / "run"), "--prompts", str(prompts), *base)
    assert run.returncode == 3, run.stderr[-2000:]
    assert f"failed     1 of 3 prompts (listed in {tmp_path / 'run' / 'failures.json'})" \
        in run.stdout
    failures = json.loads((tmp_path / "run" / "failures.json").read_text())["failures"]
    assert len(failures) == 1
    f = failures[0]
    assert f["prompt_id"] == "zebra" and f["layer"] == 1
    assert f["error"].startswith("ValueError: zero step: x^1 == x^0")
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["prompts"]["failed"] == 1
    # the others: exactly what a scan of them alone gives
    alone = coupling("--out", str(tmp_path / "alone"), "--prompts", str(healthy), *base)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert json.loads((tmp_path / "alone" / "failures.json").read_text()) == {"failures": []}
    assert list(pd.read_parquet(tmp_path / "run" / "summary.parquet").prompt_id) == ["cat", "sun"]
    _assert_same_output(tmp_path / "run", tmp_path / "alone", ignore=["source"])  # file name
    # --fail-fast: the first failure stops the scan, one line, nothing written
    fast = coupling("--out", str(tmp_path / "fast"), "--prompts", str(prompts), "--fail-fast",
                    *base)
    assert fast.returncode == 2 and "Traceback" not in fast.stderr
    assert fast.stderr.strip().splitlines()[-1].startswith(
        "coupling: error: prompt zebra failed (zero step: x^1 == x^0")
    assert not (tmp_path / "fast").exists()
