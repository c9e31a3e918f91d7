"""Fault injection for the Ray tests -- it lives here, never in the production actors.

``crashing(Base, method, after, marker)`` is a subclass of an actor class whose ``method``
makes its process exit (``os._exit(1)``, as a crash would) on its ``after``-th call, once per
test: "once" is ``marker``, created with ``O_EXCL`` just before exiting, so the restarted
actor and the other actors go on.  ``delay_s`` sleeps after every call (time for a test to
kill the driver mid-scan).  ``ray_jobs.scan.run_scan(..., workers=...)`` takes such classes.

Run as a script it is the distributed-scan driver (``python -m ray_jobs.scan``'s arguments
after ``--``) with such replicas::

    python tests/ray_faults.py --delay 1 --crash-after 2 --crash-marker M -- --config C ...
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _first(marker: str) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"pid {os.getpid()}\n".encode())
    os.close(fd)
    return True


def crashing(base, method: str, after: int = 0, marker: str | None = None,
             delay_s: float = 0.0):
    """A subclass of ``base`` whose ``method`` crashes the process once, on its ``after``-th
    call (0: never), and sleeps ``delay_s`` after each call.  Made inside this function, so
    Ray ships the class (and this module) by value to its workers, which need not have
    ``tests/`` on their path."""
    if __name__ != "__main__":
        import ray.cloudpickle
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    def wrapped(self, *args, **kwargs):
        out = getattr(base, method)(self, *args, **kwargs)
        self._test_calls = getattr(self, "_test_calls", 0) + 1
        if after and self._test_calls >= after and _first(marker):
            os._exit(1)
        if delay_s:
            time.sleep(delay_s)
        return out

    return type(f"Crashing{base.__name__}", (base,), {method: wrapped})


def main(argv=None) -> int:
    from ray_jobs.actors import ReplicaWorker
    from ray_jobs.scan import main as scan_main

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--crash-after", type=int, default=0)
    p.add_argument("--crash-marker")
    p.add_argument("scan_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    rest = args.scan_args[1:] if args.scan_args[:1] == ["--"] else args.scan_args
    replica = crashing(ReplicaWorker, "run", args.crash_after, args.crash_marker, args.delay)
    return scan_main(rest, workers={"replica": replica})


if __name__ == "__main__":
    sys.exit(main())
