"""GPU check: a stand-in for pytest (machines without it), what the two device test files use,
no more: fixtures (with params and scope), ``mark.parametrize``, ``raises``, ``warns``; a
``-k``-like filter and JUnit XML out (read by ``gpu_check_device_tests.junit_counts``)."""
from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
import time
import traceback
from pathlib import Path

from gpu_check_common import REPO


def _mini_pytest_module():
    import types
    import warnings

    m = types.ModuleType("pytest")

    def fixture(fn=None, *, scope="function", params=None):
        def wrap(f):
            f._fixture = (list(params) if params is not None else None, scope)
            return f
        return wrap(fn) if fn is not None else wrap

    class Mark:
        def parametrize(self, names, values):
            def wrap(f):
                f.__dict__.setdefault("_parametrize", []).append((names, list(values)))
                return f
            return wrap

        def __getattr__(self, name):           # pytest.mark.slow etc.: no effect here
            return lambda *a, **k: (lambda f: f)

    @contextlib.contextmanager
    def raises(exc, match=None):
        try:
            yield
        except exc as e:
            if match is not None and not re.search(match, str(e)):
                raise AssertionError(f"{e!r} does not match {match!r}") from e
        else:
            raise AssertionError(f"DID NOT RAISE {exc}")

    @contextlib.contextmanager
    def warns(category, match=None):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield seen
        if not any(issubclass(w.category, category)
                   and (match is None or re.search(match, str(w.message))) for w in seen):
            raise AssertionError(f"DID NOT WARN {category.__name__} matching {match!r}")

    m.fixture, m.mark, m.raises, m.warns = fixture, Mark(), raises, warns
    return m


def _cases(fn, fixtures):
    """``[(id, kwargs)]`` for a test: its parametrize marks times its parametrized fixtures."""
    import inspect
    import itertools

    axes = []
    for names, values in reversed(fn.__dict__.get("_parametrize", [])):
        names = [x.strip() for x in names.split(",")] if isinstance(names, str) else list(names)
        axes.append([(dict(zip(names, v if len(names) > 1 else [v])), str(v)) for v in values])
    for arg in inspect.signature(fn).parameters:
        f = fixtures.get(arg)
        if f is not None and f._fixture[0] is not None:
            axes.append([({f"@{arg}": p}, str(p)) for p in f._fixture[0]])
    out = []
    for combo in itertools.product(*axes):
        kw = {k: v for part, _ in combo for k, v in part.items()}
        out.append(("-".join(label for _, label in combo), kw))
    return out


def mini_pytest_main(argv) -> int:
    """Run the test functions of the given files without pytest; JUnit XML to ``argv[0]``,
    ``argv[1]`` a ``-k``-like filter (substrings joined by ' or ', empty: all)."""
    import inspect
    import types
    import xml.etree.ElementTree as ET

    junit, kexpr, files = argv[0], argv[1], argv[2:]
    sys.modules["pytest"] = _mini_pytest_module()
    # pytest's default ("prepend") import mode puts each test file's folder on sys.path: the
    # tests import their helper modules by name (``from gap_tolerance import ...``)
    for folder in dict.fromkeys(str(Path(f).resolve().parent) for f in files):
        sys.path.insert(0, folder)
    conftest = REPO / "tests" / "conftest.py"
    if conftest.exists():
        exec(compile(conftest.read_text(), str(conftest), "exec"), {"__name__": "conftest"})
    wanted = [w.strip() for w in kexpr.split(" or ") if w.strip()]
    suite = ET.Element("testsuite", name="gpu_check-mini")
    n = fails = 0
    for path in files:
        spec = importlib.util.spec_from_file_location(Path(path).stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fixtures = {k: v for k, v in vars(mod).items() if hasattr(v, "_fixture")}
        cache = {}

        def value(name, param):
            f = fixtures[name]
            key = (name, param)
            if key not in cache or f._fixture[1] == "function":
                req = types.SimpleNamespace(param=param)
                args = [req if a == "request" else value(a, None)
                        for a in inspect.signature(f).parameters]
                cache[key] = f(*args)
            return cache[key]

        for name, fn in list(vars(mod).items()):
            if not (name.startswith("test_") and callable(fn)):
                continue
            for cid, kw in _cases(fn, fixtures):
                tid = f"{Path(path).name}::{name}" + (f"[{cid}]" if cid else "")
                if wanted and not any(w in tid for w in wanted):
                    continue
                n += 1
                case = ET.SubElement(suite, "testcase", name=tid)
                t0 = time.perf_counter()
                try:
                    call = {a: kw[a] if a in kw else value(a, kw.get(f"@{a}"))
                            for a in inspect.signature(fn).parameters}
                    fn(**call)
                    print(f"PASSED {tid}", flush=True)
                except Exception:  # noqa: BLE001 - a failing test is recorded, not raised
                    fails += 1
                    ET.SubElement(case, "failure").text = traceback.format_exc()
                    print(f"FAILED {tid}\n{traceback.format_exc()}", flush=True)
                case.set("time", f"{time.perf_counter() - t0:.3f}")
    suite.set("tests", str(n))
    suite.set("failures", str(fails))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    ET.ElementTree(suite).write(junit)
    print(f"{n - fails} passed, {fails} failed (stand-in runner)")
    return 1 if fails or not n else 0
