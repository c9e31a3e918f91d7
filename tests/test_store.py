"""Safe storage: shards without pickle, and ``--overwrite`` that deletes only our own files.

* The shard codec round-trips a real ``PromptResult`` (every measure) field by field, and any
  dataclass of arrays / dicts / lists / tuples / JSON scalars.
* A planted pickle -- whose unpickling would create a marker file -- in a shard folder (as a
  ``.pkl`` beside the shards, or disguised as ``shard-00000.npz``) is never executed: the
  ``.pkl`` is reported and ignored, the disguised file is a one-line error.
* A shard also keeps its failed prompts' records (``failures``), checked against the plan
  with its results; a shard without them (the older layout) has none.
* ``--overwrite`` on a folder (local scan) or URI (``memory://``, ``file://``; the Ray output)
  that also holds foreign files refuses in one line naming them and deletes nothing; a
  folder of a previous scan is replaced (the old one moved aside, the new renamed in).
"""
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from coupling.analysis.prompt import analyze_prompt
from coupling.analysis.steps import PromptResult
from coupling.model.loading import TINY_MODEL_DIR, load_model
from coupling.results.owned import MARKER
from coupling.results.store import Shard, ShardError, ShardStore, read_shard, write_shard
from coupling.scan import scan
from coupling.settings.scan_settings import ScanSettings


class Plant:
    """Unpickling this creates ``path`` (what a malicious shard would do, harmlessly)."""

    def __init__(self, path):
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def planted_pickle(tmp_path, name="evil") -> tuple[bytes, Path]:
    marker = tmp_path / f"{name}-was-executed"
    data = pickle.dumps(Plant(marker))
    probe = tmp_path / f"{name}-probe"
    pickle.loads(pickle.dumps(Plant(probe)))          # the payload is live when unpickled
    assert probe.exists()
    return data, marker


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY_MODEL_DIR)


def _same(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b)
    else:
        assert a == b and type(a) is type(b), (a, b)


def test_a_real_prompt_result_round_trips_field_by_field(tiny, tmp_path):
    ids = tiny.tokenizer("The capital of France is Paris, said the", return_tensors="pt").input_ids
    s = ScanSettings(k=4, measures="depth,tokens,regularity", token_layers=(2, 3))
    res = analyze_prompt(tiny, ids, s, "p0", {"text": "x", "difficulty": 2})
    assert res.depth_normalized is not None and res.tokens and res.pca is not None
    write_shard(tmp_path / "shard-00000.npz", ["p0"], [res])
    ids_back, (back,) = read_shard(tmp_path / "shard-00000.npz", PromptResult)
    assert ids_back == ["p0"]
    for name in res.__dataclass_fields__:
        _same(getattr(res, name), getattr(back, name))


@dataclass
class Rich:
    """Every kind of field the codec promises to keep (a field added later looks like these)."""
    name: str
    grid: np.ndarray
    curves: dict
    by_layer: dict
    pairs: dict
    nested: list
    shape: tuple
    missing: np.ndarray | None = None
    scalar: float = float("nan")
    flags: dict = field(default_factory=dict)


def test_the_codec_is_generic_over_dataclass_fields(tmp_path):
    rich = Rich("r", np.arange(6, dtype=np.float32).reshape(2, 3),
                {"a": np.ones(3), "b": np.array([np.nan, np.inf, -1.0])},
                {1: "exact", 2: "local"}, {(0, 1): np.eye(2), (1, 1): np.zeros((2, 2))},
                [1, [2.5, None], {"deep": np.int16(7)}], (3, "x"), None, float("nan"),
                {"ok": True, "n": np.int64(5), "v": np.float32(0.25)})
    write_shard(tmp_path / "shard-00001.npz", ["r"], [rich])
    _, (back,) = read_shard(tmp_path / "shard-00001.npz", Rich)
    expect = {**rich.__dict__, "nested": [1, [2.5, None], {"deep": 7}],
              "flags": {"ok": True, "n": 5, "v": 0.25}}
    for name, value in expect.items():
        _same(value, getattr(back, name))
    with pytest.raises(TypeError, match="object array"):
        write_shard(tmp_path / "bad.npz", ["r"], [Rich("r", np.array([{}], dtype=object),
                                                      {}, {}, {}, [], ())])
    with pytest.raises(TypeError, match="grid: cannot store a set"):
        write_shard(tmp_path / "bad.npz", ["r"], [Rich("r", {1}, {}, {}, {}, [], ())])
    assert not (tmp_path / "bad.npz").exists()


