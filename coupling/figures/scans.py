"""Reading a scan's output folder for the figures: one-line errors, prompt rows, siblings."""
from __future__ import annotations

import json
from pathlib import Path

from coupling.results.scan_output import MANIFEST, ScanResult, read_scan_output


def load_scan(out_dir) -> ScanResult:
    """``read_scan_output`` with one-line errors for a missing directory or manifest."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"scan directory {out} does not exist: pass the --out folder of a "
                         "finished `coupling scan`")
    if not (out / MANIFEST).exists():
        raise ValueError(f"{out} holds no finished scan (no {MANIFEST}): pass the --out folder "
                         "of a finished `coupling scan`")
    return read_scan_output(out)


def prompt_index(scan: ScanResult, prompt) -> int:
    """Row of ``prompt`` (an index 0..P-1 or a prompt id) in the scan's prompt order."""
    ids = [str(p) for p in scan.summary["prompt_id"]]
    n = len(ids)
    if isinstance(prompt, str) and not prompt.lstrip("-").isdigit():
        if prompt not in ids:
            raise ValueError(f"prompt id {prompt!r} is not in this scan: use an index 0..{n - 1} "
                             f"or one of {', '.join(ids[:5])}{'...' if n > 5 else ''}")
        return ids.index(prompt)
    i = int(prompt)
    if not 0 <= i < n:
        raise ValueError(f"--prompt {i} is out of range: this scan has {n} prompt(s), use 0..{n - 1}")
    return i


def _row_in(arrays: dict, scan: ScanResult, idx: int) -> int:
    """Row of the summary's prompt ``idx`` in an npz (matched by prompt id when stored)."""
    pid = str(scan.summary["prompt_id"].iloc[idx])
    ids = [str(p) for p in arrays.get("prompt_ids", [])]
    return ids.index(pid) if pid in ids else idx


def find_sibling(out_dir, manifest: dict) -> Path | None:
    """A sibling scan of the same model (id, L, d) at the other ``random_init``, else None.

    Among several, the one whose config (prompts, K, measures) matches best, then by name.
    """
    out = Path(out_dir).resolve()
    m = manifest.get("model", {})
    key = (m.get("id"), m.get("n_layers"), m.get("d_model"))
    cfg = manifest.get("config", {})
    best = []
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:          # an unreadable parent: nothing to compare with
        return None
    for d in entries:
        if d == out or d.name.startswith("."):     # hidden: partial scans being written
            continue
        try:
            other = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        om = other.get("model", {})
        if (om.get("id"), om.get("n_layers"), om.get("d_model")) != key:
            continue
        if bool(om.get("random_init")) == bool(m.get("random_init")):
            continue
        ocfg = other.get("config", {})
        score = sum(ocfg.get(k) == cfg.get(k) for k in ("prompts", "max_prompts", "k", "measures"))
        best.append((-score, d.name, d))
    return min(best)[2] if best else None
