"""``coupling`` command line: scan, report, correlate, perturb, checkpoints, study.

Every command's parser lives here and imports nothing heavy (the work is imported when a
command runs), so `coupling --help` and argument errors answer in well under a second.

Every user error is one line on stderr (``coupling: error: ...``) and exit code 2
(``COUPLING_DEBUG=1`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from coupling.errors import first_line
from coupling.settings.schema import CHECKPOINT_SCAN_FLAGS, add_flags, flag_values, yaml_only_help


class _Command:
    """``args.func``: imports ``module`` and calls its ``name(args)`` only when the command
    runs, so building the parser imports nothing heavy."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, args):
        return getattr(importlib.import_module(self.module), self.name)(args)


def add_scan_parser(sub):
    """``coupling scan``: its setting flags and their help come from :mod:`coupling.settings.schema`;
    the keys without a flag (config file only) and the Ray keys are listed after them."""
    epilog = "\n\n".join([yaml_only_help(), yaml_only_help(("ray",), "with --ray, config-file "
                                                                     "keys of the Ray scan")])
    p = sub.add_parser("scan", help="scan a model's coupling and trajectory regularity",
                       description="Scan a model (default: the embedded tiny GPT) over prompts.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with scan settings, the keys named as the flags "
                                    "(--max-prompts: max_prompts); CLI flags override it")
    add_flags(p)
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on a Ray cluster (ADDRESS, or a local one when omitted)")
    p.add_argument("--dry-run", action="store_true", default=False,
                   help="print the plan only: where the weights will be and the predicted "
                        "peak memory (with --ray: the placement plan; no actor starts)")
    p.set_defaults(func=cmd_scan)
    return p


