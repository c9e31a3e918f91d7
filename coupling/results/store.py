"""The result store: finished prompts written in shards as a scan goes, read back on resume.

A shard is a batch of consecutive prompts.  Each finished shard is one ``.npz`` file
(``shard-00007.npz``) written through a temporary file and a rename, so it exists complete or
not at all.  It holds no pickle: every ``numpy`` array of the results is an entry of the
archive, everything else (ids, scalars, dicts, lists) is one JSON document stored as a string
entry, and it is read with ``np.load(..., allow_pickle=False)``.  The codec is generic over
dataclass fields (``PromptResult`` and whatever fields it gains): an array becomes an entry,
a dict / list / tuple is walked, a JSON scalar stays JSON; anything else is refused when
written.

A shard may also list prompts whose analysis failed (``failures``: one JSON record per
prompt, ``{prompt_id, layer, error}``, as ``coupling.scan.failure_record`` writes them); its
``prompt_ids`` are then the prompts that succeeded.  Shards written before failures were
recorded have no such list (none failed).

``plan.json`` beside the shards fixes which prompts each shard holds and the settings; a
rerun with the same plan skips every shard whose file exists, a different plan is refused.
Only files named ``plan.json`` / ``shard-NNNNN.npz`` are ever read; anything else in the
folder (a planted ``.pkl``, say) is reported and left alone.
"""
from __future__ import annotations

import dataclasses
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coupling.results.owned import MARKER, SHARD_FILE, atomic_write, parse_marker, write_marker

SHARD_FORMAT = "coupling-shard/1"
INDEX = "__index__"        # the archive entry holding the JSON document


class ShardError(ValueError):
    """A shard file that is not one this project wrote, or a plan that does not match."""


# ------------------------------------------------------------------------------------------
# Codec: dataclass <-> (JSON tree, arrays)
# ------------------------------------------------------------------------------------------
def _encode(value, arrays: dict, where: str):
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"{where}: an object array cannot be stored without pickle")
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {"array": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _encode(v, arrays, f"{where}.{k}") for k, v in value.items()}}
        # other keys (ints, tuples...): a list of encoded (key, value) pairs
        return {"items": [[_encode(k, arrays, f"{where} key"), _encode(v, arrays, f"{where}[{k}]")]
                          for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"{where}: cannot store a {type(value).__name__} (use numpy arrays, "
                    "dicts, lists and JSON scalars)")


def _decode(node, arrays, where: str):
    if not isinstance(node, dict) or len(node) != 1:
        raise ShardError(f"{where}: malformed entry")
    (kind, v), = node.items()
    if kind == "array":
        if v not in arrays:
            raise ShardError(f"{where}: missing array {v!r}")
        return arrays[v]
    if kind == "dict":
        return {k: _decode(x, arrays, f"{where}.{k}") for k, x in v.items()}
    if kind == "items":
        return {_decode(k, arrays, f"{where} key"): _decode(x, arrays, f"{where}[{k}]")
                for k, x in v}
    if kind in ("list", "tuple"):
        items = [_decode(x, arrays, f"{where}[{i}]") for i, x in enumerate(v)]
        return items if kind == "list" else tuple(items)
    if kind == "value":
        return v
    raise ShardError(f"{where}: unknown entry kind {kind!r}")


def encode(obj, arrays: dict) -> dict:
    """JSON tree of a dataclass instance; its arrays are added to ``arrays``."""
    return {f.name: _encode(getattr(obj, f.name), arrays, f.name)
            for f in dataclasses.fields(obj)}


def decode(cls, tree: dict, arrays):
    """The ``cls`` instance of :func:`encode`'s tree (missing fields take their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise ShardError(f"fields {unknown} are not fields of {cls.__name__} (written by "
                         "another version)")
    return cls(**{k: _decode(v, arrays, k) for k, v in tree.items()})


def write_shard(path, prompt_ids: list, items: list, failures=()):
    """``items`` (dataclass instances, one per prompt id) and the ``failures`` records of the
    shard's failed prompts into one ``.npz`` (atomic)."""
    arrays: dict = {}
    doc = {"format": SHARD_FORMAT, "prompt_ids": list(prompt_ids),
           "items": [encode(r, arrays) for r in items]}
    if failures:             # absent when none failed: the same bytes as before failures
        doc["failures"] = [_failure(f, "failures") for f in failures]
    arrays[INDEX] = np.array(json.dumps(doc))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def _failure(record, where: str) -> dict:
    """A failure record as stored: a JSON object naming its prompt (anything else refused)."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt_id"), str):
        raise ShardError(f"{where}: a failure record must be a mapping with a prompt_id")
    return json.loads(json.dumps(record))       # JSON only, and a copy


def read_shard(path, cls) -> tuple[list, list]:
    """``(prompt_ids, items)`` of a shard file; never unpickles (``allow_pickle=False``)."""
    ids, items, _ = read_shard_failures(path, cls)
    return ids, items


def read_shard_failures(path, cls) -> tuple[list, list, list]:
    """``(prompt_ids, items, failures)`` of a shard file (``failures``: [] in a shard written
    before failures were recorded)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        doc = json.loads(str(arrays.pop(INDEX)))
        if not isinstance(doc, dict) or doc.get("format") != SHARD_FORMAT:
            raise ShardError("not a coupling shard")
        ids, items = doc["prompt_ids"], doc["items"]
        failures = [_failure(f, "failures") for f in doc.get("failures", [])]
        return ids, [decode(cls, t, arrays) for t in items], failures
    except (ShardError, ValueError, KeyError, TypeError, OSError, EOFError) as e:
        raise ShardError(f"{path} is not a shard this project wrote ({str(e).splitlines()[0]}): "
                         "delete it to recompute its prompts") from None


# ------------------------------------------------------------------------------------------
# Shards and their store
# ------------------------------------------------------------------------------------------
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
                            [[int(t) for t in np.asarray(x).reshape(-1).tolist()] for x in ids],
                            [{**p.meta, "text": p.text} for p in batch]))
    return shards


