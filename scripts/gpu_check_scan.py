"""GPU check, step ``scan``: one prompt of the Llama-7B-shaped model through
``analyze_prompt`` (``measures=("depth",)``) at K = 10 and 50, ``svd="exact"`` and
``svd="auto"``; each variant probed on one layer first and run only when its estimate fits."""
from __future__ import annotations

from pathlib import Path

from gpu_check_common import KS, Ctx, peak_memory, timed, write_table
from gpu_check_model import build_llama


def step_scan(ctx: Ctx):
    """The exact-SVD route first (cheap on a GPU), then the default ``svd="auto"`` (at
    d > 2048: ARPACK on the matrix-free one-token operator), each probed on one layer and run
    in full only when its estimate fits the time left."""
    from coupling.model.trajectory import run_forward

    lm, ids, minfo = build_llama(ctx)
    timed(lambda: run_forward(lm, ids), ctx.device)                  # warm-up
    fwd_s, rec = timed(lambda: run_forward(lm, ids), ctx.device)
    table = _ScanTable(ctx, minfo, fwd_s)
    for svd in ("exact", "auto"):
        est = {k: _probe(ctx, lm, rec, k, svd, fwd_s) for k in KS}
        for k in sorted(KS, key=est.get):
            table.add(_scan_variant(ctx, lm, ids, k, svd, est[k], minfo))
    for k in KS:     # both routes are exact: same Jacobians, different top-K algorithm
        a, b = table.grids.get(f"K{k}_auto"), table.grids.get(f"K{k}_exact")
        if a is not None and b is not None:
            table.row(k, "auto")["rel_diff_vs_exact"] = _rel_mean(a, b)
    table.write()
    if not any(r["status"] == "ok" for r in table.rows):
        raise RuntimeError("no scan variant fitted the time budget (scan.md has the estimates)")


class _ScanTable:
    def __init__(self, ctx, minfo, fwd_s):
        self.ctx, self.minfo, self.fwd_s = ctx, minfo, fwd_s
        self.rows, self.grids = [], {}

    def add(self, row_grid):
        row, grid = row_grid
        self.rows.append(row)
        if grid is not None:
            self.grids[f"K{row['K']}_{row['svd']}"] = grid
            _save_grids(self.ctx.out / "scan_grids.npz", self.grids)
        self.write()

    def row(self, k, svd):
        return next(r for r in self.rows if r["K"] == k and r["svd"] == svd)

    def write(self):
        write_table(self.ctx.out, "scan", self.rows, _scan_title(self.ctx, self.minfo),
                    _scan_note(self.fwd_s))


def _probe(ctx, lm, rec, k, svd, fwd_s) -> float:
    """Estimated seconds of the whole scan: forward + L x the time of layer 1."""
    from coupling.analysis.steps import layer_jacobians, layer_svds, norm_kind
    from coupling.settings.scan_settings import ScanSettings

    s = ScanSettings(k=k, svd=svd, measures=("depth",))
    kind, t = norm_kind(lm.model), rec.n_tokens - 1
    sec, _ = timed(lambda: layer_svds(layer_jacobians(rec, [1], t, s, lm.model, kind), s),
                   ctx.device)
    est = fwd_s + rec.n_layers * sec
    ctx.log(f"probe K={k} svd={svd}: layer 1 {sec:.2f}s -> estimated {est:.1f}s for "
            f"{rec.n_layers} layers")
    return est


def _scan_variant(ctx, lm, ids, k, svd, estimate, minfo):
    """``(row, grid)``: one ``analyze_prompt`` call, or a row saying why it was not run."""
    from coupling.analysis.prompt import analyze_prompt
    from coupling.settings.scan_settings import ScanSettings
    from coupling.spectrum.svd import resolve_method

    L, n, d = ctx.shape["layers"], ctx.shape["n"], ctx.shape["d"]
    dense = resolve_method(svd, d, k, ctx.device) == "exact"
    route = ("dense one-token J + " + ("full SVD" if svd == "exact" else "auto top-K")) if dense \
        else "ARPACK on the one-token operator (matrix-free)"
    row = {"L": L, "d": d, "n": n, "K": k, "svd": svd, "route": route, "estimate_s": estimate}
    if estimate * 1.3 + 5 > ctx.left():
        row.update(status="not run: estimate exceeds the time left", seconds=None)
        ctx.log(f"scan K={k} svd={svd}: not run (estimated {estimate:.1f}s, "
                f"{ctx.left():.0f}s left)")
        return row, None
    s = ScanSettings(k=k, svd=svd, measures=("depth",))
    box = {}
    with peak_memory(ctx.device, box):
        sec, res = timed(lambda: analyze_prompt(lm, ids, s), ctx.device)
    funcs = getattr(res, "jacobian_functions", {}).get("depth", {})
    one_tok = sum(1 for v in funcs.values() if v and v[0] == "one-token")
    row.update(status="ok", seconds=sec, forward_s=res.timings.get("forward"),
               depth_s=res.timings.get("depth"),
               mean_mis_coupling=res.summary["depth_mis_coupling_mean"],
               peak_gb=box["peak_gb"], weights_gb=minfo["weights_gb"],
               one_token_layers=f"{one_tok}/{L}" if funcs else "n/a")
    ctx.log(f"scan K={k} svd={svd}: {sec:.2f}s, mean m~ {row['mean_mis_coupling']:.6f}, "
            f"peak {_gb(box['peak_gb'])}, one-token layers {row['one_token_layers']}")
    grid = res.depth_normalized
    del res
    _free(ctx.device)
    return row, grid


def _scan_title(ctx, minfo):
    return (f"Depth-wise scan of one prompt (analyze_prompt, measures=depth): random Llama, "
            f"{ctx.shape['layers']} layers, d={ctx.shape['d']}, GQA {ctx.shape['heads']}/"
            f"{ctx.shape['kv_heads']}, {ctx.dtype} weights, n={ctx.shape['n']}, {ctx.device}")


def _scan_note(fwd_s):
    return (f"seconds: the whole analyze_prompt call (forward included; the model forward alone "
            f"took {fwd_s:.3f}s warm). estimate_s: forward + L x the first layer's time. "
            "peak_gb: torch.cuda.max_memory_allocated during the call (weights included).")


def _gb(x):
    return "n/a" if x is None else f"{x:.1f} GiB"


def _rel_mean(a, b) -> float:
    from coupling.measures.coupling_scores import mean_off_diagonal

    ma, mb = mean_off_diagonal(a), mean_off_diagonal(b)
    return abs(ma - mb) / abs(mb)


def _save_grids(path: Path, grids: dict):
    import numpy as np

    np.savez(path, **grids)


def _free(device):
    """Hand freed device memory back, so the next run's peak is its own."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
