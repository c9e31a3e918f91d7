"""`coupling scan` draws its figures in a detached process after its summary
(coupling.figures.background): the figures still appear, a replaced scan gets none of the old
one's, and a failure leaves a file saying why instead of a lost message."""
from __future__ import annotations

import time

from coupling.cli import main
from coupling.figures.background import ERRORS_FILE, draw, manifest_digest

WAIT_S = 180      # a fresh python that imports matplotlib and draws, on a busy 2-core machine


def _wait_for(path, seconds=WAIT_S):
    t0 = time.monotonic()
    while not path.exists() and time.monotonic() - t0 < seconds:
        time.sleep(0.2)
    return path.exists()


def test_scan_exits_before_its_figures_and_they_appear(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["scan", "--max-prompts", "1", "--max-tokens", "8", "--k", "3",
               "--measures", "depth,regularity", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "in the background" in printed and f"coupling report {out}" in printed
    assert (out / "manifest.json").is_file()              # results first, figures after
    assert _wait_for(out / "figures" / "summary.txt"), "the detached drawing wrote nothing"
    names = {p.name for p in (out / "figures").iterdir()}
    assert {"depth_coupling.png", "layer_curves.png", "singular_values.png"} <= names
    assert ERRORS_FILE not in names


def test_a_replaced_scan_gets_none_of_the_old_figures_and_a_failure_is_written(tmp_path):
    out = tmp_path / "out"
    assert main(["scan", "--max-prompts", "1", "--max-tokens", "8", "--k", "3",
                 "--measures", "depth", "--no-figures", "--out", str(out)]) == 0
    old = manifest_digest(out)
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format"', '"format_"', 1))
    assert draw(out, old) == 0 and not (out / "figures").exists()   # not the scan it was
    assert draw(tmp_path / "gone", old) == 0 and not (tmp_path / "gone").exists()
    manifest.write_text("{not json")
    assert draw(out, manifest_digest(out)) == 1
    text = (out / "figures" / ERRORS_FILE).read_text()
    assert text.startswith("drawing the figures failed:") and f"coupling report {out}" in text
