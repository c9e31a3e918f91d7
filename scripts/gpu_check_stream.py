"""GPU check step ``stream``: the depth-streaming scan on the device (issue #21).

A random Llama of the check's shape (4 blocks; bf16 scan of float32 safetensors written with
``save_pretrained``) and one prompt, scanned twice by ``analyze_prompt`` (depth, K = 10):
with every block read from the files onto the device for its turn (``StreamedModel``, what
``coupling scan --device cuda --weights disk`` runs) and loaded whole on the device (what
``--weights memory`` runs).  Reported: time, peak allocated device memory, the planner's
predicted device peak (``coupling.analysis.memory_plan.plan``) and the largest difference of
the normalized coupling grids (the same arithmetic: 0 expected).
"""
from __future__ import annotations

import gc
import tempfile
from pathlib import Path

from gpu_check_common import Ctx, peak_memory, timed, write_table
from gpu_check_model import llama_config

LAYERS = 4


def step_stream(ctx: Ctx):
    import torch

    from coupling.model.zoo import save_random

    sh = ctx.shape
    config = llama_config({**sh, "layers": LAYERS})     # the scan step's model, fewer blocks
    ids = torch.randint(0, sh["vocab"], (1, sh["n"]), generator=torch.Generator().manual_seed(0))
    rows, grids = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-stream-") as tmp:
        folder = Path(tmp) / "llama"
        t_save, _ = timed(lambda: save_random(config, folder, seed=0), "cpu")
        ctx.log(f"saved a {LAYERS}-block d={sh['d']} Llama in {t_save:.1f}s")
        for mode in ("disk", "memory"):
            if ctx.left() < 10:
                ctx.log(f"{mode}: not run (time budget spent)")
                break
            row, grids[mode] = _scan(ctx, folder, ids, mode)
            rows.append(row)
            write_table(ctx.out, "stream", rows, "Depth-streaming scan on the device", NOTE)
    if len(grids) == 2:
        diff = float((grids["disk"] - grids["memory"]).abs().nan_to_num().max())
        for r in rows:
            r["max_grid_diff_disk_vs_memory"] = diff
        write_table(ctx.out, "stream", rows, "Depth-streaming scan on the device", NOTE)
        ctx.log(f"normalized grids, disk vs memory: max difference {diff:.2e}")


def _scan(ctx: Ctx, folder: Path, ids, mode: str):
    import numpy as np
    import torch

    from coupling.analysis.memory_plan import param_counts, plan
    from coupling.analysis.prompt import analyze_prompt
    from coupling.model.block_range import StreamedModel
    from coupling.model.loading import load_config, load_model
    from coupling.settings.scan_settings import ScanSettings

    s = ScanSettings(k=10, measures=("depth",))
    predicted = plan(param_counts(load_config(str(folder)), folder), ctx.dtype, s,
                     ids.shape[1], mode, device=ctx.device, device_available=None,
                     available=None)
    box = {}
    with peak_memory(ctx.device, box):
        lm = (StreamedModel(folder, ctx.dtype, device=ctx.device) if mode == "disk" else
              load_model(folder, dtype=ctx.dtype, device=ctx.device))
        sec, res = timed(lambda: analyze_prompt(lm, ids, s), ctx.device)
    grid = torch.as_tensor(np.asarray(res.depth_normalized, dtype=np.float64))
    dev_pred = predicted.device_peak_bytes
    row = {"weights": mode, "device": ctx.device, "layers": LAYERS, "d": ctx.shape["d"],
           "n": ids.shape[1], "seconds": sec, "peak_device_gb": box.get("peak_gb"),
           "predicted_device_gb": None if dev_pred is None else dev_pred / 2**30,
           "predicted_host_gb": predicted.peak_bytes / 2**30,
           "mean_mis_coupling": res.summary["depth_mis_coupling_mean"]}
    ctx.log(f"{mode}: {sec:.1f}s, device peak {box.get('peak_gb')} GiB "
            f"(predicted {row['predicted_device_gb']})")
    del lm, res
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row, grid


NOTE = ("seconds: analyze_prompt (forward + both depth passes), device synchronised. "
        "peak_device_gb: torch.cuda.max_memory_allocated while opening the model and scanning "
        "(GiB). predicted_*: the planner's peak for that mode (GiB; device only on a GPU). "
        "max_grid_diff_disk_vs_memory: the normalized L x L grids of the two runs.")
