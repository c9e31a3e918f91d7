"""Progress lines of a distributed scan on stderr: shards done/total, prompts/s, ETA."""
from __future__ import annotations

import sys
import time


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
