"""The scan output directory: stable file names, atomic writes, reading back.

Layout (README, "Output directory")::

    manifest.json         config, model id/revision/hash, package versions, timings
    summary.parquet       one row per prompt
    layers.parquet        one row per prompt x layer (0..L)
    depth_coupling.npz    normalized, raw: (P, L, L); singular_values: (P, L, K); prompt_ids
    token_coupling.npz    self, fixed_input, fixed_output: (P, n_max, n_max), nan-padded
    pca.npz               projections: (P, L+1, n_max, 2), nan-padded; n_tokens
    figures/              drawn by ``coupling report`` (and at the end of a scan)

The whole directory is written under a temporary name beside the target and renamed into
place, so an interrupted scan never leaves a half-written result.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

MANIFEST = "manifest.json"


class OutputDirError(ValueError):
    pass


def check_output_dir(out_dir, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``out_dir`` cannot receive a result."""
    out = Path(out_dir)
    if out.exists():
        if (out / MANIFEST).exists() and not overwrite:
            raise OutputDirError(f"{out} already holds a finished scan: choose another --out, "
                                 "or pass --overwrite to replace it")
        if out.is_file():
            raise OutputDirError(f"--out {out} is a file: pass a directory path")
        if any(out.iterdir()) and not (out / MANIFEST).exists():
            raise OutputDirError(f"{out} exists and is not empty: choose an empty or new --out")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".coupling-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise OutputDirError(f"cannot write to {parent} ({e.strerror}): choose a writable --out") from None
    return out


def atomic_write_bytes(path: Path, data: bytes):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def summary_frame(results) -> pd.DataFrame:
    rows = []
    for r in results:
        row = {"prompt_id": r.prompt_id, "n_tokens": r.n_tokens, **r.summary}
        for key in ("kind", "source", "difficulty"):
            if key in r.meta:
                row[key] = r.meta[key]
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("depth_mis_coupling_mean", "depth_mis_coupling_raw_mean", "lss", "expodistance"):
        if col not in df:
            df[col] = np.nan
    return df


def layers_frame(results) -> pd.DataFrame:
    frames = []
    for r in results:
        if not r.layers:
            continue
        df = pd.DataFrame({k: np.asarray(v) for k, v in r.layers.items()})
        df.insert(0, "prompt_id", r.prompt_id)
        if r.singular_values is not None:
            sv = np.full((len(df), r.singular_values.shape[1]), np.nan)
            sv[1:1 + r.singular_values.shape[0]] = r.singular_values  # layer l >= 1
            for j in range(sv.shape[1]):
                df[f"sv_{j + 1}"] = sv[:, j]
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _padded(arrays, shape_tail_fn, n_max):
    out = None
    for i, a in enumerate(arrays):
        if a is None:
            continue
        if out is None:
            out = np.full((len(arrays),) + shape_tail_fn(a, n_max), np.nan, dtype=np.float32)
        idx = (i,) + tuple(slice(0, s) for s in a.shape)
        out[idx] = a
    return out


def write_scan_output(out_dir, manifest: dict, results, overwrite: bool = False) -> Path:
    """Write every file into a temporary sibling directory, then rename it into place."""
    out = check_output_dir(out_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    try:
        _write_files(tmp, manifest, results)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_files(folder: Path, manifest: dict, results):
    ids = np.array([r.prompt_id for r in results])
    summary_frame(results).to_parquet(folder / "summary.parquet", index=False)
    layers_frame(results).to_parquet(folder / "layers.parquet", index=False)
    if any(r.depth_normalized is not None for r in results):
        sv = [r.singular_values for r in results]
        np.savez(folder / "depth_coupling.npz", prompt_ids=ids,
                 normalized=np.stack([r.depth_normalized for r in results]),
                 raw=np.stack([r.depth_raw for r in results]),
                 singular_values=np.stack(sv) if all(s is not None for s in sv) else np.array([]))
    n_max = max((r.n_tokens for r in results), default=0)
    if any(r.tokens for r in results):
        arrays = {name: _padded([r.tokens.get(name) for r in results],
                                lambda a, n: (n, n), n_max)
                  for name in ("self", "fixed_input", "fixed_output")}
        np.savez(folder / "token_coupling.npz", prompt_ids=ids,
                 n_tokens=np.array([r.n_tokens for r in results]),
                 token_layers=np.array([r.meta.get("token_layers", [0, 0]) for r in results]),
                 **arrays)
    if any(r.pca is not None for r in results):
        proj = _padded([r.pca for r in results], lambda a, n: (a.shape[0], n, a.shape[2]), n_max)
        np.savez(folder / "pca.npz", prompt_ids=ids, projections=proj,
                 n_tokens=np.array([r.n_tokens for r in results]))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


@dataclass
class ScanResult:
    """A finished scan read back from its directory."""

    out_dir: Path
    manifest: dict
    summary: pd.DataFrame
    layers: pd.DataFrame
    depth: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    pca: dict = field(default_factory=dict)

    @property
    def mean_mis_coupling(self) -> float:
        return float(self.summary["depth_mis_coupling_mean"].mean())

    def __repr__(self):
        m = self.manifest.get("model", {})
        return (f"ScanResult({self.out_dir}, model={m.get('id')}, prompts={len(self.summary)}, "
                f"mean m~={self.mean_mis_coupling:.4f})")


def read_scan_output(out_dir) -> ScanResult:
    out = Path(out_dir)
    if not (out / MANIFEST).exists():
        raise OutputDirError(f"{out} holds no finished scan (no {MANIFEST}): run `coupling scan --out {out}` first")
    manifest = json.loads((out / MANIFEST).read_text())
    load = lambda name: dict(np.load(out / name, allow_pickle=False)) if (out / name).exists() else {}  # noqa: E731
    return ScanResult(out, manifest, pd.read_parquet(out / "summary.parquet"),
                      pd.read_parquet(out / "layers.parquet"), load("depth_coupling.npz"),
                      load("token_coupling.npz"), load("pca.npz"))
