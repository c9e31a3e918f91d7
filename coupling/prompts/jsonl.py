"""The :class:`Prompt` record and its JSONL form: local ``.jsonl`` files and the built-in set.

A prompt file holds one ``{"id": str, "text": str, ...}`` object per line; the built-in set
(``coupling/data/prompts_builtin.jsonl``) is one such file.  Every problem in a file is a
``ValueError`` naming the file, the line and the fix.  The other sources (benchmarks) are in
:mod:`coupling.prompts.benchmarks`; :func:`coupling.prompts.sources.load_prompts` is the one entry point.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources


@dataclass
class Prompt:
    """One prompt: a unique ``id``, the ``text`` fed to the model, and ``meta`` (extra columns:
    ``kind``, ``source``, gold ``answer`` ... ; JSON-serialisable values only)."""

    id: str
    text: str
    meta: dict = field(default_factory=dict)


BUILTIN_FILE = "prompts_builtin.jsonl"


def _line_error(path: str, lineno: int, problem: str, fix: str) -> ValueError:
    return ValueError(f"{path}, line {lineno}: {problem}; fix: {fix}")


def read_jsonl_prompts(path: str | os.PathLike, source: str | None = None) -> list[Prompt]:
    """Read prompts from a JSONL file, one ``{"id": str, "text": str, ...}`` object per line.

    Blank lines are skipped.  A missing ``id`` becomes ``"line-<n>"`` (``n`` 1-based physical
    line number); every other key goes to ``meta``, plus ``meta["source"]`` (default: the path)
    unless the line sets its own.  Bad JSON, a non-object line, a missing/empty/non-string
    ``text``, a non-string ``id`` or a repeated ``id`` raise ``ValueError`` naming file and line.
    """
    path = os.fspath(path)
    source = path if source is None else source
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            prompt = _parse_jsonl_line(path, lineno, line, source)
            if prompt.id in seen:
                raise _line_error(path, lineno, f"duplicate id {prompt.id!r} (first on line "
                                  f"{seen[prompt.id]})", "give every prompt a unique id")
            seen[prompt.id] = lineno
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts in file; fix: write one JSON object per line, "
                         'e.g. {"id": "p1", "text": "The capital of France is"}')
    return prompts


def _parse_jsonl_line(path: str, lineno: int, line: str, source: str) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _line_error(path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})",
                          'write one JSON object per line, e.g. {"id": "p1", "text": "..."}') from None
    if not isinstance(row, dict):
        raise _line_error(path, lineno, f"expected a JSON object, got {type(row).__name__}",
                          'write one JSON object per line, e.g. {"id": "p1", "text": "..."}')
    text = row.pop("text", None)
    if not isinstance(text, str) or not text.strip():
        problem = "missing 'text'" if text is None else f"'text' is empty or not a string ({text!r})"
        raise _line_error(path, lineno, problem, 'give the line a non-empty "text" string')
    pid = row.pop("id", None)
    if pid is None:
        pid = f"line-{lineno}"
    elif isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)  # numeric ids are common in exported data; keep them as their string
    elif not isinstance(pid, str) or not pid:
        raise _line_error(path, lineno, f"'id' must be a non-empty string, got {pid!r}",
                          'use a string id such as "p1", or drop "id" to get "line-<n>"')
    row.setdefault("source", source)
    return Prompt(id=pid, text=text, meta=row)


def _builtin_prompts() -> list[Prompt]:
    ref = resources.files("coupling").joinpath("data", BUILTIN_FILE)
    with resources.as_file(ref) as path:
        return read_jsonl_prompts(path, source="builtin")
