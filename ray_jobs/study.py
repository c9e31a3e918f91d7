"""The study's scanner on Ray: every checkpoint of the suite is one model of a distributed
scan (replica actors over models), one scan per variant (``coupling.experiments.study.runner``).

Ray is started once for all variants and shut down by :meth:`RayScanner.close`.  Each
variant's root (``OUT/scans/<variant>/``) is an ordinary Ray scan output: rerunning the study
resumes it shard by shard.
"""
from __future__ import annotations

from pathlib import Path

from ray_jobs.config import parse_config
from ray_jobs.connect import connect
from ray_jobs.scan import run_scan


class RayScanner:
    def __init__(self, address: str | None = None, replicas: int | None = None,
                 shard_size: int | None = None, gpus_per_actor: float | None = None,
                 progress: bool = True):
        self.address, self.replicas, self.shard_size = address, replicas, shard_size
        self.gpus_per_actor, self.progress = gpus_per_actor, progress
        self._started = False

    def __call__(self, items, settings: dict, out_dir) -> dict:
        """Scan ``items`` ((id, folder) pairs) with ``settings`` into ``out_dir``; returns
        id -> the model's scan folder."""
        data = {**settings, "out": str(out_dir), "models": [{"path": str(p)} for _, p in items]}
        for key in ("replicas", "shard_size", "gpus_per_actor"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        cfg = parse_config(data, address=self.address)
        if not self._started:
            self._started = connect(self.address)
        run_scan(cfg, progress=self.progress)
        return {ident: Path(cfg.out) / job.key for (ident, _), job in zip(items, cfg.jobs)}

    def close(self):
        if self._started:
            import ray
            ray.shutdown()
            self._started = False