def _succeeded(shard: Shard, failures) -> list:
    """The shard's prompt ids less those of ``failures`` (each a prompt of the shard)."""
    failed = [f["prompt_id"] for f in failures]
    if any(pid not in shard.prompt_ids for pid in failed) or len(set(failed)) != len(failed):
        return [None]                  # matches no list of results: the caller's error
    return [pid for pid in shard.prompt_ids if pid not in failed]


class ShardStore:
    """The finished shards under ``root`` (a folder of its own, marked ``shards``)."""

    def __init__(self, root, result_type=None):
        if result_type is None:
            from coupling.analysis.steps import PromptResult
            result_type = PromptResult
        self.root = Path(root)
        self.result_type = result_type

    def path(self, shard: Shard) -> Path:
        return self.root / f"{shard.name}.npz"

    def check_plan(self, plan: dict):
        """Write ``plan.json``, or verify the one there (resume) describes the same work."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if not marker.exists():
            write_marker(self.root, "shards")
        elif (parse_marker(marker.read_bytes()) or {}).get("kind") != "shards":
            raise ShardError(f"{self.root} is not a shard folder of coupling: choose another "
                             "--out")
        f = self.root / "plan.json"
        text = json.dumps(plan, indent=1, sort_keys=True, default=str)
        if f.exists():
            try:
                same = json.loads(f.read_text()) == json.loads(text)
            except ValueError:
                same = False
            if not same:
                raise ShardError(f"{self.root} holds shards of a different scan (model, "
                                 "prompts, shard size or settings changed): choose another "
                                 "--out, or pass --overwrite to start over")
            return
        atomic_write(f, text.encode())

    def done(self, shards) -> set:
        return {s.index for s in shards if self.path(s).is_file()}

    def write(self, shard: Shard, results, failures=()) -> Path:
        """The shard's ``results`` and the ``failures`` records of its other prompts."""
        failures = [_failure(f, shard.name) for f in failures]
        ids = [r.prompt_id for r in results]
        if ids != _succeeded(shard, failures):
            raise RuntimeError(f"{shard.name}: results for {ids} and failures for "
                               f"{[f['prompt_id'] for f in failures]} do not match its prompts "
                               f"{shard.prompt_ids}")
        path = self.path(shard)
        write_shard(path, ids, list(results), failures)
        return path

    def read(self, shard: Shard) -> list:
        return self.read_with_failures(shard)[0]

    def read_with_failures(self, shard: Shard) -> tuple[list, list]:
        """``(results, failures)`` of a finished shard, checked against the plan."""
        ids, results, failures = read_shard_failures(self.path(shard), self.result_type)
        if ids != _succeeded(shard, failures) or [r.prompt_id for r in results] != ids:
            raise ShardError(f"{self.path(shard)} holds prompts {ids} (failed: "
                             f"{[f['prompt_id'] for f in failures]}), the plan says "
                             f"{shard.prompt_ids}: delete it to recompute them")
        return results, failures

    def read_all(self, shards) -> list:
        """Every prompt's result in plan order; each shard read exactly once."""
        return self.read_all_with_failures(shards)[0]

    def read_all_with_failures(self, shards) -> tuple[list, list]:
        """``(results, failures)`` of every shard, in plan order; each shard read once."""
        self.report_foreign()
        results, failures = [], []
        for s in shards:
            r, f = self.read_with_failures(s)
            results.extend(r)
            failures.extend(f)
        ids = [r.prompt_id for r in results]
        if len(set(ids)) != len(ids):
            raise ShardError(f"duplicate prompt ids in {self.root}: prompt ids must be unique")
        return results, failures

    def foreign(self) -> list:
        """Entries of the folder that are not the store's own (never read)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.name != MARKER and not (p.is_file() and SHARD_FILE.fullmatch(p.name)))

    def report_foreign(self):
        other = self.foreign()
        if other:
            warnings.warn(f"{self.root} holds files that are not shards ({', '.join(other[:5])}"
                          f"{' ...' if len(other) > 5 else ''}): ignored, never loaded",
                          stacklevel=2)

    def clean_partial(self):
        """Remove temporary files left by a writer killed mid-write."""
        if self.root.exists():
            for f in self.root.glob(".*.tmp-*"):
                if SHARD_FILE.fullmatch(f.name):
                    f.unlink(missing_ok=True)
