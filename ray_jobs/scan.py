"""Distributed scan driver: many models x prompts on a Ray cluster.

    python -m ray_jobs.scan --config configs/ray_example.yaml [--address ADDR] [--out DIR]
    coupling scan --ray [ADDR] ...          # same, from the local scan's flags

Steps: validate the config and every model (config, tokenizer, prompts, K) before touching
the cluster; connect; plan shards (``shard_size`` prompts each) and, per model, a placement
(``ray_jobs.placement``); skip shards already finished in ``OUT`` (resume); run the rest on
replica actors or on a pipeline of stage actors; write each finished shard atomically; reduce
every model into ``OUT/<model-key>/`` (the local scan's layout) and ``OUT/models.parquet``.

Progress goes to stderr: shards done/total, prompts/s, ETA.

This module is the driver loop and the command line; the steps live in ``connect``
(joining the cluster), ``planning`` (checks, shard plan, placement), ``replicas`` and
``pipeline`` (the two runners, over ``launch``'s actor helpers), ``progress`` and ``reduce``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from coupling.errors import first_line
from ray_jobs.config import RayScanConfig, parse_config
from ray_jobs.connect import check_address, connect
from ray_jobs.pipeline import _run_stages
from ray_jobs.planning import _check_job, _dry_run, _placement, _plan, _print_plan
from ray_jobs.progress import Progress
from ray_jobs.replicas import ReplicaPool, _run_replicas

# The public API.
__all__ = ["run_scan", "run_from_cli", "main", "build_parser", "print_report"]
PROG = "ray_jobs.scan"


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------
def run_scan(cfg: RayScanConfig, progress: bool = True, dry_run: bool = False,
             workers: dict | None = None) -> dict:
    """Run every job of ``cfg``; returns a report (per model: placement, shards computed /
    skipped, actor info, timings) and writes ``OUT`` (see the module docstring).

    ``workers``: actor classes by role, ``{"replica": ReplicaWorker, "stage": StageWorker}``
    by default; a caller may pass subclasses (the tests' crashing workers do).

    The placement plan of every model is printed (stdout) before any actor starts;
    ``dry_run`` prints only the plan: no actor, nothing written."""
    from coupling.results.owned import MARKER
    from coupling.results.store import ShardStore, plan_shards
    from coupling.scan import package_versions
    from ray_jobs.actors import ReplicaWorker, StageWorker
    from ray_jobs.models import inspect_model
    from ray_jobs.output import SHARDS_DIR, Output

    opts = cfg.options
    check_address(opts.address)
    t_start = time.perf_counter()
    facts = {job.key: inspect_model(job) for job in cfg.jobs}      # all validation first
    for job in cfg.jobs:
        _check_job(job, facts[job.key])
    if dry_run:
        return _dry_run(cfg, facts)
    output = Output(cfg.out, opts.staging_dir)
    workers = {"replica": ReplicaWorker, "stage": StageWorker, **(workers or {})}
    try:
        output.prepare(cfg.overwrite)
    except BaseException:
        output.close()
        raise
    started = connect(opts.address)
    report = {"out": cfg.out, "models": {}}
    pool = ReplicaPool(opts, workers["replica"])
    try:
        _write_report(output, cfg, package_versions(), report)
        work = []
        for job in cfg.jobs:
            f = facts[job.key]
            shards = plan_shards(f.prompts, f.token_ids, opts.shard_size)
            store = ShardStore(output.local / SHARDS_DIR / job.key)
            store.check_plan(_plan(job, f, shards))
            for name in ("plan.json", MARKER):       # a driver elsewhere resumes from the URI
                output.push(f"{SHARDS_DIR}/{job.key}/{name}")
            store.clean_partial()
            done = store.done(shards)
            todo = [s for s in shards if s.index not in done]
            placement = _placement(job, f, todo, opts) if todo else None
            work.append((job, f, shards, store, done, todo, placement))
        if progress:
            for job, f, shards, store, done, todo, placement in work:
                _print_plan(job, f, placement, len(shards) - len(todo))
        rows = []
        for job, f, shards, store, done, todo, placement in work:
            rep = {"shards_total": len(shards), "shards_skipped": len(done),
                   "shards_computed": 0, "prompts_computed": 0,
                   "placement": placement.to_dict() if placement else None}
            report["models"][job.key] = rep
            if todo:
                prog = Progress(job.key, shards, done, quiet=not progress)
                t0 = time.perf_counter()

                def on_shard(shard, results, failures=(), store=store, prog=prog, rep=rep):
                    path = store.write(shard, results, failures)
                    output.push(path.relative_to(output.local).as_posix())
                    rep["shards_computed"] += 1
                    rep["prompts_computed"] += len(shard)
                    prog.shard(shard)

                if placement.kind == "replicas":
                    _run_replicas(job, f, placement, todo, opts, pool, on_shard, rep, prog)
                else:
                    pool.close()
                    _run_stages(job, f, placement, todo, opts, workers["stage"], on_shard,
                                rep, prog)
                rep["seconds"] = time.perf_counter() - t0
                rep["prompts_per_s"] = prog.rate
            results, failures = store.read_all_with_failures(shards)
            rows.append(_reduce(job, f, results, failures, output, rep))
        from ray_jobs.reduce import write_models_table
        write_models_table(output.local, rows)
        output.push("models.parquet")
        report["seconds"] = time.perf_counter() - t_start
        report["table"] = rows
        _write_report(output, cfg, package_versions(), report)
        return report
    finally:
        pool.close()
        output.close()
        if started:
            import ray
            ray.shutdown()


# ------------------------------------------------------------------------------------------
# Reduce
# ------------------------------------------------------------------------------------------
def _reduce(job, f, results, failures, output, rep) -> dict:
    """``OUT/<key>/`` of one model; its failed prompts (resumed shards' included) are counted
    in ``rep`` and listed in its ``failures.json``."""
    from coupling.scan import PromptFailed
    from ray_jobs.reduce import model_row, write_model_output

    rep["prompts_failed"], rep["prompts_total"] = len(failures), len(results) + len(failures)
    rep["failures_file"] = f"{job.scan.out}/failures.json"
    if not results:
        first = failures[0]
        raise PromptFailed(f"all {len(failures)} prompts of {job.key} failed (first: "
                           f"{first['prompt_id']}: {first['error']})")

    timings = {"per_prompt_s": (rep.get("seconds", 0) / rep["prompts_computed"])
               if rep.get("prompts_computed") else None,
               "analysis_s": rep.get("seconds"), "prompts_per_s": rep.get("prompts_per_s")}
    ray_info = {"key": job.key, **{k: v for k, v in rep.items()
                                   if k not in ("actors", "failures_file")}}
    folder = write_model_output(output.local / job.key, job, f.info, results, timings, ray_info,
                                failures)
    output.push(job.key)
    import pandas as pd
    return model_row(job, f.info, pd.read_parquet(folder / "summary.parquet"))


def _write_report(output, cfg, versions, report):
    from coupling.results.owned import atomic_write
    from ray_jobs.output import REPORT

    data = {"format": "coupling-ray-scan/1", "out": cfg.out, "config": cfg.raw,
            "models": [j.key for j in cfg.jobs], "versions": versions, "report": report,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(output.local / REPORT, json.dumps(data, indent=2, default=str).encode())
    output.push(REPORT)


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML: models, prompts, settings, Ray options")
    p.add_argument("--address", help="Ray cluster (host:port, ray://host:port, auto); default: "
                                     "$RAY_ADDRESS, else a new local cluster")
    p.add_argument("--out", help="output folder or cloud URI (s3://, gs://); overrides the config")
    p.add_argument("--placement", choices=["auto", "replicas", "stages"])
    p.add_argument("--stages", type=int, help="force block-range placement with N stages")
    p.add_argument("--replicas", type=int, help="force replica placement with N actors")
    p.add_argument("--shard-size", type=int, dest="shard_size")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="delete a previous run in --out instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="no plan and no progress lines")
    p.add_argument("--dry-run", action="store_true", dest="dry_run",
                   help="print the placement plan only: no actor starts, nothing is written")
    return p


def main(argv=None, workers: dict | None = None) -> int:
    """The module CLI; ``workers``: actor classes for :func:`run_scan` (default ones)."""
    args = build_parser().parse_args(argv)
    try:
        from coupling.scan import load_config_file

        data = load_config_file(args.config)
        overrides = {k: getattr(args, k) for k in ("placement", "stages", "replicas",
                                                    "shard_size", "overwrite")}
        cfg = parse_config(data, out=args.out, address=args.address, overrides=overrides)
        report = run_scan(cfg, progress=not args.quiet, dry_run=args.dry_run, workers=workers)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished shards are kept, rerun to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
        if os.environ.get("COUPLING_DEBUG"):
            raise
        print(f"{PROG}: error: {first_line(e)}", file=sys.stderr)
        return 2
    if not report.get("dry_run"):
        print_report(report)
        return exit_code(report)
    return 0


def run_from_cli(config_dict: dict, address: str | None = None, dry_run: bool = False) -> int:
    """``coupling scan --ray [ADDRESS] [--dry-run]``: the local scan's flat config, run on Ray.

    One model and a local ``--out``: ``OUT`` gets exactly the local scan's layout.  The
    distributed scan's own root (shards for resuming, report) lives beside it in
    ``OUT.ray/`` while it runs, as the local scan's ``OUT.partial/`` does, and is removed once
    ``OUT`` is in place; rerunning the same command after a crash resumes from it.  Several
    models or a URI: the distributed layout (``OUT/<model-key>/``, ``models.parquet``).

    Errors propagate as ValueError/RuntimeError; the ``coupling`` CLI prints them in one line.
    """
    data = dict(config_dict)
    final = data.get("out")
    flat = bool(final) and "://" not in str(final) and "models" not in data
    if flat:
        from coupling.results.scan_output import check_output_dir

        check_output_dir(final, bool(data.get("overwrite")))   # before any work
        data["out"] = str(final).rstrip("/") + ".ray"
        data["overwrite"] = False     # --overwrite is about OUT; the work folder resumes
    cfg = parse_config(data, address=address)
    flat = flat and len(cfg.jobs) == 1
    report = run_scan(cfg, dry_run=dry_run)
    if report.get("dry_run"):
        return 0
    if flat:
        report["out"] = str(_move_single_result(cfg, Path(final)))
        for rep in report["models"].values():
            rep["failures_file"] = str(Path(final) / "failures.json")
    print_report(report)
    return exit_code(report)


def _move_single_result(cfg, final: Path) -> Path:
    """``OUT.ray/<key>/`` -> ``OUT`` (atomic, replacing only a scan output), then the work
    folder's own files removed."""
    from coupling.results.owned import LocalTree, remove_owned, replace_dir

    work = Path(cfg.out)
    replace_dir(work / cfg.jobs[0].key, final)
    left = remove_owned(LocalTree(work), kinds=("ray",), strict=False)
    if not left and work.exists():
        shutil.rmtree(work, ignore_errors=True)    # only empty folders are left
    return final


def print_report(report: dict):
    import pandas as pd

    table = pd.DataFrame(report["table"])
    for key, rep in report["models"].items():
        p = rep.get("placement") or {}
        how = f"{p.get('kind')} x{p.get('n_actors')}" if p else "all shards already done"
        rate = f", {rep['prompts_per_s']:.2f} prompts/s" if rep.get("prompts_per_s") else ""
        print(f"{key}: {how}; shards computed {rep['shards_computed']}, skipped "
              f"{rep['shards_skipped']} of {rep['shards_total']}{rate}")
        if rep.get("prompts_failed"):
            print(f"{key}: failed {rep['prompts_failed']} of {rep['prompts_total']} prompts "
                  f"(listed in {rep['failures_file']})")
    cols = ["model", "revision", "mis_coupling_mean", "mis_coupling_raw_mean", "lss_mean",
            "n_prompts"]
    print(table[cols].to_string(index=False))
    print("mis_coupling_mean: normalized mis-coupling m~ (Eq. 14; coupling = 1 - m~), "
          "mis_coupling_raw_mean: raw m (Eq. 13), means over prompts of l != l'")
    print(f"results in {report['out']}")


def exit_code(report: dict) -> int:
    """3 when the scan finished but some prompts failed (as the local scan), else 0."""
    return 3 if any(r.get("prompts_failed") for r in report["models"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
