"""The figures of a finished scan, drawn by a process of their own so the scan need not wait.

``coupling scan`` writes its results and prints its summary first; drawing the figures
(importing matplotlib, rendering five PNGs: 2-7 s on 2 CPU cores, BENCHMARKS.md) would then
hold its exit for nothing.  So the command line starts ``python -m
coupling.figures.background OUT DIGEST`` detached (its own session, no terminal streams, so
a caller reading the scan's output does not wait for it either) and exits.  The figures
appear in ``OUT/figures/`` seconds later, ``summary.txt`` last.  If drawing fails,
``OUT/figures/errors.txt`` says why; ``coupling report OUT`` draws them again at any time.
The results never depend on it: they are written before it starts.

``DIGEST`` is the SHA-256 of ``OUT/manifest.json`` as the scan wrote it: if ``OUT`` was
replaced meanwhile (a rerun with ``--overwrite``), nothing is drawn into the new scan.

The library call ``coupling.scan.scan(figures=True)`` draws in its own process, before it
returns (:func:`coupling.figures.report.draw_figures`).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ERRORS_FILE = "errors.txt"


def manifest_digest(out_dir) -> str:
    return hashlib.sha256((Path(out_dir) / "manifest.json").read_bytes()).hexdigest()


def start(out_dir) -> subprocess.Popen:
    """Start drawing the figures of the scan in ``out_dir`` in a detached process."""
    import coupling

    out = Path(out_dir).resolve()
    root = str(Path(coupling.__file__).resolve().parents[1])   # the same coupling package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.Popen([sys.executable, "-m", "coupling.figures.background", str(out),
                             manifest_digest(out)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=str(out.parent))


def draw(out_dir, digest: str) -> int:
    """Draw the figures of ``out_dir`` if it still holds the scan ``digest`` names."""
    from coupling.errors import first_line
    from coupling.figures.report import FIGURES_DIR, draw_figures
    from coupling.results.owned import atomic_write

    out = Path(out_dir)
    try:
        if manifest_digest(out) != digest:
            return 0          # replaced by another scan: its figures are its own
    except FileNotFoundError:
        return 0              # removed meanwhile: nothing to draw, nothing to create
    errors = out / FIGURES_DIR / ERRORS_FILE
    try:
        draw_figures(out)
    except Exception as e:    # noqa: BLE001 -- any failure is reported in the folder
        atomic_write(errors,
                     (f"drawing the figures failed: {type(e).__name__}: {first_line(e)}\n"
                      f"draw them again with: coupling report {out}\n").encode())
        return 1
    errors.unlink(missing_ok=True)     # an earlier failure, drawn again now
    return 0


if __name__ == "__main__":
    sys.exit(draw(sys.argv[1], sys.argv[2]))
