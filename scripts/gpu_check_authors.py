"""GPU check, step ``authors``: the authors' method (d VJPs through the block on the whole
prompt, full SVD) on a few layers, timed and extrapolated to all layers, against the fast path
on the same layers; and dense SVD vs ARPACK on a real Jacobian of the first of them."""
from __future__ import annotations

from gpu_check_common import KS, Ctx, timed, write_table
from gpu_check_model import build_llama
from gpu_check_svd import svd_note, svd_rows


def step_authors(ctx: Ctx):
    from coupling.model.trajectory import run_forward
    from coupling.settings.scan_settings import ScanSettings

    lm, ids, _ = build_llama(ctx)
    L, kmax = ctx.shape["layers"], max(KS)
    timed(lambda: run_forward(lm, ids), ctx.device)                   # warm-up
    fwd_s, rec = timed(lambda: run_forward(lm, ids), ctx.device)
    layers = [1, L // 2 + 1][:ctx.shape["authors_layers"]]     # the first and a middle block
    paths = {"fast": ScanSettings(k=kmax, svd="exact", jacobian="local", measures=("depth",)),
             "full": ScanSettings(k=kmax, svd="exact", jacobian="full", measures=("depth",))}
    J, S, secs = _authors_layers(ctx, lm, rec, layers, paths)
    done = [l for l in layers if ("full", l) in J]
    if not done:
        raise RuntimeError("no layer of the authors' method fitted the time budget")
    _extrapolate(ctx, secs, done, fwd_s)
    cmp = _compare_paths(J, S, done)
    write_table(ctx.out, "authors_compare", cmp,
                f"Fast path vs authors' method on layers {done} (same prompt, same SVD)")
    for r in cmp:
        ctx.log(f"compare {r['what']} layer {r['layer']}: rel diff {r['rel_diff']:.2e}")
    _real_j_svd(ctx, J[("fast", done[0])], done[0])


def _authors_layers(ctx, lm, rec, layers, paths):
    """Per path and layer: the Jacobian, its SVD and the seconds both took (fast path first;
    a full-path layer is skipped when the slowest one so far would not fit the time left)."""
    from coupling.analysis.steps import norm_kind

    kind, t = norm_kind(lm.model), rec.n_tokens - 1
    timed(lambda: _one_layer(rec, layers[0], t, paths["fast"], lm.model, kind), ctx.device)
    J, S, secs, rows = {}, {}, {"fast": {}, "full": {}}, []
    for path, s in paths.items():
        for l in layers:
            if path == "full" and secs["full"] and \
                    max(secs["full"].values()) * 1.3 + 10 > ctx.left():
                ctx.log(f"authors: layer {l} skipped (time budget)")
                continue
            sec, (jac, svd) = timed(lambda: _one_layer(rec, l, t, s, lm.model, kind), ctx.device)
            J[(path, l)], S[(path, l)], secs[path][l] = jac, svd, sec
            rows.append({"path": path, "layer": l, "seconds": sec, "what": _what(path)})
            ctx.log(f"authors: {path} layer {l}: {sec:.2f}s")
            write_table(ctx.out, "authors_layers", rows,
                        "Per-layer time (Jacobian + full SVD; fast path warmed up on one layer)")
    return J, S, secs


def _extrapolate(ctx, secs, done, fwd_s):
    L = ctx.shape["layers"]
    rows = []
    for path in ("fast", "full"):
        mean = sum(secs[path][l] for l in done) / len(done)
        rows.append({"path": path, "what": _what(path), "layers_measured": len(done),
                     "per_layer_s": mean, "forward_s": fwd_s, "L": L,
                     "total_s": fwd_s + L * mean,
                     "label": f"extrapolated from {len(done)} layer(s) to {L}"})
    rows[0]["speedup_vs_full"] = rows[1]["total_s"] / rows[0]["total_s"]
    write_table(ctx.out, "authors_extrapolated", rows,
                f"Authors' method vs fast path: EXTRAPOLATED from {len(done)} layer(s) to {L} "
                f"(n={ctx.shape['n']}, d={ctx.shape['d']}, {ctx.device})",
                "total_s = forward + L x the mean measured per-layer time (the L x L coupling "
                "products, one per layer, are not included).")


def _compare_paths(J, S, done) -> list[dict]:
    """Fast against full: the Jacobians, the singular values, the mis-coupling between layers."""
    from coupling.measures.coupling_grids import pairwise_coupling

    cmp = []
    for l in done:
        a, b = J[("fast", l)], J[("full", l)]
        cmp.append({"what": "J^l_tt", "layer": l, "rel_diff": float((a - b).norm() / b.norm()),
                    "note": "‖J_fast − J_full‖_F / ‖J_full‖_F"})
        sa, sb = S[("fast", l)].S.double(), S[("full", l)].S.double()
        cmp.append({"what": f"top-{len(sb)} singular values", "layer": l,
                    "rel_diff": float(((sa - sb).abs() / sb).max()), "note": "max relative"})
    if len(done) < 2:
        return cmp
    for k in KS:
        m = {p: pairwise_coupling([J[(p, l)] for l in done],
                                  [S[(p, l)].truncate(k).as_tuple() for l in done], k=k,
                                  variants=("normalized",))["normalized"] for p in ("fast", "full")}
        for i, li in enumerate(done):
            for j, lj in enumerate(done):
                if i != j:
                    f, r = m["fast"][i, j], m["full"][i, j]
                    cmp.append({"what": f"mis-coupling m~ K={k}", "layer": f"{li} vs {lj}",
                                "fast": f, "full": r, "rel_diff": abs(f - r) / abs(r)})
    return cmp


def _one_layer(rec, l, t, settings, model, kind):
    from coupling.analysis.steps import layer_jacobians, layer_svds

    jac = layer_jacobians(rec, [l], t, settings, model, kind)
    return jac[l], layer_svds(jac, settings)[l]


def _what(path):
    return ("authors: jacobian=full (d VJPs on the whole prompt) + full SVD" if path == "full"
            else "fast: jacobian=local (d one-token VJPs) + full SVD")


def _real_j_svd(ctx: Ctx, J, layer):
    """Dense SVD vs ARPACK on a real one-token Jacobian (its spectrum, not a random one)."""
    rows = []
    for r in svd_rows(ctx, J, f"real J^{layer}_tt of the scan model"):
        rows.append(r)
        write_table(ctx.out, "svd_real_j", rows, f"Top-K of a real J (d={J.shape[0]})",
                    svd_note(ctx))
