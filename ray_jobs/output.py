"""The output location: a local folder, or a cloud URI written through a local staging copy.

For ``s3://``, ``gs://``, ``memory://``, ``file://``... (anything ``fsspec`` knows) every file
is written locally first (atomically, as for a local run) and then uploaded: each shard as
soon as it is finished, so that a driver on another machine can resume from the bucket, and
the reduced per-model folders and ``models.parquet`` at the end.  A resumed run first
downloads the finished shards it finds under the URI.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

MARKER = "ray_scan.json"


class Output:
    def __init__(self, out: str, staging_dir: str | None = None):
        self.out = str(out)
        self.remote = "://" in self.out
        if self.remote:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.out)
            except (ImportError, ValueError) as e:
                raise ValueError(f"cannot write to {self.out}: {e} (install the fsspec "
                                 "backend, e.g. s3fs or gcsfs)") from None
            digest = hashlib.sha1(self.out.encode()).hexdigest()[:12]
            base = Path(staging_dir or Path(tempfile.gettempdir()) / "coupling-ray")
            self.local = base / digest
        else:
            self.fs, self.root = None, None
            self.local = Path(self.out)

    # -- checks ---------------------------------------------------------------------------
    def prepare(self, overwrite: bool):
        """Make ``local`` ready: new, empty, or a previous distributed scan (resume)."""
        loc = self.local
        if loc.exists() and loc.is_file():
            raise ValueError(f"--out {self.out} is a file: pass a directory path")
        ours = (loc / MARKER).exists() or (loc / "_shards").exists()
        if loc.exists() and any(loc.iterdir()) and not ours:
            raise ValueError(f"{self.out} exists, is not empty and is not a distributed scan "
                             "output: choose an empty or new --out")
        if overwrite:
            if loc.exists():
                shutil.rmtree(loc)
            if self.remote and self.fs.exists(self.root):
                self.fs.rm(self.root, recursive=True)
        try:
            loc.mkdir(parents=True, exist_ok=True)
            tempfile.NamedTemporaryFile(dir=loc, prefix=".probe-").close()
        except OSError as e:
            raise ValueError(f"cannot write to {loc} ({e.strerror}): choose a writable --out") \
                from None
        if self.remote:
            self.pull("_shards")

    # -- transfers ------------------------------------------------------------------------
    def _remote(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def pull(self, rel: str):
        """Download ``rel`` (a folder) from the URI into the staging copy, if it exists."""
        src = self._remote(rel)
        if not self.fs.exists(src):
            return
        for f in self.fs.find(src):
            sub = f[len(src.rstrip("/")) + 1:]
            dst = self.local / rel / sub
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f, str(dst))

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