def test_a_shard_keeps_its_failed_prompts_and_old_shards_have_none(tmp_path):
    from coupling.scan import failure_record

    store = ShardStore(tmp_path / "shards")
    store.check_plan({"shards": [["a", "b", "c"], ["d"]]})
    shards = [Shard(0, ["a", "b", "c"], [[1], [2], [3]], [{}] * 3), Shard(1, ["d"], [[4]], [{}])]
    ok = lambda pid: PromptResult(pid, 1, {}, {"x": 1.0}, {})  # noqa: E731
    failed = failure_record("b", ValueError("zero step: x^1 == x^0 (prompt b)"))
    assert failed == {"prompt_id": "b", "layer": 1,
                      "error": "ValueError: zero step: x^1 == x^0 (prompt b)"}
    with pytest.raises(RuntimeError, match="do not match its prompts"):
        store.write(shards[0], [ok("a"), ok("c")], [{**failed, "prompt_id": "z"}])
    with pytest.raises(RuntimeError, match="do not match its prompts"):
        store.write(shards[0], [ok("a"), ok("b"), ok("c")], [failed])
    store.write(shards[0], [ok("a"), ok("c")], [failed])
    store.write(shards[1], [ok("d")])          # no failures: the layout of older shards
    with np.load(store.path(shards[1]), allow_pickle=False) as z:
        assert "failures" not in json.loads(str(z["__index__"]))
    results, failures = store.read_all_with_failures(shards)
    assert [r.prompt_id for r in results] == ["a", "c", "d"] and failures == [failed]
    assert [r.prompt_id for r in store.read_all(shards)] == ["a", "c", "d"]
    # a shard whose failures do not account for its missing prompts is refused in one line
    write_shard(store.path(shards[0]), ["a", "c"], [ok("a"), ok("c")])
    with pytest.raises(ShardError, match=r"holds prompts \['a', 'c'\] \(failed: \[\]\), the "
                                         r"plan says \['a', 'b', 'c'\]: delete it"):
        store.read_all(shards)


def test_a_planted_pickle_in_a_shard_folder_is_never_executed(tmp_path):
    store = ShardStore(tmp_path / "shards")
    store.check_plan({"shards": [["a"], ["b"]]})
    shards = [Shard(0, ["a"], [[1]], [{}]), Shard(1, ["b"], [[2]], [{}])]
    for s in shards:
        store.write(s, [PromptResult(s.prompt_ids[0], 1, {}, {"x": 1.0}, {})])
    payload, marker = planted_pickle(tmp_path)
    (store.root / "evil.pkl").write_bytes(payload)
    (store.root / "shard-00007.pkl").write_bytes(payload)     # the old format's name
    with pytest.warns(UserWarning, match=r"not shards \(evil.pkl, shard-00007.pkl\).*never "
                                         r"loaded"):
        got = store.read_all(shards)
    assert [r.prompt_id for r in got] == ["a", "b"] and got[1].summary == {"x": 1.0}
    # disguised as a shard: refused in one line, still not executed
    store.path(shards[0]).write_bytes(payload)
    with pytest.raises(ShardError, match=r"shard-00000.npz is not a shard this project wrote"
                                         r".*delete it") as e, pytest.warns(UserWarning):
        store.read_all(shards)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_a_planted_pickle_in_the_local_scan_store_is_ignored(tmp_path):
    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    payload, marker = planted_pickle(tmp_path)
    kw = dict(prompts="builtin", max_prompts=2, k=3, measures="depth", figures=False,
              progress=False)
    ref = scan(None, out=str(tmp_path / "ref"), **kw)
    partial.mkdir()
    (partial / MARKER).write_text(json.dumps({"format": "coupling-owned/1", "kind": "shards",
                                              "files": []}))
    (partial / "shard-00000.pkl").write_bytes(payload)
    with pytest.warns(UserWarning, match="kept .*run.partial.*shard-00000.pkl"):
        res = scan(None, out=str(out), **kw)
    assert not marker.exists()
    np.testing.assert_array_equal(res.depth["normalized"], ref.depth["normalized"])
    assert sorted(os.listdir(partial)) == ["shard-00000.pkl"]   # ours removed, theirs kept


# ------------------------------------------------------------------------------------------
# --overwrite
# ------------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


SMALL = dict(prompts="builtin", max_prompts=1, k=2, measures="depth", progress=False)


