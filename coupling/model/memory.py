"""Memory of this process and of this machine: what a scan measures and plans against.

* :func:`reset_peak` / :func:`peak` -- the host resident-set peak (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs``; elsewhere ``getrusage``'s lifetime peak, which cannot be
  reset) and, where a CUDA device was used, its allocator peak.
* :func:`available` -- the host memory a new allocation can get (``MemAvailable``, capped by a
  cgroup limit) and, where there is one, the device's free memory.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

GB = 1e9


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss() -> int:
    """This process's resident memory now (bytes; 0 where unknown)."""
    kb = _status_kb("VmRSS")
    return 0 if kb is None else kb * 1024


def reset_peak():
    """Start a new host (and CUDA) peak from the current resident set."""
    try:
        Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to VmRSS (Linux >= 4.0)
    except OSError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak() -> dict:
    """``{"host_peak_bytes": int, "device_peak_bytes": int | None, "host_peak_source": str}``:
    the host peak since :func:`reset_peak` (``VmHWM``) or, without ``/proc``, since the
    process started (``ru_maxrss``); the CUDA allocator peak when CUDA was used."""
    kb = _status_kb("VmHWM")
    source = "VmHWM"
    if kb is None:
        scale = 1 if sys.platform == "darwin" else 1024      # bytes on macOS, KiB on Linux
        kb, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024, "ru_maxrss"
    device = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        device = int(torch.cuda.max_memory_allocated())
    return {"host_peak_bytes": int(kb * 1024), "device_peak_bytes": device,
            "host_peak_source": source}


def available() -> dict:
    """``{"host_bytes": int | None, "device_bytes": int | None}``: host memory a new
    allocation can get (``MemAvailable``, capped by a cgroup v2/v1 limit), free device memory."""
    host = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit = _cgroup_room()
    if limit is not None:
        host = limit if host is None else min(host, limit)
    device = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        device = device_free("cuda")
    return {"host_bytes": host, "device_bytes": device}


def device_free(device: str) -> int | None:
    """Free memory of GPU ``device`` (``cuda``: the current one), None for ``cpu``; a
    one-line error when this torch cannot reach it."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA "
                         "GPU: install a CUDA build of torch on a GPU machine, or scan with "
                         "--device cpu")
    dev = torch.device(device)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return int(torch.cuda.mem_get_info(dev)[0])


def _cgroup_room() -> int | None:
    """Room left under this process's cgroup memory limit, if it has one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit_file).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:
                return None
            return int(text) - int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def gb(n_bytes) -> str:
    """``"3.21 GB"`` / ``"412 MB"`` (decimal units, as memory and disk sizes are quoted)."""
    if n_bytes is None:
        return "?"
    return f"{n_bytes / GB:.2f} GB" if abs(n_bytes) >= GB else f"{n_bytes / 1e6:.0f} MB"
