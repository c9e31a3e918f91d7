"""GPU check: ``summary.md`` and ``summary.json``, every step's status, time and tables, and
the issue's goals read from what the steps measured."""
from __future__ import annotations

import json
from pathlib import Path

from gpu_check_common import cell


def goals(out: Path) -> list[str]:
    """The issue's goals, read from the step outputs (only what was measured)."""
    lines = []
    scan = _load(out, "scan") or []
    ok50 = [r for r in scan if r.get("K") == 50 and r.get("status") == "ok"]
    if ok50:
        best = min(ok50, key=lambda r: r["seconds"])
        dflt = next((r for r in ok50 if r["svd"] == "auto"), None)
        lines.append(f"- K = 50 scan of one prompt under 10 s: best {best['seconds']:.2f} s "
                     f"(svd={best['svd']}) -> {'met' if best['seconds'] < 10 else 'NOT met'}"
                     + (f"; the default (svd=auto) {dflt['seconds']:.2f} s" if dflt else
                        "; the default (svd=auto) not run"))
    ext = _load(out, "authors_extrapolated") or []
    full = next((r for r in ext if r["path"] == "full"), None)
    if full and ok50:
        exact = next((r for r in ok50 if r["svd"] == "exact"), None) or best
        sp = full["total_s"] / exact["seconds"]
        lines.append(f"- >= 20x faster than the authors' method: {full['total_s']:.1f} s "
                     f"({full['label']}) / {exact['seconds']:.2f} s measured (svd={exact['svd']}) "
                     f"= {sp:.1f}x -> {'met' if sp >= 20 else 'NOT met'}")
    cmp = _load(out, "authors_compare") or []
    mc = [r["rel_diff"] for r in cmp if str(r.get("what", "")).startswith("mis-coupling")]
    if mc:
        lines.append(f"- coupling within 1% of exact: max relative difference fast vs authors' "
                     f"{max(mc):.2e} -> {'met' if max(mc) < 0.01 else 'NOT met'}")
    return lines or ["- nothing measured that the goals need"]


def _load(out: Path, name: str):
    p = out / f"{name}.json"
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except json.JSONDecodeError:
        return None


def write_summary(out: Path, args, results: list[dict], wall: float):
    machine = _load(out, "machine") or {}
    lines = ["# GPU check summary", "",
             f"Machine: {machine.get('line', 'unknown (machine step did not finish)')}", "",
             f"Command: scripts/gpu_check.sh {out} --device {args.device}"
             f"{' --smoke' if args.smoke else ''}; steps {', '.join(args.steps)}; "
             f"wall {wall:.1f} s{' (SMOKE shapes: not LLM numbers)' if args.smoke else ''}", "",
             "| step | status | seconds | limit (s) | log | error |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | {r['limit_s']:.0f} "
                     f"| {r.get('log', '')} | {cell(r.get('error', ''))} |")
    lines += ["", "## Goals (issue 14)", ""] + goals(out) + [""]
    for name in ("machine_stack", "tests", "scan", "authors_extrapolated", "authors_compare",
                 "authors_layers", "svd", "svd_real_j", "stream"):
        md = out / f"{'stack' if name == 'machine_stack' else name}.md"
        if md.exists():
            lines += [md.read_text().rstrip(), ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"steps": results, "wall_s": wall,
                                                  "machine": machine, "goals": goals(out)},
                                                 indent=1, default=str))
