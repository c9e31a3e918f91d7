"""GPU check, step ``svd``: dense ``torch.linalg.svd`` on the device against ARPACK on the
dense matrix (CPU, and with products on the device), the measurement
``coupling.spectrum.svd.full_svd_pays`` lacks for accelerators."""
from __future__ import annotations

from gpu_check_common import KS, Ctx, timed, write_table


def step_svd(ctx: Ctx):
    import torch

    rows, last = [], {}
    for d in ctx.shape["svd_d"]:
        gen = torch.Generator().manual_seed(d)
        A = (torch.randn(d, d, generator=gen) / d ** 0.5).to(ctx.device)
        for r in svd_rows(ctx, A, "Gaussian / sqrt(d)", last):
            rows.append(r)
            write_table(ctx.out, "svd", rows, "Top-K of a dense d x d matrix: full SVD vs ARPACK",
                        svd_note(ctx))
        del A
    if not rows:
        raise RuntimeError("no SVD size fitted the time budget")


def svd_note(ctx):
    return (f"full_svd_s: torch.linalg.svd on {ctx.device} "
            "(coupling.spectrum.svd.svd_of_dense; one per d, any K). arpack_cpu_s: "
            "coupling.spectrum.svd._lanczos on the matrix on the CPU (what dense_top_k does on "
            "CPU). arpack_dev_s: the same with products on the device. rule_device / rule_cpu: what"
            " full_svd_pays(d, K, device) picks. sv_rel_diff: max relative difference of the top-K "
            "singular values. arpack_fallback: why ARPACK handed over to the dense SVD (not "
            "converged), if it did.")


def svd_rows(ctx: Ctx, A, matrix: str, last: dict | None = None):
    """Rows ``d, K, times...`` for the matrix ``A`` (on the device); skips a measurement whose
    estimate from the previous size (``last``: d^3 for the SVD, d^2 for ARPACK) does not fit."""
    import torch

    from coupling.jacobian.linop import as_operator
    from coupling.spectrum.svd import _lanczos, full_svd_pays, svd_of_dense

    last = {} if last is None else last
    d, dev = A.shape[0], ctx.device
    on_dev = torch.device(dev).type != "cpu"
    timed(lambda: svd_of_dense(A[:64, :64], 8), dev)               # solver warm-up
    full_s = _maybe(ctx, last, "full", d, 3, lambda: svd_of_dense(A, max(KS)))
    A_cpu = A.cpu()
    for k in KS:
        arp = _maybe(ctx, last, f"cpu{k}", d, 2, lambda: _lanczos(as_operator(A_cpu), k, 0))
        arp_dev = _maybe(ctx, last, f"dev{k}", d, 2, lambda: _lanczos(as_operator(A), k, 0)) \
            if on_dev else (None, None)
        times = {"full SVD": full_s[0], "ARPACK cpu": arp[0], "ARPACK device": arp_dev[0]}
        known = {m: s for m, s in times.items() if s is not None}
        diff = None
        if full_s[1] is not None and arp[1] is not None:
            ref = full_s[1].S[:k].double().cpu()
            diff = float(((arp[1].S.double().cpu() - ref).abs() / ref).max())
        row = {"matrix": matrix, "d": d, "K": k, "device": dev, "full_svd_s": full_s[0],
               "arpack_cpu_s": arp[0], "arpack_dev_s": arp_dev[0],
               "fastest": min(known, key=known.get) if known else "n/a",
               "rule_device": "full SVD" if full_svd_pays(d, k, dev) else "ARPACK",
               "rule_cpu": "full SVD" if full_svd_pays(d, k, "cpu") else "ARPACK",
               "sv_rel_diff": diff,
               "arpack_fallback": "; ".join(f for f in (_fallback(arp), _fallback(arp_dev)) if f)}
        ctx.log(f"svd {matrix} d={d} K={k}: full {_s(full_s[0])}, ARPACK cpu {_s(arp[0])}, "
                f"ARPACK device {_s(arp_dev[0])}; rule picks {row['rule_device']}; "
                f"s.v. diff {'n/a' if diff is None else f'{diff:.1e}'}")
        yield row


def _fallback(timed_result) -> str:
    """Why ARPACK handed over to the dense SVD (``SVDResult.fallback``), or ''."""
    res = timed_result[1]
    return str(getattr(res, "fallback", None) or "") if res is not None else ""


def _maybe(ctx, last, key, d, power, fn):
    """``(seconds, result)``, or ``(None, None)`` if the estimate scaled from the previous size
    does not fit the time left."""
    if key in last:
        d0, s0 = last[key]
        if s0 * (d / d0) ** power * 1.5 + 3 > ctx.left():
            ctx.log(f"  {key} at d={d} skipped: estimated {s0 * (d / d0) ** power:.1f}s")
            return None, None
    sec, out = timed(fn, ctx.device)
    last[key] = (d, sec)
    return sec, out


def _s(x):
    return "skipped" if x is None else f"{x:.3f}s"
