"""The scan output directory: stable file names, atomic writes, reading back.

Layout (README, "Output directory")::

    manifest.json         config, model id/revision/hash, package versions, timings
    summary.parquet       one row per prompt
    layers.parquet        one row per prompt x layer (0..L); sv_1..sv_K, sv_next, sv_gap,
                          sv_gap_undetermined, svd_fallback for layers 1..L
    depth_coupling.npz    normalized, raw: (P, L, L); singular_values: (P, L, K); prompt_ids
    token_coupling.npz    self, fixed_input, fixed_output: (P, n_max, n_max), nan-padded
    pca.npz               projections: (P, L+1, n_max, 2), nan-padded; n_tokens
    failures.json         prompts that failed: prompt_id, layer (when known), error
    figures/              drawn by ``coupling report`` (and at the end of a scan)
    .coupling-scan        the marker: this folder is a scan output, and the files written

The whole directory is written under a temporary name beside the target and renamed into
place, so an interrupted scan never leaves a half-written result.  ``overwrite`` replaces
only a folder that carries the marker and nothing else (``coupling.results.owned``): the old one is
moved aside, the new one renamed in, the old one's own files removed.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from coupling.results.owned import (LocalTree, check_replaceable, replace_dir, root_kind,
                                    write_marker)

MANIFEST = "manifest.json"
FAILURES = "failures.json"


class OutputDirError(ValueError):
    pass


def check_output_dir(out_dir, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``out_dir`` cannot receive a result."""
    out = Path(out_dir)
    if out.is_file():
        raise OutputDirError(f"--out {out} is a file: pass a directory path")
    if out.exists() and any(out.iterdir()):
        if (out / MANIFEST).exists() and not overwrite:
            raise OutputDirError(f"{out} already holds a finished scan: choose another --out, "
                                 "or pass --overwrite to replace it")
        if root_kind(LocalTree(out)) != "scan":
            raise OutputDirError(f"{out} exists, is not empty and is not a coupling scan "
                                 "output: choose an empty or new --out")
        check_replaceable(LocalTree(out), kinds=("scan",))
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".coupling-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise OutputDirError(f"cannot write to {parent} ({e.strerror}): choose a writable --out") from None
    return out


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
            _spectral_columns(df, r, sv[:, -1])
        if getattr(r, "deflation", None):     # --deflate-ln: what was removed, and the checks
            from coupling.spectrum.deflation import \
                layer_columns  # (imports torch: only when needed)
            df = df.assign(**layer_columns(r.deflation, len(df) - 1))
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _spectral_columns(df: pd.DataFrame, r, sv_k: np.ndarray):
    """``sv_next`` (s_{K+1}), ``sv_gap`` (s_K / s_{K+1}), and the per-layer flags
    ``sv_gap_undetermined`` (top-K subspace not determined at the Jacobian's precision,
    ``coupling.spectrum.spectral_gap``) and ``svd_fallback`` (ARPACK fell back to the dense SVD);
    layer 0 (no Jacobian) is nan / <NA>."""
    nxt = np.full(len(df), np.nan)
    if r.next_singular_values is not None:
        nxt[1:1 + len(r.next_singular_values)] = r.next_singular_values
    df["sv_next"] = nxt
    with np.errstate(divide="ignore", invalid="ignore"):
        df["sv_gap"] = sv_k / nxt
    for name, col in (("undetermined", "sv_gap_undetermined"), ("svd_fallback", "svd_fallback")):
        flags = (r.spectral_flags or {}).get(name)
        values = [pd.NA] * len(df)
        if flags is not None:
            values[1:1 + len(flags)] = [bool(f) for f in flags]
        df[col] = pd.array(values, dtype="boolean")


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


