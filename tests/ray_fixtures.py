"""Shared fixtures of the Ray tests (``from ray_fixtures import *``; tests/ is on sys.path).

ONE local Ray cluster per test session, on 127.0.0.1, 4 logical CPUs, no dashboard.  Each
importing module gets its own copy of a session fixture, so the cluster and the test model
are memoised here at module level: the first copy starts them, the others reuse them, and
the copy that started Ray shuts it down at the end of the session.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from coupling.loading import TINY_MODEL_DIR

_memo: dict = {}

# The Ray tests' scan: small enough for a busy 2-core machine; depth and regularity measures.
SCAN_KEYS = dict(prompts="builtin", max_prompts=6, max_tokens=16, k=4, figures=False,
                 measures="depth,regularity")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address():
    """GCS address of the session's local Ray cluster (started once)."""
    import ray

    from ray_jobs.scan import ray_env

    ray_env()
    started = False
    if "ray" not in _memo:
        if not ray.is_initialized():
            ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False)
            started = True
        _memo["ray"] = ray.get_runtime_context().gcs_address
    yield _memo["ray"]
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    if "tok" not in _memo:
        _memo["tok"] = AutoTokenizer.from_pretrained(TINY_MODEL_DIR / "checkpoints" / "step-0")
    return _memo["tok"]


@pytest.fixture(scope="session")
def ray_model_dir(tiny_tokenizer, tmp_path_factory):
    """A random 4-block GPT-2 (d=32) saved with the tiny tokenizer, vocab sized to it."""
    from coupling.zoo import save_random, small_config

    if "gpt2" not in _memo:
        folder = tmp_path_factory.mktemp("ray-gpt2") / "gpt2-4"
        cfg = small_config("gpt2", n_layers=4, d=32, vocab=len(tiny_tokenizer), max_pos=64)
        _memo["gpt2"] = save_random(cfg, folder, seed=3, tokenizer=tiny_tokenizer)
    return _memo["gpt2"]


@pytest.fixture(scope="session")
def local_reference(ray_model_dir, tmp_path_factory):
    """``coupling.scan.scan`` of the same model and prompts: what Ray must reproduce."""
    from coupling.scan import scan

    if "ref" not in _memo:
        out = tmp_path_factory.mktemp("ray-ref") / "local"
        _memo["ref"] = scan(ray_model_dir, out=str(out), progress=False, **SCAN_KEYS)
    return _memo["ref"]


def ray_config(model_dir, **extra) -> dict:
    """A distributed-scan config mapping for ``model_dir`` with the tests' scan keys."""
    return {"models": [{"path": str(model_dir)}], **SCAN_KEYS, **extra}


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def assert_same_as_local(folder, ref):
    """``depth_coupling.npz``, ``summary.parquet`` and ``layers.parquet`` match the local scan."""
    folder = Path(folder)
    depth = np.load(folder / "depth_coupling.npz")
    assert list(depth["prompt_ids"]) == list(ref.depth["prompt_ids"])
    for key in ("normalized", "raw", "singular_values"):
        np.testing.assert_allclose(depth[key], ref.depth[key], rtol=0, atol=1e-6)
    summary = pd.read_parquet(folder / "summary.parquet")
    pd.testing.assert_frame_equal(summary, ref.summary, rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "layers.parquet"), ref.layers,
                                  rtol=0, atol=1e-6)
    assert summary.prompt_id.is_unique


def assert_models_row(table, ref):
    """One row; coupling = minus the mean mis-coupling (the sign ``coupling correlate`` uses)."""
    s = ref.summary
    assert list(table.columns[:11]) == ["model", "revision", "params", "layers", "d_model",
                                        "coupling_mean", "coupling_std", "coupling_raw_mean",
                                        "lss_mean", "expodistance_mean", "n_prompts"]
    row = table.iloc[0]
    assert len(table) == 1 and row["n_prompts"] == len(s)
    assert row["coupling_mean"] == pytest.approx(-s.depth_mis_coupling_mean.mean(), abs=1e-12)
    assert row["coupling_raw_mean"] == pytest.approx(-s.depth_mis_coupling_raw_mean.mean(),
                                                     abs=1e-12)
    assert row["coupling_std"] == pytest.approx(s.depth_mis_coupling_mean.std(), abs=1e-12)
    assert row["lss_mean"] == pytest.approx(s.lss.mean(), abs=1e-12)
    info = ref.manifest["model"]
    assert (row["params"], row["layers"], row["d_model"]) == (
        info["n_params"], info["n_layers"], info["d_model"])


__all__ = ["ray_address", "tiny_tokenizer", "ray_model_dir", "local_reference", "SCAN_KEYS",
           "free_port", "ray_config", "subprocess_env", "assert_same_as_local",
           "assert_models_row"]
