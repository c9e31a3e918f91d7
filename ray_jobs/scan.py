"""Distributed scan driver: many models x prompts on a Ray cluster.

    python -m ray_jobs.scan --config configs/ray_example.yaml [--address ADDR] [--out DIR]
    coupling scan --ray [ADDR] ...          # same, from the local scan's flags

Steps: validate the config and every model (config, tokenizer, prompts, K) before touching
the cluster; connect; plan shards (``shard_size`` prompts each) and, per model, a placement
(``ray_jobs.placement``); skip shards already finished in ``OUT`` (resume); run the rest on
replica actors or on a pipeline of stage actors; write each finished shard atomically; reduce
every model into ``OUT/<model-key>/`` (the local scan's layout) and ``OUT/models.parquet``.

Progress goes to stderr: shards done/total, prompts/s, ETA.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import shutil
import sys
from pathlib import Path
import time
from collections import deque
from urllib.parse import urlparse

from .config import RayScanConfig, parse_config

PROG = "ray_jobs.scan"


# ------------------------------------------------------------------------------------------
# Connecting
# ------------------------------------------------------------------------------------------
def ray_env():
    """Loopback-only, no telemetry, no token auth (the project's Ray rules)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def check_address(address: str | None, timeout: float = 3.0):
    """Fail in seconds, with one line, when an explicit address does not answer."""
    if address in (None, "", "local", "auto"):
        return
    if address.startswith(("http://", "https://")):
        raise ValueError(f"--address {address} is a dashboard (job API) URL: give the cluster's "
                         "GCS address host:6379 (or ray://host:10001), or submit with "
                         "`ray job submit` which sets it for the job")
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise ValueError(f"--address {address!r} is not host:port (e.g. 127.0.0.1:6379)")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}): start one "
                         "with `ray start --head` or `ray up cluster.yaml`, or fix --address") \
            from None


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (None: $RAY_ADDRESS or a new local one on 127.0.0.1).

    Returns True when this call initialised Ray (the caller then shuts it down).
    """
    import ray

    ray_env()
    check_address(address)
    if ray.is_initialized():
        return False
    if address in (None, "", "local") and not (address is None and os.environ.get("RAY_ADDRESS")):
        # address="local": always a new cluster, never one a `ray start` left on this machine
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    else:
        ray.init(address=None if address in (None, "") else address, log_to_driver=False)
    return True


# ------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, key: str, shards, done_before: set, quiet: bool = False):
        self.key, self.quiet = key, quiet
        self.total = len(shards)
        self.done = len(done_before)
        self.prompts_total = sum(len(s) for s in shards)
        self.prompts_done = sum(len(s) for s in shards if s.index in done_before)
        self.computed = 0
        self.t0 = time.perf_counter()

    def start(self):
        self.t0 = time.perf_counter()
        self.line("started")

    def shard(self, shard):
        self.done += 1
        self.prompts_done += len(shard)
        self.computed += len(shard)
        self.line(shard.name)

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.computed / dt if dt > 0 else 0.0

    def line(self, what: str):
        if self.quiet:
            return
        left = self.prompts_total - self.prompts_done
        eta = f"{left / self.rate:.0f}s" if self.rate > 0 else "?"
        print(f"[{self.key}] {what}: shards {self.done}/{self.total}  prompts "
              f"{self.prompts_done}/{self.prompts_total}  {self.rate:.2f} prompts/s  ETA {eta}",
              file=sys.stderr, flush=True)


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
    from coupling.scan import package_versions

    from coupling.store import ShardStore, plan_shards

    from .actors import ReplicaWorker, StageWorker
    from .models import inspect_model
    from .output import MARKER, SHARDS_DIR, Output

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

                def on_shard(shard, results, store=store, prog=prog, rep=rep):
                    path = store.write(shard, results)
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
            results = store.read_all(shards)
            rows.append(_reduce(job, f, results, output, rep))
        from .reduce import write_models_table
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


def _check_job(job, f):
    forced_stages = job.placement == "stages" or job.stages is not None
    if forced_stages and job.scan.random_init:
        raise ValueError(f"model {job.source}: random_init cannot use block-range stages (each "
                         "stage would have to draw the whole model): save the random model with "
                         "coupling.zoo.save_random and scan that folder")
    if job.stages is not None and job.stages > f.sizes.n_layers:
        raise ValueError(f"model {job.source}: stages={job.stages} is more than its "
                         f"{f.sizes.n_layers} blocks")


def _plan(job, f, shards) -> dict:
    scan = {k: v for k, v in job.scan.to_dict().items()
            if k not in ("out", "overwrite", "figures", "threads", "fail_fast")}
    return {"model": job.key, "scan": scan, "shards": [s.prompt_ids for s in shards]}


def _placement(job, f, todo, opts):
    from .placement import cluster_nodes, plan_placement
    from .stage import token_layers

    nodes = cluster_nodes(opts.gpu_memory_gb, opts.autoscaler_config)
    p = plan_placement(f.sizes, job.scan.settings, f.max_tokens, nodes,
                       placement=job.placement, stages=job.stages, replicas=job.replicas,
                       n_shards=len(todo), cpus_per_actor=opts.cpus_per_actor,
                       gpus_per_actor=opts.gpus_per_actor,
                       node_memory_gb=opts.node_memory_gb, model_name=job.source)
    if p.kind == "replicas" and p.gpus:
        p = _with_device_map(job, f, todo, opts, nodes, p)
    s = job.scan.settings
    if p.kind == "stages":
        if job.scan.random_init:
            raise ValueError(f"model {job.source} (random_init) does not fit one node: save "
                             "it with coupling.zoo.save_random and scan the folder")
        if "tokens" in s.measures:
            l, lp = token_layers(s, f.sizes.n_layers)
            if not any(lo < l <= hi and lo < lp <= hi for lo, hi in p.ranges):
                raise ValueError(f"token-wise coupling layers ({l}, {lp}) fall on different "
                                 f"stages {p.ranges}: set token_layers inside one stage, drop "
                                 "'tokens' from measures, or use placement 'replicas'")
    return p


def _with_device_map(job, f, todo, opts, nodes, p):
    """GPU replicas: Accelerate's map of one copy over its GPUs (on the weightless skeleton),
    with the GPUs it really needs -- its greedy fill can need one more than the planner's
    block partition; then the plan is redone with that many GPUs per replica."""
    from .placement import plan_placement, replica_device_map
    from .weights import build_skeleton

    skeleton = build_skeleton(f.config, job.scan.dtype, job.scan.trust_remote_code)
    most = int(max((n.gpus for n in nodes), default=0))
    g, dmap = replica_device_map(skeleton, p.gpu_budget, int(p.gpus), max(most, int(p.gpus)))
    if g != p.gpus:
        p = plan_placement(f.sizes, job.scan.settings, f.max_tokens, nodes,
                           placement=job.placement, replicas=job.replicas,
                           n_shards=len(todo), cpus_per_actor=opts.cpus_per_actor,
                           gpus_per_actor=g, node_memory_gb=opts.node_memory_gb,
                           model_name=job.source)
    p.device_map = dmap
    return p


def _print_plan(job, f, placement, n_done: int):
    from .placement import format_plan

    if placement is None:
        print(f"plan {job.key}: nothing to do ({n_done} shard(s) already finished)", flush=True)
    else:
        print(format_plan(job.key, placement, f.sizes), flush=True)


def _dry_run(cfg, facts) -> dict:
    """Connect, plan every model for all its shards, print the plans; start no actor and
    write nothing (a resumed run would only plan its unfinished shards)."""
    from coupling.store import plan_shards

    opts = cfg.options
    started = connect(opts.address)
    report = {"out": cfg.out, "dry_run": True, "models": {}}
    try:
        for job in cfg.jobs:
            f = facts[job.key]
            shards = plan_shards(f.prompts, f.token_ids, opts.shard_size)
            placement = _placement(job, f, shards, opts)
            _print_plan(job, f, placement, 0)
            report["models"][job.key] = {"shards_total": len(shards),
                                         "placement": placement.to_dict()}
    finally:
        if started:
            import ray
            ray.shutdown()
    return report


def _threads(job, f, opts) -> int:
    if job.scan.threads:
        return int(job.scan.threads)
    return 1 if (f.info.get("d_model") or 0) <= 256 else max(1, int(opts.cpus_per_actor))


def _actor_options(placement, opts) -> dict:
    o = dict(num_cpus=placement.cpus, num_gpus=placement.gpus,
             max_restarts=opts.max_restarts, max_task_retries=opts.max_task_retries)
    if placement.memory:
        o["memory"] = int(placement.memory)
    return o


def _wait_ready(actors, timeout, what) -> list:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return ray.get([a.ready.remote() for a in actors], timeout=timeout)
    except GetTimeoutError:
        raise RuntimeError(f"{what} did not start within {timeout:.0f}s: the cluster lacks the "
                           "resources asked (see `ray status`)") from None
    except RayActorError as e:
        raise RuntimeError(f"{what} failed to start: {_first_line(e)}") from None


def _first_line(e) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error:" in ln]
    return (errs[-1] if errs else lines[-1] if lines else type(e).__name__).strip()


def _raise_task_error(e):
    """A RayTaskError carries the actor's exception: re-raise that (one-line CLI error)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, (ValueError, FloatingPointError)):
        raise cause
    raise RuntimeError(_first_line(e)) from None