def write_scan_output(out_dir, manifest: dict, results, overwrite: bool = False,
                      failures=()) -> Path:
    """Write every file into a temporary sibling directory, then swap it into place."""
    out = check_output_dir(out_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.resolve().parent))
    try:
        _write_files(tmp, manifest, results, failures)
        written = [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()]
        write_marker(tmp, "scan", written)
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # our own fresh mkdtemp folder
        raise
    return out


def _write_files(folder: Path, manifest: dict, results, failures=()):
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
    (folder / FAILURES).write_text(json.dumps({"failures": list(failures)}, indent=1,
                                              default=_json_default))
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
    failures: list = field(default_factory=list)   # {prompt_id, layer, error} per failed prompt

    @property
    def mean_mis_coupling(self) -> float:
        return float(self.summary["depth_mis_coupling_mean"].mean())

    def __repr__(self):
        m = self.manifest.get("model", {})
        return (f"ScanResult({self.out_dir}, model={m.get('id')}, prompts={len(self.summary)}, "
                f"mean m~={self.mean_mis_coupling:.4f})")


def reliability_lines(result: ScanResult) -> list[str]:
    """Summary lines on how far the depth-wise numbers can be trusted: layers whose top-K
    subspace is undetermined at the Jacobian's precision (always shown when measured), grid
    entries left out of the means as nan and ARPACK fall-backs (shown when there are any)."""
    s, lines = result.summary, []
    if "depth_undetermined_layers" in s:
        bad = s["depth_undetermined_layers"].fillna(0)
        if bad.sum() == 0:
            gap = result.layers["sv_gap"] if "sv_gap" in result.layers else pd.Series(dtype=float)
            low = f" (smallest s_K/s_K+1 {gap.min():.4f})" if gap.notna().any() else ""
            lines.append(f"top-K gap  every layer's top-K subspace fixed to < 0.01 rad at float32{low}")
        else:
            where = ""
            if "sv_gap_undetermined" in result.layers:
                flagged = result.layers[result.layers["sv_gap_undetermined"].fillna(False)]
                where = f" (layers {', '.join(str(l) for l in sorted(set(flagged['layer'])))})"
            lines.append(f"top-K gap  UNDETERMINED: {int(bad.sum())} layer(s) in {int((bad > 0).sum())}"
                         f"/{len(s)} prompts{where} have s_K ~ s_K+1 within round-off; their "
                         "coupling is arbitrary (layers.parquet: sv_gap_undetermined)")
    if "depth_nan_entries" in s and s["depth_nan_entries"].fillna(0).sum() > 0:
        nan = s["depth_nan_entries"].fillna(0)
        lines.append(f"nan entries  {int(nan.sum())} off-diagonal grid entries in "
                     f"{int((nan > 0).sum())}/{len(s)} prompts left out of the means "
                     "(summary.parquet: depth_nan_entries)")
    if "depth_svd_fallbacks" in s and s["depth_svd_fallbacks"].fillna(0).sum() > 0:
        fb = s["depth_svd_fallbacks"].fillna(0)
        lines.append(f"SVD          ARPACK did not converge on {int(fb.sum())} layer(s) in "
                     f"{int((fb > 0).sum())} prompts: dense SVD used (layers.parquet: svd_fallback)")
    return lines


def read_scan_output(out_dir) -> ScanResult:
    out = Path(out_dir)
    if not (out / MANIFEST).exists():
        raise OutputDirError(f"{out} holds no finished scan (no {MANIFEST}): run `coupling scan --out {out}` first")
    manifest = json.loads((out / MANIFEST).read_text())
    load = lambda name: dict(np.load(out / name, allow_pickle=False)) if (out / name).exists() else {}  # noqa: E731
    failures = json.loads((out / FAILURES).read_text())["failures"] \
        if (out / FAILURES).exists() else []
    return ScanResult(out, manifest, pd.read_parquet(out / "summary.parquet"),
                      pd.read_parquet(out / "layers.parquet"), load("depth_coupling.npz"),
                      load("token_coupling.npz"), load("pca.npz"), failures)
