"""Per-model planning glue of the distributed scan: checks a job, fingerprints its shard plan
(for resuming), asks ``ray_jobs.placement`` for a placement (with the replicas' GPU device
map) and prints it; ``--dry-run`` stops here."""
from __future__ import annotations

from ray_jobs.connect import connect


def _check_job(job, f):
    forced_stages = job.placement == "stages" or job.stages is not None
    if forced_stages and job.scan.random_init:
        raise ValueError(f"model {job.source}: random_init cannot use block-range stages (each "
                         "stage would have to draw the whole model): save the random model with "
                         "coupling.model.zoo.save_random and scan that folder")
    if job.stages is not None and job.stages > f.sizes.n_layers:
        raise ValueError(f"model {job.source}: stages={job.stages} is more than its "
                         f"{f.sizes.n_layers} blocks")


def _plan(job, f, shards) -> dict:
    scan = {k: v for k, v in job.scan.to_dict().items()
            if k not in ("out", "overwrite", "figures", "threads", "fail_fast")}
    return {"model": job.key, "scan": scan, "shards": [s.prompt_ids for s in shards]}


def _placement(job, f, todo, opts):
    from coupling.analysis.steps import token_layers
    from ray_jobs.placement import cluster_nodes, plan_placement

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
                             "it with coupling.model.zoo.save_random and scan the folder")
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
    from ray_jobs.placement import plan_placement
    from ray_jobs.sizing import replica_device_map
    from coupling.model.weights import build_skeleton

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
    from ray_jobs.placement import format_plan

    if placement is None:
        print(f"plan {job.key}: nothing to do ({n_done} shard(s) already finished)", flush=True)
    else:
        print(format_plan(job.key, placement, f.sizes), flush=True)


def _dry_run(cfg, facts) -> dict:
    """Connect, plan every model for all its shards, print the plans; start no actor and
    write nothing (a resumed run would only plan its unfinished shards)."""
    from coupling.results.store import plan_shards

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