# ------------------------------------------------------------------------------------------
# Replicas: an actor pool, whole shards per task
# ------------------------------------------------------------------------------------------
class ReplicaPool:
    """Replica actors kept across consecutive models of the same shape.

    Starting an actor (a fresh Python importing torch and transformers) costs seconds; a
    scan of many checkpoints of one size would pay it per model.  The pool is reused when
    the next model asks the same CPUs/GPUs/threads and no more memory; each ``run`` task
    names its model and a worker (re)loads when it changes (also after a restart).
    """

    def __init__(self, opts, worker_cls):
        self.opts, self.worker_cls = opts, worker_cls
        self.actors, self.shape = [], None

    def get(self, placement, threads: int) -> list:
        import ray

        shape = (placement.cpus, placement.gpus, threads)
        if self.actors and (self.shape[:3] != shape or placement.memory > self.shape[3]):
            self.close()
        if not self.actors:
            self.shape = shape + (placement.memory,)
        Worker = ray.remote(self.worker_cls)
        opts = _actor_options(placement, self.opts)
        if self.shape[3]:
            opts["memory"] = int(self.shape[3])
        while len(self.actors) < placement.n_actors:
            self.actors.append(Worker.options(**opts).remote(threads, placement.gpus > 0))
        for extra in self.actors[placement.n_actors:]:
            ray.kill(extra)
        del self.actors[placement.n_actors:]
        return list(self.actors)

    def close(self):
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _model_spec(job) -> dict:
    sc = job.scan
    return dict(source=job.source, revision=sc.revision, dtype=sc.dtype,
                random_init=sc.random_init, init_seed=sc.init_seed,
                trust_remote_code=sc.trust_remote_code, settings=sc.settings)


