"""Shards: the unit of work and of resume.

A shard is a batch of consecutive prompts of one (model, revision).  Each finished shard is
pickled to ``OUT/_shards/<model-key>/shard-00007.pkl`` by writing a temporary file and
renaming it (atomic on POSIX), so a shard file either exists complete or not at all.
``plan.json`` beside them fixes which prompts each shard holds and the settings; a rerun
into the same ``OUT`` skips every shard whose file exists, and refuses to mix shards of a
different plan.  Only the driver writes shard files, once per shard.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

SHARDS_DIR = "_shards"


@dataclass
class Shard:
    index: int
    prompt_ids: list     # str per prompt
    token_ids: list      # list[int] per prompt
    metas: list          # dict per prompt ({**prompt.meta, "text": ...})

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def __len__(self):
        return len(self.prompt_ids)


def plan_shards(prompts, token_ids, size: int) -> list:
    """Consecutive batches of ``size`` prompts (the last may be shorter)."""
    shards = []
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
        ids = token_ids[start:start + size]
        shards.append(Shard(len(shards), [p.id for p in batch],
                            [[int(t) for t in x.reshape(-1).tolist()] for x in ids],
                            [{**p.meta, "text": p.text} for p in batch]))
    return shards


class ShardStore:
    """The finished shards of one model under ``root`` (``OUT/_shards/<model-key>``)."""

    def __init__(self, root):
        self.root = Path(root)

    def path(self, shard: Shard) -> Path:
        return self.root / f"{shard.name}.pkl"

    def check_plan(self, plan: dict):
        """Write ``plan.json``, or verify the one there (resume) describes the same work."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = self.root / "plan.json"
        text = json.dumps(plan, indent=1, sort_keys=True, default=str)
        if f.exists():
            if json.loads(f.read_text()) != json.loads(text):
                raise ValueError(f"{self.root} holds shards of a different plan (prompts, shard "
                                 "size or settings changed): choose another --out, or pass "
                                 "--overwrite to start over")
            return
        _atomic_write(f, text.encode())

    def done(self, shards) -> set:
        return {s.index for s in shards if self.path(s).exists()}

    def write(self, shard: Shard, results) -> Path:
        ids = [r.prompt_id for r in results]
        if ids != shard.prompt_ids:
            raise RuntimeError(f"{shard.name}: results for {ids} do not match its prompts "
                               f"{shard.prompt_ids}")
        path = self.path(shard)
        _atomic_write(path, pickle.dumps({"prompt_ids": ids, "results": list(results)},
                                         protocol=pickle.HIGHEST_PROTOCOL))
        return path

    def read_all(self, shards) -> list:
        """Every prompt's result in plan order; each shard read exactly once."""
        results = []
        for s in shards:
            with open(self.path(s), "rb") as fh:
                data = pickle.load(fh)
            if data["prompt_ids"] != s.prompt_ids:
                raise ValueError(f"{self.path(s)} holds prompts {data['prompt_ids']}, the plan "
                                 f"says {s.prompt_ids}: the output is corrupt, use --overwrite")
            results.extend(data["results"])
        ids = [r.prompt_id for r in results]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate prompt ids in {self.root}: prompt ids must be unique")
        return results

    def clean_partial(self):
        """Remove temporary files left by a driver killed mid-write."""
        if self.root.exists():
            for f in self.root.glob(".*.tmp-*"):
                f.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
