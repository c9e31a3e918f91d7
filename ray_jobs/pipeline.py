"""The stage runner: a pipeline of block-range actors (``placement.kind == "stages"``), several
prompts in the pipe at once; one stage's own work is ``ray_jobs.stage``."""
from __future__ import annotations

from collections import deque

from ray_jobs.launch import _actor_options, _first_line, _raise_task_error, _threads, _wait_ready


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
        _pipeline(actors, todo, sc.settings, opts.max_in_flight or 2, S, on_shard, torch,
                  sc.fail_fast)
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)


def _pipeline(actors, todo, settings, max_in_flight, lookahead, on_shard, torch,
              fail_fast: bool = False):
    """Feed prompts through the stages; several prompts are in the pipe at once.

    A prompt whose analysis raises on any stage (a ValueError or FloatingPointError: a zero
    step, a non-finite Jacobian) is recorded as a failure of its shard and the others go
    on, as on replicas and in the local scan; ``fail_fast`` makes it fatal.  Anything else
    (an actor that died, a bug) stops the scan.

    Submission order per actor is execution order, so ``forward``/``decompose`` of the next
    ``lookahead`` prompts are queued before a prompt's ``couple`` (which waits for every
    stage's factors): stage s works on prompt p while stage s+1 works on prompt p-1.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from coupling.analysis.steps import assemble
    from coupling.errors import first_line
    from coupling.scan import PromptFailed, failure_record

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
        last = "regularity" in settings.measures      # only then the last stage needs X^0..X^L
        refs = [a.couple.remote(key, xs[s], S, *facs,
                                *(trajs if s == S - 1 and last else []))
                for s, a in enumerate(actors)]
        inflight.append((shard, pos, refs))

    def finish_oldest():
        shard, pos, refs = inflight.popleft()
        pid = shard.prompt_ids[pos]
        try:
            parts = ray.get(refs)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if not isinstance(cause, (ValueError, FloatingPointError)):
                _raise_task_error(e)
            if fail_fast:
                raise PromptFailed(f"prompt {pid} failed ({first_line(cause)}); without "
                                   "fail_fast it is recorded in failures.json and the scan "
                                   "goes on") from None
            buffers[shard.index][pos] = failure_record(pid, cause)
            parts = None
        except RayActorError as e:
            raise RuntimeError(f"a stage actor died beyond its restarts ({_first_line(e)}): "
                               "rerun the same command to resume (finished shards are kept)") \
                from None
        if parts is not None:
            n = len(shard.token_ids[pos])
            reg = next((p["regularity"] for p in parts if p["regularity"] is not None), None)
            tok = next((p["tokens"] for p in parts if p["tokens"] is not None), None)
            depth = [p["rows"] for p in parts] if parts[0]["rows"] is not None else None
            buffers[shard.index][pos] = assemble(pid, n, shard.metas[pos], depth, tok, reg)
        done = buffers[shard.index]
        if all(r is not None for r in done):
            buffers.pop(shard.index)
            on_shard(by_index[shard.index], [r for r in done if not isinstance(r, dict)],
                     [r for r in done if isinstance(r, dict)])

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
