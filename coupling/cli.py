"""``coupling`` command line: scan, report, correlate, perturb.

Every user error is one line on stderr (``coupling: error: ...``) and exit code 2
(``COUPLING_DEBUG=1`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys

from .analysis import ScanSettings

DEFAULTS = ScanSettings()


def _int_or_none(s):
    return None if s in (None, "", "none") else int(s)


def add_scan_parser(sub):
    p = sub.add_parser("scan", help="scan a model's coupling and trajectory regularity",
                       description="Scan a model (default: the embedded tiny GPT) over prompts.")
    p.add_argument("--config", help="YAML file with scan settings (CLI flags override it)")
    p.add_argument("--model", help="hub id or save_pretrained folder (default: embedded tiny model)")
    p.add_argument("--revision")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--random-init", action="store_true", default=None,
                   help="same architecture, fresh random weights (seed --init-seed)")
    p.add_argument("--init-seed", type=int)
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    p.add_argument("--block-path", help="dotted path of the block list if it is not found")
    p.add_argument("--prompts", help="builtin | FILE.jsonl | hf:NAME[:split]")
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--prompt-seed", type=int, help="shuffle prompts with this seed first")
    p.add_argument("--max-tokens", type=int, help="truncate prompts to their first N tokens")
    p.add_argument("--k", type=int, help=f"top-K singular vectors (default {DEFAULTS.k})")
    p.add_argument("--svd", choices=["auto", "exact", "randomized", "lanczos"])
    p.add_argument("--jacobian", choices=["local", "full"],
                   help="local (default): the smallest exact function per Jacobian (one token "
                        "with its prefix cached, in causal models); full: the whole prompt per "
                        "product, the paper authors' method (same numbers, ~n times slower)")
    p.add_argument("--chunk", type=int, help="products per batch (default 128 local, 64 full)")
    p.add_argument("--token", choices=["last", "all"])
    p.add_argument("--measures", help="comma list of depth,tokens,regularity")
    p.add_argument("--final-norm-in-last", action="store_true", default=None,
                   help="include the final norm in the last block's Jacobian")
    p.add_argument("--deflate-ln", action="store_true", default=None,
                   help="project out trivial LayerNorm/RMSNorm directions before the SVD")
    p.add_argument("--token-layers", help="l,l' (1-based) for token-wise coupling")
    p.add_argument("--out", help="output directory (default runs/<model>-<time>)")
    p.add_argument("--overwrite", action="store_true", default=None)
    p.add_argument("--threads", type=int, help="torch threads (default: 1 for d<=256, else all)")
    p.add_argument("--no-figures", dest="figures", action="store_false", default=None)
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on a Ray cluster (ADDRESS, or a local one when omitted)")
    p.set_defaults(func=cmd_scan)


def _scan_overrides(args) -> dict:
    keys = ["model", "revision", "dtype", "random_init", "init_seed", "trust_remote_code",
            "block_path", "prompts", "max_prompts", "prompt_seed", "max_tokens", "k", "svd",
            "jacobian", "chunk", "token", "measures", "final_norm_in_last", "deflate_ln", "out", "overwrite",
            "figures", "threads"]
    d = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.token_layers:
        d["token_layers"] = tuple(int(x) for x in args.token_layers.split(","))
    return d


def cmd_scan(args) -> int:
    import time

    from .scan import ScanConfig, load_config_file, scan

    data = load_config_file(args.config) if args.config else {}
    data.update(_scan_overrides(args))
    if not data.get("out"):
        name = os.path.basename(str(data.get("model") or "tiny").rstrip("/")) or "model"
        data["out"] = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.ray:
        from ray_jobs.scan import run_from_cli  # the distributed scanner (Ray) lives outside the library
        return run_from_cli(data, address=None if args.ray == "local" else args.ray)
    config = ScanConfig.from_dict(data)
    result = scan(config=config)
    print_summary(result)
    return 0


def print_summary(result):
    s = result.summary
    m = result.manifest["model"]
    print(f"model      {m['id']}  ({m['architecture']}, {m['n_layers']} layers, d={m['d_model']}, "
          f"{m['n_params']:,} params{', random init' if m.get('random_init') else ''})")
    print(f"prompts    {len(s)}  (mean {s['n_tokens'].mean():.1f} tokens)")
    if s["depth_mis_coupling_mean"].notna().any():
        print(f"mis-coupling m~ (normalized, mean over l!=l')  {s['depth_mis_coupling_mean'].mean():.4f} "
              f"+/- {s['depth_mis_coupling_mean'].std():.4f}")
        print(f"mis-coupling m (raw)                           {s['depth_mis_coupling_raw_mean'].mean():.4f}")
    if "lss" in s and s["lss"].notna().any():
        print(f"line-shape score LSS  {s['lss'].mean():.3f}    expodistance ED  {s['expodistance'].mean():.3f}")
    t = result.manifest["timings"]
    print(f"time       {t['per_prompt_s']:.2f} s/prompt   results in {result.out_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coupling", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_scan_parser(sub)
    from .checkpoints import add_checkpoints_parser
    from .correlate import add_correlate_parser
    from .perturb import add_perturb_parser
    from .report import add_report_parser

    for add in (add_report_parser, add_correlate_parser, add_perturb_parser,
                add_checkpoints_parser):
        add(sub)
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
        print("coupling: interrupted; no partial results were written", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
        if os.environ.get("COUPLING_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"coupling: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