def _run_replicas(job, f, placement, todo, opts, pool, on_shard, rep, prog):
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    actors = pool.get(placement, _threads(job, f, opts))
    spec = _model_spec(job)
    if placement.device_map:        # GPU replicas load exactly the map the plan printed
        spec["device_map"] = placement.device_map
    what = f"{placement.n_actors} replica(s) of {job.source}"
    try:
        rep["actors"] = ray.get([a.prepare.remote(spec) for a in actors],
                                timeout=opts.placement_timeout_s)
    except GetTimeoutError:
        raise RuntimeError(f"{what} did not start within {opts.placement_timeout_s:.0f}s: the "
                           "cluster lacks the resources asked (see `ray status`)") from None
    except RayTaskError as e:
        _raise_task_error(e)
    except RayActorError as e:
        raise RuntimeError(f"{what} failed to start: {_first_line(e)}") from None
    prog.start()
    queue, pending, alive = deque(todo), {}, set(range(len(actors)))
    rep["actor_failures"] = 0

    def submit(i):
        if queue:
            shard = queue.popleft()
            pending[actors[i].run.remote(spec, shard)] = (shard, i)

    def load(i):
        return sum(v[1] == i for v in pending.values())

    for i in range(len(actors)):           # two shards per actor: one running, one queued
        submit(i)
        submit(i)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        shard, i = pending.pop(ready[0])
        try:
            results = ray.get(ready[0])
        except RayTaskError as e:
            _raise_task_error(e)
        except RayActorError:
            # died beyond its restarts (Ray already retried): the shard goes back in the queue
            rep["actor_failures"] += 1
            alive.discard(i)
            queue.appendleft(shard)
            if not alive:
                raise RuntimeError(f"every replica of {job.source} died: rerun the same "
                                   "command to resume (finished shards are kept)") from None
        else:
            on_shard(shard, results)
        for j in sorted(alive, key=load):
            while load(j) < 2 and queue:
                submit(j)


# ------------------------------------------------------------------------------------------
# Stages: a pipeline of block-range actors
# ------------------------------------------------------------------------------------------
def _run_stages(job, f, placement, todo, opts, worker_cls, on_shard, rep, prog):
    import ray
    import torch
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    sc, S = job.scan, placement.n_actors
    bundle = {"CPU": placement.cpus}
    if placement.gpus:
        bundle["GPU"] = placement.gpus
    if placement.memory:
        bundle["memory"] = int(placement.memory)
    pg = placement_group([dict(bundle) for _ in range(S)], strategy="PACK")
    Worker = ray.remote(worker_cls)
    actors = []
    try:
        try:
            ray.get(pg.ready(), timeout=opts.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the cluster could not reserve {S} stage(s) of {bundle} for "
                               f"{job.source} within {opts.placement_timeout_s:.0f}s "
                               "(see `ray status`)") from None
        for s, (lo, hi) in enumerate(placement.ranges):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=s)
            actors.append(Worker.options(**_actor_options(placement, opts),
                                         scheduling_strategy=strategy).remote(
                job.source, sc.revision, f.config, lo, hi, sc.dtype, sc.settings, sc.block_path,
                sc.trust_remote_code, _threads(job, f, opts), placement.gpus > 0))
        rep["actors"] = _wait_ready(actors, opts.placement_timeout_s,
                                    f"{S} stage(s) of {job.source}")
        prog.start()
        _pipeline(actors, todo, sc.settings, opts.max_in_flight or 2, S, on_shard, torch)
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)


