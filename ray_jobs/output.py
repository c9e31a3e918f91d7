"""The output location: a local folder, or a cloud URI written through a private staging copy.

For ``s3://``, ``gs://``, ``memory://``, ``file://``... (anything ``fsspec`` knows) every file
is written into a private staging folder first (``tempfile.mkdtemp``: mode 0700, a fresh name
per run, removed at the end) and then uploaded: each shard as soon as it is finished, so that
a driver on another machine can resume from the URI, and the reduced per-model folders and
``models.parquet`` at the end.  A resumed run first downloads the shard files it finds under
the URI (only names the shard store writes; anything else is reported and left there).

The root carries the project's marker (``coupling.results.owned``, kind ``ray``); ``--overwrite``
deletes only files the project wrote there, one by one, and refuses -- deleting nothing --
when anything else is there.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from coupling.results.owned import (MARKER, SHARD_FILE, ForeignContentError, FsspecTree, LocalTree,
                                    remove_owned, root_kind, write_marker)

REPORT = "ray_scan.json"      # config, versions, per-model report
SHARDS_DIR = "_shards"
ROOT_FILES = (REPORT, "models.parquet")


class Output:
    def __init__(self, out: str, staging_dir: str | None = None):
        self.out = str(out)
        self.remote = "://" in self.out
        self.staging = None
        if self.remote:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.out)
            except (ImportError, ValueError) as e:
                raise ValueError(f"cannot write to {self.out}: {e} (install the fsspec "
                                 "backend, e.g. s3fs or gcsfs)") from None
            self.tree = FsspecTree(self.fs, self.root, name=self.out)
            if staging_dir:
                Path(staging_dir).mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix="coupling-ray-", dir=staging_dir))
            self.local = self.staging
        else:
            self.fs, self.root = None, None
            self.local = Path(self.out)
            self.tree = LocalTree(self.local)

    # -- checks ---------------------------------------------------------------------------
    def prepare(self, overwrite: bool):
        """Make the location ready: new, empty, or a previous distributed scan (resume)."""
        if not self.remote and self.local.is_file():
            raise ValueError(f"--out {self.out} is a file: pass a directory path")
        files = self.tree.files() if self.tree.exists() else []
        if files and root_kind(self.tree) != "ray":
            raise ValueError(f"{self.out} exists, is not empty and is not a distributed scan "
                             f"output (it holds {', '.join(files[:3])}"
                             f"{' ...' if len(files) > 3 else ''}): choose an empty or new --out")
        if overwrite and files:
            try:
                remove_owned(self.tree, kinds=("ray",))
            except ForeignContentError as e:
                raise ValueError(str(e)) from None
        try:
            self.local.mkdir(parents=True, exist_ok=True)
            tempfile.NamedTemporaryFile(dir=self.local, prefix=".probe-").close()
        except OSError as e:
            raise ValueError(f"cannot write to {self.local} ({e.strerror}): choose a writable "
                             "--out") from None
        write_marker(self.local, "ray", ROOT_FILES)
        self.push(MARKER)
        if self.remote:
            self.pull_shards()

    def close(self):
        """Remove the private staging copy (everything in it was uploaded)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    # -- transfers ------------------------------------------------------------------------
    def _remote(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def pull_shards(self):
        """Download the shard stores (``_shards/<key>/``) from the URI into the staging copy:
        only the files a shard store writes; others are reported and never fetched."""
        src = self._remote(SHARDS_DIR)
        if not self.fs.exists(src):
            return
        skipped = []
        for f in self.fs.find(src):
            rel = f[len(src.rstrip("/")) + 1:]
            key, _, name = rel.rpartition("/")
            if "/" in key or not key or not (name == MARKER or SHARD_FILE.fullmatch(name)):
                skipped.append(rel)
                continue
            dst = self.local / SHARDS_DIR / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(f, str(dst))
        if skipped:
            print(f"warning: {src} holds files that are not shards ({', '.join(skipped[:5])}"
                  f"{' ...' if len(skipped) > 5 else ''}): not downloaded, never loaded",
                  file=sys.stderr)

    def push(self, rel: str):
        """Upload ``rel`` (a file or a folder, relative to ``local``); no-op when local."""
        if not self.remote:
            return
        src = self.local / rel
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        for f in files:
            r = f.relative_to(self.local).as_posix()
            dst = self._remote(r)
            self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(f), dst)
