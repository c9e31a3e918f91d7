"""What the project wrote: the ``.coupling-scan`` marker, and deleting only that.

Every folder the project writes carries a marker file ``.coupling-scan`` (JSON) that says
what kind of folder it is and which files the project put there:

* ``scan``: a finished scan (``coupling scan``, or one model of a Ray scan); ``files`` lists
  every file written, and figures drawn later into ``figures/`` (``*.png``, ``*.txt``, ...)
  are the project's too;
* ``shards``: finished prompts awaiting the end of a scan (``plan.json``,
  ``shard-00007.npz``; see ``coupling.results.store``);
* ``ray``: the root of a distributed scan (``files``: ``ray_scan.json``, ``models.parquet``),
  its per-model folders carry their own markers.

A file belongs to the project when the nearest folder above it that holds a marker lists it
(or its kind's naming rule matches it).  ``--overwrite`` deletes such files only, and refuses,
deleting nothing, when anything else is there.  The same rules run on a local folder
(:class:`LocalTree`) and on an fsspec URI (:class:`FsspecTree`: ``s3://``, ``memory://``...).
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
import warnings
from pathlib import Path

MARKER = ".coupling-scan"
MARKER_FORMAT = "coupling-owned/1"
KINDS = ("scan", "shards", "ray")
# names written by the kinds' own writers (not listed, since they appear as a scan goes on)
SHARD_FILE = re.compile(r"(plan\.json|shard-\d{5}\.npz|\.(plan\.json|shard-\d{5}\.npz)\.tmp-\d+)$")
FIGURE_FILE = re.compile(r"figures/[A-Za-z0-9_.-]+\.(png|pdf|svg|txt|json)$")


class ForeignContentError(ValueError):
    """A folder to be replaced holds files the project did not write."""


def marker_bytes(kind: str, files=()) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown marker kind {kind!r}")
    return json.dumps({"format": MARKER_FORMAT, "kind": kind, "files": sorted(files)},
                      indent=1).encode()


def write_marker(folder, kind: str, files=()) -> Path:
    path = Path(folder) / MARKER
    atomic_write(path, marker_bytes(kind, files))
    return path


def parse_marker(data: bytes | None) -> dict | None:
    """The marker's content, or None when it is missing or not one of ours."""
    try:
        m = json.loads(data)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(m, dict) or m.get("format") != MARKER_FORMAT or m.get("kind") not in KINDS:
        return None
    files = m.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {"kind": m["kind"], "files": set(files)}