def _pipeline(actors, todo, settings, max_in_flight, lookahead, on_shard, torch):
    """Feed prompts through the stages; several prompts are in the pipe at once.

    Submission order per actor is execution order, so ``forward``/``decompose`` of the next
    ``lookahead`` prompts are queued before a prompt's ``couple`` (which waits for every
    stage's factors): stage s works on prompt p while stage s+1 works on prompt p-1.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from .stage import assemble

    S = len(actors)
    front, inflight = deque(), deque()
    buffers = {s.index: [None] * len(s) for s in todo}
    by_index = {s.index: s for s in todo}

    def submit_front(shard, pos):
        key = f"{shard.index}:{pos}"
        x = torch.tensor([shard.token_ids[pos]])
        xs, trajs, facs = [], [], []
        for a in actors:
            xs.append(x)
            x, traj = a.forward.options(num_returns=2).remote(key, x)
            facs.append(a.decompose.remote(key, xs[-1]))
            trajs.append(traj)
        front.append((shard, pos, key, xs, trajs, facs))

    def submit_couple():
        shard, pos, key, xs, trajs, facs = front.popleft()
        pid, meta = shard.prompt_ids[pos], shard.metas[pos]
        last = "regularity" in settings.measures      # only then the last stage needs X^0..X^L
        refs = [a.couple.remote(key, xs[s], pid, meta, S, *facs,
                                *(trajs if s == S - 1 and last else []))
                for s, a in enumerate(actors)]
        inflight.append((shard, pos, refs))

    def finish_oldest():
        shard, pos, refs = inflight.popleft()
        try:
            parts = ray.get(refs)
        except RayTaskError as e:
            _raise_task_error(e)
        except RayActorError as e:
            raise RuntimeError(f"a stage actor died beyond its restarts ({_first_line(e)}): "
                               "rerun the same command to resume (finished shards are kept)") \
                from None
        n = len(shard.token_ids[pos])
        reg = next((p["regularity"] for p in parts if p["regularity"] is not None), None)
        tok = next((p["tokens"] for p in parts if p["tokens"] is not None), None)
        rows = [p["rows"] for p in parts] if parts[0]["rows"] is not None else []
        buffers[shard.index][pos] = assemble(shard.prompt_ids[pos], n, shard.metas[pos], rows,
                                             reg, tok, settings)
        if all(r is not None for r in buffers[shard.index]):
            on_shard(by_index[shard.index], buffers.pop(shard.index))

    for shard in todo:
        for pos in range(len(shard)):
            submit_front(shard, pos)
            if len(front) > lookahead:
                submit_couple()
            while len(inflight) > max_in_flight:
                finish_oldest()
    while front:
        submit_couple()
    while inflight:
        finish_oldest()


# ------------------------------------------------------------------------------------------
# Reduce
# ------------------------------------------------------------------------------------------
def _reduce(job, f, results, output, rep) -> dict:
    from .reduce import model_row, write_model_output

    timings = {"per_prompt_s": (rep.get("seconds", 0) / rep["prompts_computed"])
               if rep.get("prompts_computed") else None,
               "analysis_s": rep.get("seconds"), "prompts_per_s": rep.get("prompts_per_s")}
    ray_info = {"key": job.key, **{k: v for k, v in rep.items() if k != "actors"}}
    folder = write_model_output(output.local / job.key, job, f.info, results, timings, ray_info)
    output.push(job.key)
    import pandas as pd
    return model_row(job, f.info, pd.read_parquet(folder / "summary.parquet"))


def _write_report(output, cfg, versions, report):
    from coupling.owned import atomic_write

    from .output import REPORT

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
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if not report.get("dry_run"):
        print_report(report)
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
        from coupling.results import check_output_dir

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
    print_report(report)
    return 0


def _move_single_result(cfg, final: Path) -> Path:
    """``OUT.ray/<key>/`` -> ``OUT`` (atomic, replacing only a scan output), then the work
    folder's own files removed."""
    from coupling.owned import LocalTree, remove_owned, replace_dir

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
    cols = ["model", "revision", "coupling_mean", "coupling_raw_mean", "lss_mean", "n_prompts"]
    print(table[cols].to_string(index=False))
    print(f"results in {report['out']}")


def _one_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
