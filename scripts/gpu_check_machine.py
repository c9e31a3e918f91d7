"""GPU check, step ``machine``: the machine line (GPU, torch, CUDA, transformers...) and an
import check of every ``coupling`` module on this stack with Ray made unimportable."""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import traceback
from pathlib import Path

from gpu_check_common import Ctx, blocked, write_table


def step_machine(ctx: Ctx):
    import torch
    import transformers

    dev = torch.device(ctx.device)
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "device": ctx.device, "smoke": ctx.smoke}
    for dist in ("accelerate", "numpy", "scipy", "pandas", "matplotlib", "safetensors",
                 "pytest", "ray", "pyarrow", "datasets", "pyyaml", "tqdm"):
        info[dist] = version(dist)
    if dev.type == "cuda":
        prop = torch.cuda.get_device_properties(dev)
        info.update(gpu=prop.name, gpu_memory_gb=round(prop.total_memory / 2**30, 1),
                    compute_capability=f"{prop.major}.{prop.minor}",
                    cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver())
    else:
        info["gpu"] = "none (CPU run)"
    line = (f"{info['gpu']}; torch {info['torch']} (CUDA {info['torch_cuda']}), transformers "
            f"{info['transformers']}, Python {info['python']}, {info['cpus']} CPUs"
            + (f", driver {info.get('driver')}" if dev.type == "cuda" else ""))
    info["line"] = line
    ctx.log(f"machine: {line}")
    stack = import_check()
    failed = [r for r in stack if r["status"] != "ok"]
    info["modules_checked"], info["modules_failed"] = len(stack), len(failed)
    (ctx.out / "machine.json").write_text(json.dumps(info, indent=1, default=str))
    write_table(ctx.out, "stack", stack, "Import check (Ray and the blocked packages unimportable)",
                f"Blocked: {', '.join(blocked(ctx))}. Machine: {line}")
    for r in failed:
        ctx.log(f"import of {r['module']} failed: {r['error']}")
    if failed:
        raise RuntimeError(f"{len(failed)} coupling module(s) do not import on this stack "
                           f"(stack.md): {', '.join(r['module'] for r in failed)}")


def version(dist: str) -> str:
    """Installed version of a distribution (read from metadata: nothing is imported)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def import_check() -> list[dict]:
    """Import every ``coupling`` module; a failure records its first error line and whether
    the blocked Ray was the cause (with the import chain)."""
    import pkgutil

    import coupling

    rows = []
    for mod in sorted(m.name for m in pkgutil.walk_packages(coupling.__path__, "coupling.")):
        try:
            importlib.import_module(mod)
            rows.append({"module": mod, "status": "ok", "error": ""})
        except Exception as e:  # noqa: BLE001 - every failure is the finding
            chain = [f"{Path(f.filename).name}:{f.lineno}"
                     for f in traceback.extract_tb(e.__traceback__)
                     if not f.filename.startswith("<") and "importlib" not in f.filename]
            first = str(e).splitlines()[0] if str(e) else ""
            rows.append({"module": mod, "status": "failed",
                         "error": f"{type(e).__name__}: {first} (import chain: "
                                  f"{' > '.join(chain[-6:])})"})
    return rows