def _levels_arg(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers, e.g. 0.01,0.1,1") from None


def add_report_parser(subparsers):
    p = subparsers.add_parser("report", help="draw the figures of a finished scan",
                              description="Draw the figures of a scan output directory into "
                                          "DIR/figures/ and print the files written.")
    p.add_argument("dir", metavar="DIR", help="output directory of a finished `coupling scan`")
    p.add_argument("--compare", metavar="DIR2",
                   help="a second scan drawn beside it (default: a sibling directory holding "
                        "the same model at the other --random-init, if any)")
    p.add_argument("--no-compare", action="store_true", help="draw this scan alone")
    p.add_argument("--prompt", default="0", metavar="N",
                   help="prompt (index or id) of the single-prompt figures (default 0)")
    p.set_defaults(func=_Command("coupling.figures.report", "main_report"))
    return p


def add_correlate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``coupling correlate`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "correlate", help="correlate per-model coupling with benchmark scores",
        description="Join scan results with a score table and fit coupling / hyper-parameters "
                    "against the score (paper Fig. 1a, 8, 9, Tables 3-4). With no RESULTS the "
                    "score table alone is analysed (e.g. --paper-table).")
    p.add_argument("results", nargs="*", help="scan output dirs, dirs with models.parquet, or "
                   "per-model .csv/.parquet files")
    p.add_argument("--scores", help="score table (.csv/.parquet) with an id column")
    p.add_argument("--paper-table", action="store_true",
                   help="use the paper's Table 1 (paper_table1.csv, shipped) as the score table")
    p.add_argument("--id-column", default="model", help="id column of the score table")
    p.add_argument("--score-column", action="append", dest="score_columns",
                   help="score column (repeatable; default openllm_score)")
    p.add_argument("--by", choices=["score", "params", "layers", "d_model", "train_tokens"], default="score",
                   help="main scatter: score = score vs coupling; else coupling vs that column")
    p.add_argument("--subset", help="pandas DataFrame.query expression, e.g. 'params_b == 7'")
    p.add_argument("--base-only", action="store_true", help="keep fine_tuned == false rows")
    p.add_argument("--coupling-metric", choices=("raw", "normalized"), default="raw",
                   help="raw m (Eq. 13, paper Fig. 1a) or normalized m~ (Eq. 14)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of the band")
    p.add_argument("--out", default="correlate_out", help="output directory")
    p.set_defaults(func=_Command("coupling.experiments.correlate", "cmd_correlate"))
    return p


def add_perturb_parser(subparsers):
    p = subparsers.add_parser(
        "perturb", help="noise on one token's input embedding, cosine per layer (Fig. 34)",
        description="Add Gaussian noise (sigma * ||x|| / sqrt(d) per coordinate) to one "
                    "token's input embedding and report the cosine similarity of its hidden "
                    "state with the clean one at every layer.")
    p.add_argument("--model", help="hub id or save_pretrained folder (default: embedded tiny model)")
    p.add_argument("--revision")
    p.add_argument("--random-init", action="store_true", help="fresh random weights instead")
    p.add_argument("--prompt", default="What is the capital of France? The capital is")
    p.add_argument("--levels", type=_levels_arg, default=[0.01, 0.03, 0.1, 0.3, 1.0],
                   help="noise levels sigma, comma separated (default 0.01,0.03,0.1,0.3,1)")
    p.add_argument("--token", type=int, default=-1, help="position to perturb (default -1: last)")
    p.add_argument("--samples", type=int, default=8, help="noise draws per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_Command("coupling.experiments.perturb", "cmd_perturb"))
    return p


def add_checkpoints_parser(subparsers):
    p = subparsers.add_parser(
        "checkpoints", help="scan every checkpoint of a training run (coupling vs step)",
        description="Scan the checkpoints listed in a YAML spec (local folders, globs, hub "
                    "revisions, DeepSpeed ZeRO directories) into OUT/step-<N>/, then write "
                    "OUT/dynamics.parquet and the training figures in OUT/figures/.")
    p.add_argument("spec", metavar="SPEC.yaml", help="checkpoint spec (configs/checkpoints_tiny.yaml)")
    p.add_argument("--out", required=True, help="output directory (finished steps are kept)")
    add_flags(p, only=CHECKPOINT_SCAN_FLAGS)
    p.add_argument("--adjacency-steps", help="comma list of steps for the adjacency graphs "
                                             "(default: first, middle, last)")
    p.add_argument("--step-figures", action="store_true",
                   help="also draw each checkpoint's own scan figures")
    p.add_argument("--overwrite", action="store_true", help="rescan finished steps")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_Command("coupling.experiments.checkpoints", "cmd_checkpoints"))
    return p


STUDY_PHASES = ("train", "scan", "vit", "prune", "analyses")   # coupling.experiments.study.runner.PHASES


def add_study_parser(subparsers):
    p = subparsers.add_parser(
        "study", help="train a model suite, scan it, analyse coupling vs performance",
        description="Train the language models and ViTs of a study spec (one factor varied at "
                    "a time), scan every checkpoint (on Ray: replicas over models), prune the "
                    "largest models, and write the tidy tables and the analyses into OUT. "
                    "Rerunning the same command resumes.")
    p.add_argument("spec", metavar="SPEC.yaml", help="study spec (configs/study.yaml)")
    p.add_argument("--out", required=True, help="output directory (finished work is kept)")
    p.add_argument("--device", default="cpu", help="training device: cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--local", action="store_true",
                   help="scan checkpoints one by one in this process instead of on Ray")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray on 127.0.0.1)")
    p.add_argument("--replicas", type=int, help="Ray replica actors (default: one per CPU)")
    p.add_argument("--phases", default=",".join(STUDY_PHASES),
                   help=f"comma list of phases to run (default all: {','.join(STUDY_PHASES)})")
    p.set_defaults(func=cmd_study)
    return p


# command -> parser builder, in the order `coupling --help` lists them
COMMANDS = {"scan": add_scan_parser, "report": add_report_parser,
            "correlate": add_correlate_parser, "perturb": add_perturb_parser,
            "checkpoints": add_checkpoints_parser, "study": add_study_parser}


def scan_config_dict(args) -> dict:
    """The scan's flat settings: the ``--config`` file's, the flags given over them, and a
    fresh ``runs/<model>-<time>`` when no ``out`` is given."""
    import time

    from coupling.scan import load_config_file

    data = load_config_file(args.config) if args.config else {}
    data.update(flag_values(args))
    if not data.get("out"):
        name = os.path.basename(str(data.get("model") or "tiny").rstrip("/")) or "model"
        data["out"] = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return data


def cmd_scan(args) -> int:
    from coupling.scan import ScanConfig, scan

    data = scan_config_dict(args)
    if args.ray:
        from ray_jobs.scan import \
            run_from_cli  # the distributed scanner (Ray) lives outside the library
        return run_from_cli(data, address=None if args.ray == "local" else args.ray,
                            dry_run=args.dry_run)
    config = ScanConfig.from_dict(data)
    if args.dry_run:        # the memory plan: nothing loaded, nothing written
        from coupling.scan import plan_memory

        print("\n".join(plan_memory(config).lines()))
        return 0
    result = scan(config=config, figures_in_background=True)
    print_summary(result)
    if config.figures:   # the results are written; the figures need not hold the exit
        print(f"figures    drawing into {os.path.join(str(result.out_dir), 'figures')} in the "
              f"background (`coupling report {result.out_dir}` draws them again)")
    if result.failures:   # exit code 3: finished, but some prompts failed
        print(f"failed     {len(result.failures)} of {len(result.failures) + len(result.summary)}"
              f" prompts (listed in {os.path.join(str(result.out_dir), 'failures.json')})")
        return 3
    return 0


def cmd_study(args) -> int:
    from coupling.experiments.study.config import load_study
    from coupling.experiments.study.runner import LocalScanner, run_study

    phases = tuple(x.strip() for x in args.phases.split(",") if x.strip())
    bad = sorted(set(phases) - set(STUDY_PHASES))
    if bad:
        raise ValueError(f"--phases: unknown phase(s) {bad}; choose from {','.join(STUDY_PHASES)}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device {args.device!r}: use cpu or cuda")
    spec = load_study(args.spec)
    if args.local:
        scanner = LocalScanner(threads=args.threads)
    else:
        from ray_jobs.study import RayScanner  # the distributed scanner lives outside the library
        scanner = RayScanner(args.address, args.replicas)   # GPUs per actor: as the cluster has
    try:
        run_study(spec, args.out, scanner, device=args.device, threads=args.threads,
                  phases=phases)
    finally:
        getattr(scanner, "close", lambda: None)()
    return 0


def print_summary(result):
    from coupling.results.scan_output import reliability_lines

    s = result.summary
    m = result.manifest["model"]
    print(f"model      {m['id']}  ({m['architecture']}, {m['n_layers']} layers, d={m['d_model']}, "
          f"{m['n_params']:,} params{', random init' if m.get('random_init') else ''})")
    print(f"prompts    {len(s)}  (mean {s['n_tokens'].mean():.1f} tokens)")
    if s["depth_mis_coupling_mean"].notna().any():
        print(f"mis-coupling m~ (normalized, mean over l!=l')  {s['depth_mis_coupling_mean'].mean():.4f} "
              f"+/- {s['depth_mis_coupling_mean'].std():.4f}")
        print(f"mis-coupling m (raw)                           {s['depth_mis_coupling_raw_mean'].mean():.4f}")
        for line in reliability_lines(result):   # gap flags, nan entries, SVD fall-backs
            print(line)
    if "lss" in s and s["lss"].notna().any():
        print(f"line-shape score LSS  {s['lss'].mean():.3f}    expodistance ED  {s['expodistance'].mean():.3f}")
    jac = result.manifest.get("jacobians")
    if jac:
        print(f"Jacobians  {jac['line']}")
    mem = result.manifest.get("memory")
    if mem:
        print(memory_line(mem))
    t = result.manifest["timings"]
    print(f"time       {t['per_prompt_s']:.2f} s/prompt   results in {result.out_dir}")


def memory_line(mem: dict) -> str:
    """The summary's ``memory`` line: measured peaks, the prediction, the weights mode."""
    from coupling.model.memory import gb

    device = (f", device peak {gb(mem['device_peak_bytes'])}"
              if mem.get("device_peak_bytes") is not None else "")
    predicted = (f" (predicted {gb(mem['predicted_peak_bytes'])})"
                 if mem.get("predicted_peak_bytes") else "")
    return (f"memory     host peak {gb(mem['host_peak_bytes'])}{predicted}{device}; "
            f"weights {mem['mode']}")


def build_parser() -> argparse.ArgumentParser:
    """The ``coupling`` parser, every command included."""
    parser = argparse.ArgumentParser(prog="coupling", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for builder in COMMANDS.values():
        builder(sub)
    return parser


def main(argv=None) -> int:
    # default to "scan" so `coupling` alone runs the embedded default
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        argv = ["scan"] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("coupling: interrupted; finished prompts are kept in OUT.partial: rerun "
              "with the same --out to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
        if os.environ.get("COUPLING_DEBUG"):
            raise
        print(f"coupling: error: {first_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
