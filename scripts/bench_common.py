"""What every ``scripts/bench_*.py`` shares: the start (BLAS threads, the machine line), best
wall-clock time over repeats, the rise of peak memory around a call, a random-init model of a
given width and the recorded forward of one random prompt.

Imported by its neighbours (``sys.path`` holds ``scripts/`` when one of them runs).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import sys
import time

ENV_MARK = "COUPLING_BENCH_ENV"


def reexec_with_env(threads: int) -> None:
    """Re-run this process once with numpy/scipy's BLAS (ARPACK's own work) limited to the
    same number of threads as torch: an oversubscribed OpenBLAS stalls on a shared machine.
    The variables must be set before the libraries load, hence the re-exec.
    """
    if os.environ.get(ENV_MARK) == "1":
        return
    env = dict(os.environ)
    env.update({ENV_MARK: "1", "OMP_NUM_THREADS": str(threads),
                "OPENBLAS_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads)})
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_extra_memory(fn, device: str = "cpu"):
    """``(result, bytes)``: the rise of peak memory while ``fn`` runs: the resident set on
    CPU (:func:`peak_extra_rss`), allocated device memory on CUDA."""
    import torch

    if torch.device(device).type != "cuda":
        return peak_extra_rss(fn)
    sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    return out, max(0, torch.cuda.max_memory_allocated() - base)


def peak_extra_rss(fn):
    """``(result, bytes)``: run ``fn`` and return the rise of the resident-set high-water mark.

    Frees what can be freed (``gc``, ``malloc_trim``: glibc hands freed heap pages back), then
    resets the kernel's high-water mark (``/proc/self/clear_refs``, Linux >= 4.0) and reads
    ``VmHWM - VmRSS``; ``None`` bytes where that is not available.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status("VmRSS")
    except OSError:
        base = None
    out = fn()
    peak = _status("VmHWM")
    return out, (None if base is None or peak is None else max(0, peak - base))


def sync():
    """Wait for queued GPU work, so wall-clock times cover it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_time(fn, repeats: int, min_seconds: float = 0.0):
    """``(min seconds, last result)`` over ``repeats`` calls (at least one)."""
    best, out, total = float("inf"), None, 0.0
    for i in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        dt = time.perf_counter() - t0
        best, total = min(best, dt), total + dt
        if min_seconds and total > min_seconds and i >= 0:
            break
    return best, out


def machine_info(threads: int, device: str = "cpu") -> dict:
    import torch
    import transformers

    gpu = "none (CPU only)"
    if torch.device(device).type == "cuda":
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count(),
            "torch_threads": threads, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "device": device,
            "gpu": gpu, "loadavg_start": os.getloadavg()}


def start(name: str, threads: int, device: str = "cpu") -> dict:
    """Common start of every benchmark: BLAS threads (re-exec), torch threads, quiet
    deprecation warnings, and the machine line printed first.  Returns the machine info."""
    reexec_with_env(threads)
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(threads)
    info = machine_info(threads, device)
    print(f"# {name}  {json.dumps(info)}", flush=True)
    return info


def width_config(family: str, d: int, n_layers: int):
    """A realistic-width config of ``family`` at width ``d`` (heads of 64, vocab 128)."""
    import transformers as tf

    heads = max(1, d // 64)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=n_layers, n_embd=d, n_head=heads, n_inner=4 * d,
                             vocab_size=128, n_positions=2048, bos_token_id=0, eos_token_id=0,
                             architectures=["GPT2LMHeadModel"])
    if family == "llama":
        ffn = int(2.75 * d) // 64 * 64
        return tf.LlamaConfig(num_hidden_layers=n_layers, hidden_size=d, intermediate_size=ffn,
                              num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                              vocab_size=128, max_position_embeddings=2048,
                              architectures=["LlamaForCausalLM"])
    raise ValueError(f"unknown family {family!r}: use gpt2 or llama")


def record_prompt(config, n: int, seed: int = 0, dtype=None, device: str = "cpu"):
    """Random-init model for ``config`` (on ``device``) and the recorded forward of one
    random prompt."""
    import torch

    from coupling.model.loading import LoadedModel
    from coupling.model.trajectory import run_forward
    from coupling.model.zoo import build_random

    model = build_random(config, seed=seed, dtype=dtype or torch.float32).to(device)
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    lm = LoadedModel(model, None, config, {"n_layers": n_layers})
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))
    return lm, ids, run_forward(lm, ids)


def fmt(x, spec=".3g"):
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return format(x, spec)