def test_overwrite_replaces_a_previous_scan_and_refuses_foreign_files(tmp_path, capsys):
    from coupling.cli import main

    out = tmp_path / "run"
    first = scan(None, out=str(out), figures=True, **SMALL)
    assert (out / "figures" / "depth_coupling.png").exists()       # drawn after the marker
    old = json.loads((out / "manifest.json").read_text())["created"]
    (out / "notes.txt").write_text("my notes")
    (out / "figures" / "mine").mkdir()
    (out / "figures" / "mine" / "draft.png").write_bytes(b"png")
    before = _snapshot(out)
    rc = main(["scan", "--out", str(out), "--overwrite", "--max-prompts", "1", "--k", "2",
               "--measures", "depth", "--no-figures"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith(f"coupling: error: --overwrite refuses to replace {out}")
    assert "figures/mine/draft.png, notes.txt" in err and "nothing was deleted" in err
    assert _snapshot(out) == before
    # without the foreign files: replaced, nothing of the old one left beside it
    (out / "notes.txt").unlink()
    (out / "figures" / "mine" / "draft.png").unlink()
    (out / "figures" / "mine").rmdir()
    second = scan(None, out=str(out), overwrite=True, figures=False, **SMALL)
    assert json.loads((out / "manifest.json").read_text())["created"] >= old
    assert not (out / "figures").exists()             # the old scan's figures went with it
    assert sorted(os.listdir(tmp_path)) == ["run"]    # no .run.old-* / .run.partial-* left
    np.testing.assert_array_equal(first.depth["normalized"], second.depth["normalized"])


def test_overwrite_refuses_a_folder_that_is_not_a_scan(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"mine exists, is not empty and is not a coupling "
                                         r"scan output"):
        scan(None, out=str(out), overwrite=True, figures=False, **SMALL)
    assert _snapshot(out) == {"data.csv": b"1,2\n"}


@pytest.fixture(params=["memory", "file"])
def uri(request, tmp_path):
    if request.param == "memory":
        import fsspec
        yield f"memory://coupling-store-test/{tmp_path.name}/run"
        fsspec.filesystem("memory").rm(f"/coupling-store-test/{tmp_path.name}", recursive=True)
    else:
        yield f"file://{tmp_path}/bucket/run"


def _remote_snapshot(fs, root):
    return {f[len(root.rstrip('/')) + 1:]: fs.cat_file(f) for f in fs.find(root)}


def _previous_ray_output(uri, tmp_path, results):
    """What a distributed scan leaves at ``uri``, written by its own code paths."""
    from coupling.results.scan_output import write_scan_output
    from ray_jobs.output import SHARDS_DIR, Output

    output = Output(uri, str(tmp_path / "staging"))
    output.prepare(overwrite=False)
    store = ShardStore(output.local / SHARDS_DIR / "m")
    store.check_plan({"shards": [["a"]]})
    store.write(Shard(0, ["a"], [[1]], [{}]), results)
    output.push(f"{SHARDS_DIR}/m")
    write_scan_output(output.local / "m", {"format": "x"}, results)
    output.push("m")
    (output.local / "models.parquet").write_bytes(b"table")
    output.push("models.parquet")
    output.close()
    assert not output.local.exists()                 # the private staging copy is gone


def test_overwrite_on_a_uri_deletes_only_our_files(uri, tmp_path, tiny):
    from ray_jobs.output import Output

    ids = tiny.tokenizer("a b c", return_tensors="pt").input_ids
    res = analyze_prompt(tiny, ids, ScanSettings(k=2, measures="depth"), "a")
    _previous_ray_output(uri, tmp_path, [res])
    probe = Output(uri)
    fs, root = probe.fs, probe.root
    probe.close()
    ours = _remote_snapshot(fs, root)
    assert {".coupling-scan", "models.parquet", "_shards/m/shard-00000.npz",
            "_shards/m/plan.json", "m/summary.parquet", "m/.coupling-scan"} <= set(ours)
    payload, marker = planted_pickle(tmp_path)
    fs.pipe_file(f"{root}/_shards/m/evil.pkl", payload)
    fs.pipe_file(f"{root}/m/notes.txt", b"mine")
    before = _remote_snapshot(fs, root)
    with pytest.raises(ValueError, match=r"--overwrite refuses to replace .*run: it holds files "
                                         r"coupling did not write \(_shards/m/evil.pkl, "
                                         r"m/notes.txt\)") as e:
        Output(uri).prepare(overwrite=True)
    assert "\n" not in str(e.value)
    assert _remote_snapshot(fs, root) == before
    # resuming (no --overwrite) downloads the shards but never the planted file
    out = Output(uri)
    out.prepare(overwrite=False)
    staged = sorted(p.relative_to(out.local).as_posix() for p in out.local.rglob("*")
                    if p.is_file())
    assert "_shards/m/evil.pkl" not in staged and "_shards/m/shard-00000.npz" in staged
    assert oct(out.local.stat().st_mode & 0o777) == "0o700"
    out.close()
    assert not marker.exists()
    # without the foreign files, --overwrite deletes every file we wrote, one by one
    fs.rm_file(f"{root}/_shards/m/evil.pkl")
    fs.rm_file(f"{root}/m/notes.txt")
    out = Output(uri)
    out.prepare(overwrite=True)
    out.close()
    assert set(_remote_snapshot(fs, root)) == {".coupling-scan"}     # the fresh run's marker


def test_a_uri_that_is_not_a_scan_output_is_refused(uri):
    import fsspec

    from ray_jobs.output import Output

    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(f"{root}/data", exist_ok=True)
    fs.pipe_file(f"{root}/data/table.csv", b"1,2\n")
    with pytest.raises(ValueError, match=r"is not a distributed scan output \(it holds "
                                         r"data/table.csv\)"):
        Output(uri).prepare(overwrite=True)
    assert _remote_snapshot(fs, root) == {"data/table.csv": b"1,2\n"}
