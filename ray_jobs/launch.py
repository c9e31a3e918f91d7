"""Starting actors (resources, threads, restart policy) and turning their failures into
one-line errors; shared by the replica and the stage runners."""
from __future__ import annotations


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
    from coupling.scan import PromptFailed

    cause = getattr(e, "cause", None)
    if isinstance(cause, (ValueError, FloatingPointError, PromptFailed)):
        raise cause
    raise RuntimeError(_first_line(e)) from None
