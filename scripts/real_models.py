#!/usr/bin/env python3
"""The paper's real-model results on a real pretrained LLM, trained against random init, and
block pruning of that LLM (issue #20; written up in docs/real_models.md).

    python3 scripts/real_models.py prompts OUT        # scan prompts + held-out text provenance
    python3 scripts/real_models.py prune --model M --scan SCAN --out OUT
    python3 scripts/real_models.py compare --trained T --random R --out OUT [--france-trained
        FT --france-random FR --model M]

``prompts`` writes the prompt file the scans read (``coupling scan --prompts``); ``prune``
removes blocks in the study's four orders (``coupling.experiments.study.pruning``) and
measures held-out perplexity and the study's multiple-choice benchmark on held-out prose
(``real_models_text.py``: Python's Language Reference, split by topic from the prompts);
``compare`` writes the trained-vs-random tables (seeded paired bootstrap over prompts) and
the figures. Every step reuses the library; nothing here computes a coupling itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_models_text as text  # noqa: E402

from coupling.experiments.prompt_analysis import analyze_prompts, prompt_analysis_figure  # noqa: E402
from coupling.experiments.study.lm_eval import (build_multiple_choice, heldout_metrics,  # noqa: E402
                                                multiple_choice_accuracy)
from coupling.experiments.study.pruning import (angular_distance, neighbour_coupling,  # noqa: E402
                                                pruning_curves, pruning_orders,
                                                single_block_losses)
from coupling.experiments.study.study_figures import fig_pruning, fig_single_block  # noqa: E402
from coupling.experiments.study.study_stats import (markdown_table, pruning_summary,  # noqa: E402
                                                    single_block_summary)
from coupling.figures.common import save_figure  # noqa: E402
from coupling.figures.depth import depth_coupling_figure  # noqa: E402
from coupling.figures.layers import LAYER_PANELS, layer_curves_figure, layer_matrix  # noqa: E402
from coupling.figures.pca import pca_figure  # noqa: E402
from coupling.figures.scans import load_scan  # noqa: E402
from coupling.figures.tokens import token_coupling_figure  # noqa: E402
from coupling.measures.regularity import expodistance  # noqa: E402
from coupling.model.loading import load_model  # noqa: E402
from coupling.prompts.sources import load_prompts  # noqa: E402
from coupling.scan import tokenize_all  # noqa: E402

SUMMARY_MEASURES = ("depth_mis_coupling_mean", "depth_mis_coupling_raw_mean", "lss",
                    "lss_last", "expodistance", "expodistance_last", "expodistance_last_no_final",
                    "expodistance_last_interior",
                    "equidistance_cv")


# ------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------
def cmd_prompts(args) -> int:
    prompts, heldout = text.split()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text.write_prompts(out / "pydoc_prompts.jsonl", prompts)
    (out / "text_provenance.json").write_text(json.dumps(text.provenance(prompts, heldout),
                                                         indent=1) + "\n")
    print(f"{len(prompts)} prompts -> {out / 'pydoc_prompts.jsonl'}")
    return 0


# ------------------------------------------------------------------------------------------
# prune
# ------------------------------------------------------------------------------------------
def calibration_windows(lm, args, scan=None) -> list[torch.Tensor]:
    """The calibration prompts (the angular distance's), tokenized as the scan does; the
    scan's prompts and these must begin alike (``--prompt-seed`` shuffles before the cut), so
    that with ``--max-prompts N --coupling-prompts N`` both signals see the same N prompts."""
    prompts = load_prompts(args.prompts, args.max_prompts, args.prompt_seed)
    ids = [str(p) for p in scan.summary["prompt_id"]] if scan is not None else []
    n = min(len(ids), len(prompts))
    if [p.id for p in prompts[:n]] != ids[:n]:
        raise ValueError(f"the prompts of scan {scan.out_dir} do not begin as --prompts "
                         f"{args.prompts} (seed {args.prompt_seed}) does: pass the scan's own "
                         "--prompts and --prompt-seed")
    return [t[0] for t in tokenize_all(lm, prompts, args.max_tokens)]


def evaluators(lm, args):
    """``(perplexity eval, multiple-choice eval, description)`` on the held-out prose."""
    _, heldout = text.split()
    ids, eos = text.heldout_stream(lm.tokenizer, heldout)
    stream = torch.tensor(ids)
    mc = build_multiple_choice(stream.numpy(), args.mc_items, args.mc_context, args.mc_cont,
                               seed=0, boundary_id=eos)
    loss = lambda m: heldout_metrics(m, stream, args.seq_len, args.windows)["eval_loss"]  # noqa: E731
    acc = lambda m: multiple_choice_accuracy(m, mc)  # noqa: E731
    info = {"heldout_tokens": len(ids), "ppl_tokens": args.seq_len * args.windows,
            "mc_items": args.mc_items, "mc_context": args.mc_context, "mc_cont": args.mc_cont,
            "mc_choices": mc.n_choices}
    return loss, acc, info


def cmd_prune(args) -> int:
    lm = load_model(args.model)
    scan = load_scan(args.scan) if args.scan else None
    if scan is None and any(o.startswith("coupling") for o in args.orders):
        raise ValueError("the coupling orders need the trained scan: pass --scan DIR")
    windows = calibration_windows(lm, args, scan)
    grids = scan.depth["normalized"][:args.coupling_prompts] if scan else None
    prune(args, lm, windows, grids)
    return 0


def prune(args, lm, windows, normalized) -> None:
    """Signals (neighbour coupling from ``normalized``, angular distance on ``windows``),
    orders, and the perplexity and multiple-choice curves, written to ``args.out``."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ang = angular_distance(lm.model, windows, batch_size=1)
    nb = neighbour_coupling(normalized) if normalized is not None else np.full(len(ang), np.nan)
    pd.DataFrame({"block": range(len(nb)), "neighbour_coupling": nb,
                  "angular_distance": ang}).to_csv(out / "signals.csv", index=False)
    loss, acc, info = evaluators(lm, args)
    if args.single:
        single_block(args, lm, loss, nb, ang, info)
        return
    orders = pruning_orders(nb, ang, n_random=args.random_reps, seed=args.random_seed)
    orders = {k: v for k, v in orders.items() if k in args.orders}
    info["orders"] = orders
    (out / "eval.json").write_text(json.dumps(info, indent=1) + "\n")
    for name, fn, n_max in (("ppl", loss, args.max_removed), ("mc", acc, args.mc_max_removed)):
        timed = _timed(fn)
        curves = pruning_curves(lm.model, orders, timed, n_max)
        # CPU seconds per evaluation (one set of removed blocks), every thread's
        info[f"{name}_evals"], info[f"{name}_cpu_s_per_eval"] = timed.n, timed.cpu / max(timed.n, 1)
        (out / "eval.json").write_text(json.dumps(info, indent=1) + "\n")
        curves.insert(0, "model", Path(args.model).name)
        # runs with different --random-seed hold different permutations: number them apart
        curves.loc[curves["order"] == "random", "rep"] += args.random_seed * args.random_reps
        if name == "ppl":
            curves["ppl"] = np.exp(curves["eval_loss"])
        else:
            curves = curves.rename(columns={"eval_loss": "mc_acc", "loss_increase": "mc_change"})
        curves.to_csv(out / f"pruning_{name}.csv", index=False)
        print(f"pruning_{name}.csv: {len(curves)} rows", flush=True)


def single_block(args, lm, loss, nb, ang, info) -> None:
    """Held-out loss increase with each block removed alone (the study's single-block test),
    with the block's two signals: ``pruning_single.csv``."""
    timed = _timed(loss)
    losses = single_block_losses(lm.model, timed)
    base = timed(lm.model)
    pd.DataFrame({"model": Path(args.model).name, "block": range(len(nb)),
                  "loss_increase": losses - base, "neighbour_coupling": nb,
                  "angular_distance": ang}).to_csv(Path(args.out) / "pruning_single.csv",
                                                   index=False)
    info["ppl_evals"], info["ppl_cpu_s_per_eval"] = timed.n, timed.cpu / max(timed.n, 1)
    (Path(args.out) / "eval.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"pruning_single.csv: {len(nb)} blocks", flush=True)


def _timed(fn):
    """``fn`` counting its calls (``.n``) and their CPU seconds (``.cpu``)."""
    def wrapped(*a, **kw):
        c = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            wrapped.n += 1
            wrapped.cpu += time.process_time() - c
    wrapped.n, wrapped.cpu = 0, 0.0
    return wrapped


def pruning_tables(dirs, out: Path) -> list[str]:
    """Summary tables and the figure from one or more ``prune`` outputs (orders may be split
    over several runs: the rows are concatenated, the base row kept once)."""
    lines = []
    singles = [Path(d) / "pruning_single.csv" for d in dirs
               if (Path(d) / "pruning_single.csv").exists()]
    if singles:
        single = pd.concat([pd.read_csv(f) for f in singles])
        summary = single_block_summary(single)
        summary.to_csv(out / "single_block_summary.csv", index=False)
        save_figure(fig_single_block(single), out / "pruning_single.png")
        lines += ["single_block_summary.csv:", markdown_table(summary, ".3g"), ""]
    dirs = [d for d in dirs if (Path(d) / "pruning_ppl.csv").exists()]
    if not dirs:
        return lines
    ppl = pd.concat([pd.read_csv(Path(d) / "pruning_ppl.csv") for d in dirs])
    mc = pd.concat([pd.read_csv(Path(d) / "pruning_mc.csv") for d in dirs])
    for df, col, ns in ((ppl, "loss_increase", (1, 2, 3, 4)), (mc, "mc_change", (1, 2, 3, 4))):
        summary = pruning_summary(df.rename(columns={col: "loss_increase"}), n_removed=ns)
        if col == "mc_change":   # a larger accuracy is better: rank by the largest change
            summary["rank"] = summary["mean_increase"].rank(ascending=False, method="min")
            summary["best"] = summary["rank"] == 1
        name = "pruning_summary_ppl.csv" if col == "loss_increase" else "pruning_summary_mc.csv"
        summary.to_csv(out / name, index=False)
        lines += [f"{name}:", markdown_table(summary, ".3f"), ""]
    ppl = ppl.drop_duplicates(["order", "rep", "n_removed"])
    save_figure(fig_pruning(ppl), out / "pruning.png")
    return lines


# ------------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------------
def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict:
    """Means of ``a`` and ``b`` and of ``a - b`` with percentile 95% intervals, resampling the
    prompts (pairs) with replacement ``n_boot`` times (``numpy.random.default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    row = {"n_prompts": len(a)}
    for name, v in (("trained", a), ("random", b), ("diff", a - b)):
        boot = v[idx].mean(axis=1)
        row[name] = float(v.mean())
        row[f"{name}_lo"], row[f"{name}_hi"] = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    row["diff_p_boot"] = float(2 * min((a - b)[idx].mean(1).__ge__(0).mean(),
                                       (a - b)[idx].mean(1).__le__(0).mean()))
    return row


def interior_expodistance(scan, layers: slice = slice(1, -1)) -> pd.Series:
    """The last token's ED over blocks 2..L-1 only, per prompt: without the embedding's jump
    into block 1 and the final norm's drop at L, which dominate ED in a trained Llama (the
    norms are the scan's ``norm`` column; ED of a 1-D trajectory is ED of its norms).
    ``layers=slice(0, -1)`` leaves out the final norm's step alone."""
    M = layer_matrix(scan.layers, "norm")                  # (P, L+1), layer 0 = embedding
    ids = list(dict.fromkeys(scan.layers["prompt_id"]))
    return pd.Series([expodistance(row[layers, None]) for row in M], index=ids)


def trained_vs_random(trained, random, n_boot: int, seed: int) -> pd.DataFrame:
    """One row per summary measure: paired over the prompts both scans finished."""
    tables = []
    for scan in (trained, random):
        t = scan.summary.set_index("prompt_id")
        t["expodistance_last_no_final"] = interior_expodistance(scan, slice(0, -1))
        t["expodistance_last_interior"] = interior_expodistance(scan)
        tables.append(t.reset_index())
    both = tables[0].merge(tables[1], on="prompt_id", suffixes=("_t", "_r"))
    rows = []
    for m in SUMMARY_MEASURES:
        ok = both[[f"{m}_t", f"{m}_r"]].dropna()
        rows.append({"measure": m, **paired_bootstrap(ok[f"{m}_t"].to_numpy(float),
                                                      ok[f"{m}_r"].to_numpy(float), n_boot, seed)})
    return pd.DataFrame(rows)


def layer_table(scans: dict) -> pd.DataFrame:
    """Mean over prompts of every Fig. 24 curve, per layer and model."""
    rows = []
    for name, scan in scans.items():
        for col, *_ in LAYER_PANELS:
            M = layer_matrix(scan.layers, col)
            with warnings.catch_warnings():   # windowed LSS is NaN at the edges
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(M, axis=0) if M.size else []
            rows += [{"model": name, "measure": col, "layer": l, "mean": v}
                     for l, v in enumerate(mean)]
    return pd.DataFrame(rows).pivot_table(index=["measure", "layer"], columns="model",
                                          values="mean").reset_index()


def prompt_length_figures(scans: dict, out: Path) -> pd.DataFrame:
    """Fig. 10: m~ against prompt length, one figure per model, and the fits."""
    rows = []
    for name, scan in scans.items():
        res = analyze_prompts(scan.summary)
        save_figure(prompt_analysis_figure(res, f"{name}: m~ vs prompt length "
                                                f"({res.n_prompts} prompts)"),
                    out / f"fig10_prompt_length_{name}.png")
        fit = res.fits.get("n_tokens")
        if fit is None:
            raise ValueError(f"no fit of m~ against prompt length for {name}: "
                             f"{res.notes.get('n_tokens')}")
        rows.append({"model": name, "n": fit.n, "slope_per_token": fit.slope, "r": fit.r,
                     "r2": fit.r2, "p": fit.p})
    return pd.DataFrame(rows)


def pca_ranges_figure(args, prompt_text: str, ranges=((0, 10), (10, 20), (20, 30))):
    """Fig. 17: PCA of the trajectories within shallow, middle and deep layer ranges (each
    range's PCA fitted on its own last layer), trained and random init."""
    from matplotlib.figure import Figure

    from coupling.measures.regularity import pca_projection
    from coupling.model.trajectory import trajectories

    fig = Figure(figsize=(4.2 * len(ranges), 7.6), layout="constrained")
    axes = fig.subplots(2, len(ranges), squeeze=False)
    for r, random_init in enumerate((False, True)):
        lm = load_model(args.model, random_init=random_init, seed=0)
        ids = lm.tokenizer(prompt_text, return_tensors="pt")["input_ids"]
        X = trajectories(lm, {"input_ids": ids}).numpy()
        for ax, (lo, hi) in zip(axes[r], ranges):
            P = pca_projection(X, 2, layers=slice(lo, hi + 1)).projections   # (layers, n, 2)
            for i in range(P.shape[1]):
                last = i == P.shape[1] - 1
                ax.plot(P[:, i, 0], P[:, i, 1], "-o", ms=2, lw=2.2 if last else 0.9,
                        color="black" if last else f"C{i % 10}", alpha=1 if last else 0.7)
            ax.set_title(f"{'random init' if random_init else 'trained'}: layers {lo}-{hi}",
                         fontsize=10)
            ax.grid(alpha=0.3)
    fig.suptitle(f"PCA of token trajectories by layer range, {prompt_text!r} (last token black)")
    return fig


def france_figures(args, out: Path) -> None:
    """Figs. 3, 4, 16 from the one-prompt scans with token-wise coupling; Fig. 17 from the
    model itself (a forward pass each)."""
    ft, fr = load_scan(args.france_trained), load_scan(args.france_random)
    save_figure(depth_coupling_figure([ft, fr], layers=(9, 16)), out / "fig3_depth_9_16.png")
    save_figure(depth_coupling_figure([ft, fr]), out / "fig3_depth_all.png")
    for name, scan in (("trained", ft), ("random", fr)):
        save_figure(token_coupling_figure(scan, 0), out / f"fig4_tokens_{name}.png")
        save_figure(pca_figure(scan, 0), out / f"fig16_pca_{name}.png")
    rows = []
    for name, scan in (("trained", ft), ("random", fr)):
        grid = np.asarray(scan.depth["normalized"][0], float)[8:16, 8:16]
        off = grid[~np.eye(8, dtype=bool)]
        tok = {k: np.asarray(scan.tokens[k][0], float) for k in ("self", "fixed_input",
                                                                "fixed_output")}
        rows.append({"model": name, "blocks_9_16_mean_m": off.mean(),
                     "all_blocks_mean_m": float(scan.summary["depth_mis_coupling_mean"][0]),
                     **{f"tokens_{k}_mean_m": np.nanmean(v[~np.eye(len(v), dtype=bool)])
                        for k, v in tok.items()}})
    pd.DataFrame(rows).to_csv(out / "france.csv", index=False)
    if args.model:
        prompt = load_prompts(ft.manifest["config"]["prompts"], 1)[0].text
        save_figure(pca_ranges_figure(args, prompt), out / "fig17_pca_ranges.png")


def cmd_compare(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    if args.trained and args.random:
        lines += trained_random_outputs(args, out)
    if args.france_trained and args.france_random:
        france_figures(args, out)
        lines += ["france.csv:", markdown_table(pd.read_csv(out / "france.csv"), ".3f"), ""]
    if args.pruning:
        lines += pruning_tables(args.pruning, out)
    print("\n".join(lines))
    return 0


def trained_random_outputs(args, out: Path) -> list[str]:
    """Trained-vs-random table with bootstrap intervals, Fig. 24 and Fig. 10."""
    scans = {"trained": load_scan(args.trained), "random": load_scan(args.random)}
    tvr = trained_vs_random(scans["trained"], scans["random"], args.n_boot, seed=0)
    tvr.to_csv(out / "trained_vs_random.csv", index=False)
    layer_table(scans).to_csv(out / "fig24_layers.csv", index=False)
    save_figure(layer_curves_figure(list(scans.values())), out / "fig24_layer_curves.png")
    fits = prompt_length_figures(scans, out)
    fits.to_csv(out / "fig10_prompt_length.csv", index=False)
    return ["trained_vs_random.csv:", markdown_table(tvr, ".4g"), "",
            "fig10_prompt_length.csv:", markdown_table(fits, ".3g"), ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prompts", help="write the scan prompts (JSONL) and text provenance")
    pr.add_argument("out")
    pp = sub.add_parser("prune", help="block pruning in the study's four orders")
    pp.add_argument("--model", required=True)
    pp.add_argument("--scan", help="trained scan of these prompts: the coupling orders")
    pp.add_argument("--coupling-prompts", type=int,
                    help="coupling orders from the scan's first N prompts only (default all)")
    pp.add_argument("--out", required=True)
    pp.add_argument("--prompts", required=True, help="calibration prompts (the scan's)")
    pp.add_argument("--max-prompts", type=int)
    pp.add_argument("--prompt-seed", type=int)
    pp.add_argument("--max-tokens", type=int)
    pp.add_argument("--orders", nargs="+", default=["coupling-most", "coupling-least",
                                                    "angular", "random"])
    pp.add_argument("--random-reps", type=int, default=1)
    pp.add_argument("--random-seed", type=int, default=0)
    pp.add_argument("--max-removed", type=int, default=2)
    pp.add_argument("--mc-max-removed", type=int, default=1)
    pp.add_argument("--seq-len", type=int, default=256)
    pp.add_argument("--windows", type=int, default=4)
    pp.add_argument("--mc-items", type=int, default=50)
    pp.add_argument("--mc-context", type=int, default=32)
    pp.add_argument("--mc-cont", type=int, default=8)
    pp.add_argument("--threads", type=int, default=1)
    pp.add_argument("--single", action="store_true",
                    help="instead of the orders: each block removed alone (held-out loss), "
                         "pruning_single.csv")
    pc = sub.add_parser("compare", help="trained-vs-random tables and figures")
    pc.add_argument("--trained", help="scan of the trained model")
    pc.add_argument("--random", help="the same scan at random init")
    pc.add_argument("--out", required=True)
    pc.add_argument("--france-trained")
    pc.add_argument("--france-random")
    pc.add_argument("--model", help="model for the layer-range PCA (Fig. 17)")
    pc.add_argument("--pruning", nargs="*", help="prune output folders to tabulate")
    pc.add_argument("--n-boot", type=int, default=10000)
    args = p.parse_args(argv)
    return {"prompts": cmd_prompts, "prune": cmd_prune, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