def atomic_write(path, data: bytes):
    """Write ``data`` to ``path`` through a temporary file and a rename (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# Trees: the files of a folder, local or behind fsspec, as relative POSIX paths
# ------------------------------------------------------------------------------------------
class LocalTree:
    def __init__(self, root):
        self.root = Path(root)
        self.name = str(root)

    def exists(self) -> bool:
        return self.root.exists()

    def files(self) -> list:
        """Every non-directory entry (symlinks included, never followed)."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            dirnames[:] = [d for d in dirnames if d not in links]
            out += [(rel / f).as_posix() for f in filenames + links]
        return sorted(out)

    def read(self, rel: str) -> bytes | None:
        p = self.root / rel
        return p.read_bytes() if p.is_file() and not p.is_symlink() else None

    def remove(self, rel: str):
        (self.root / rel).unlink(missing_ok=True)

    def prune_dirs(self):
        """Remove the folders left empty, deepest first (the root included)."""
        for dirpath, _, _ in sorted(os.walk(self.root), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


class FsspecTree:
    def __init__(self, fs, root: str, name: str | None = None):
        self.fs, self.root = fs, root.rstrip("/")
        self.name = name or root

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def files(self) -> list:
        if not self.fs.exists(self.root):
            return []
        n = len(self.root) + 1
        return sorted(f.rstrip("/")[n:] for f in self.fs.find(self.root, withdirs=False)
                      if f.rstrip("/") != self.root)

    def read(self, rel: str) -> bytes | None:
        path = f"{self.root}/{rel}"
        return self.fs.cat_file(path) if self.fs.isfile(path) else None

    def remove(self, rel: str):
        self.fs.rm_file(f"{self.root}/{rel}")

    def prune_dirs(self):
        dirs = [d for d in self.fs.find(self.root, withdirs=True) if self.fs.isdir(d)]
        for d in sorted(dirs + [self.root], key=len, reverse=True):
            try:
                if not self.fs.ls(d):
                    self.fs.rmdir(d)
            except (OSError, FileNotFoundError, NotImplementedError):
                pass


# ------------------------------------------------------------------------------------------
# Ownership
# ------------------------------------------------------------------------------------------
def classify(tree) -> tuple[list, list, dict]:
    """``(owned, foreign, markers)`` of every file of ``tree``; ``markers``: folder -> marker."""
    files = tree.files()
    markers = {}
    for f in files:
        if posixpath.basename(f) == MARKER:
            m = parse_marker(tree.read(f))
            if m is not None:
                markers[posixpath.dirname(f)] = m
    owned, foreign = [], []
    for f in files:
        (owned if _is_owned(f, markers) else foreign).append(f)
    return owned, foreign, markers


def _is_owned(f: str, markers: dict) -> bool:
    d = posixpath.dirname(f)
    while True:
        if d in markers:
            m, rel = markers[d], f[len(d) + 1:] if d else f
            if rel == MARKER or rel in m["files"]:
                return True
            if m["kind"] == "shards":
                return "/" not in rel and bool(SHARD_FILE.fullmatch(rel))
            return m["kind"] == "scan" and bool(FIGURE_FILE.fullmatch(rel))
        if not d:
            return False
        d = posixpath.dirname(d)


def root_kind(tree) -> str | None:
    """The kind of the marker at the root of ``tree`` (None: not a folder the project made)."""
    m = parse_marker(tree.read(MARKER)) if tree.exists() else None
    return m["kind"] if m else None


def refusal(tree, foreign: list, what: str = "replace") -> str:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return (f"--overwrite refuses to {what} {tree.name}: it holds files coupling did not write "
            f"({shown}); move them away or choose another --out (nothing was deleted)")


def check_replaceable(tree, kinds=KINDS):
    """Raise :class:`ForeignContentError` unless ``tree`` is absent, empty, or only ours."""
    if not tree.exists():
        return
    files = tree.files()
    if not files:
        return
    if root_kind(tree) not in kinds:
        raise ForeignContentError(refusal(tree, files[:5] + ([f"... {len(files)} files"]
                                                              if len(files) > 5 else [])))
    _, foreign, _ = classify(tree)
    if foreign:
        raise ForeignContentError(refusal(tree, foreign))


def remove_owned(tree, kinds=KINDS, strict: bool = True) -> list:
    """Delete the project's files of ``tree``, the marker last, then the folders left empty;
    returns what was left.  ``strict``: refuse (deleting nothing) when anything else is
    there; otherwise leave the other files where they are."""
    if strict:
        check_replaceable(tree, kinds)
    elif root_kind(tree) not in kinds:
        return tree.files()
    owned, _, _ = classify(tree)
    markers = [f for f in owned if posixpath.basename(f) == MARKER]
    for f in [f for f in owned if f not in markers] + markers:
        tree.remove(f)
    tree.prune_dirs()
    return tree.files() if tree.exists() else []


def replace_dir(new: Path, out: Path):
    """Atomically put folder ``new`` at ``out``: the old one moved aside, the new renamed in,
    then the old one's own files removed (a foreign file written meanwhile is kept)."""
    new, out = Path(new), Path(out)
    if not out.exists():
        os.replace(new, out)
        return
    check_replaceable(LocalTree(out))
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
    os.replace(out, aside / "d")       # rename within one folder: atomic
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(aside / "d", out)
        os.rmdir(aside)
        raise
    left = remove_owned(LocalTree(aside / "d"), strict=False)
    if left:
        warnings.warn(f"kept {aside / 'd'}: files appeared in the old {out} while it was being "
                      f"replaced ({', '.join(left[:5])})", stacklevel=2)
    else:
        os.rmdir(aside)                            # `d` went with the empty folders
