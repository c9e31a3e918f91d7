"""Joining a Ray cluster under the project's rules: loopback by default, no telemetry, no
token auth, and a one-line error in seconds when an explicit address does not answer."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


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
