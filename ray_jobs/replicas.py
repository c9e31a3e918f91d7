"""The replica runner: a pool of whole-model actors, whole shards per task, a dead actor's
shard requeued (``placement.kind == "replicas"``)."""
from __future__ import annotations

from collections import deque

from ray_jobs.launch import _actor_options, _first_line, _raise_task_error, _threads


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
                trust_remote_code=sc.trust_remote_code, settings=sc.settings,
                fail_fast=sc.fail_fast)


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
            results, failures = ray.get(ready[0])
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
            on_shard(shard, results, failures)
        for j in sorted(alive, key=load):
            while load(j) < 2 and queue:
                submit(j)
