"""Every scan setting, listed once: name, type, default, choices, help, group, CLI flag.

The dataclasses (``ScanSettings``, ``ScanConfig``, ``ray_jobs.config.RayOptions``) take their
fields and defaults from here (:func:`settings_dataclass`); ``coupling scan``'s flags and
help come from here (:func:`add_flags`, :func:`flag_values`); so do the valid YAML keys and
the "unknown config key" error (:func:`check_keys`) and the Ray config keys.

Groups: ``analysis`` (per prompt: ``ScanSettings``), ``scan`` (model, prompts, output:
``ScanConfig``), ``ray`` (how a Ray scan spreads its work: ``RayOptions``).

Plain data and the standard library only: ``coupling --help`` and argument errors must not
wait for torch.  Checks that need the library (SVD method names...) stay in the dataclasses'
``__post_init__``.
"""
from __future__ import annotations

import argparse
import textwrap
from collections import namedtuple

MEASURES = ("depth", "tokens", "regularity")
JACOBIAN_FUNCTIONS = ("local", "full")
VALUE = object()     # Flag.const for a flag that takes the setting's value
# The scan settings the `checkpoints` command lets a flag override (the rest: its spec).
CHECKPOINT_SCAN_FLAGS = ("prompts", "max_prompts", "k", "measures")


# namedtuples, not dataclasses: `import dataclasses` (inspect) costs ~10 ms of every
# `coupling --help`
class Flag(namedtuple("Flag", "spelling const help metavar", defaults=(VALUE, None, None))):
    """One command-line spelling of a setting: ``--k 3`` (``const=VALUE``: takes the value),
    ``--overwrite`` (``const=True``), ``--raw-last-block`` (sets ``last_block: raw``);
    ``help`` None: the setting's own; ``metavar`` None: argparse's."""

    __slots__ = ()


class Setting(namedtuple("Setting", "name group type default help choices flags per_model "
                                    "deprecated parser",
                         defaults=(None, (), False, False, None))):
    """One setting.  ``name``: the YAML key and the dataclass field; ``group``: analysis |
    scan | ray; ``type``: the field's annotation (``int | None``); ``flags``: its spellings
    on `coupling scan` (none: YAML only); ``per_model``: a models[] entry of a Ray config may
    set it; ``deprecated``: accepted, not listed among the valid keys; ``parser``: flag text
    -> value when not the type's own (token_layers)."""

    __slots__ = ()

    def parse(self, text: str):
        """A flag's text -> the value (argparse ``type``)."""
        if self.parser is not None:
            return self.parser(text)
        base = self.type.split("|")[0].strip()
        return {"int": int, "float": float}.get(base, str)(text)


def parse_token_layers(text) -> tuple:
    """``"2,3"`` (flag or YAML) or ``[2, 3]`` (YAML) -> ``(2, 3)``."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        layers = tuple(int(x) for x in parts)
    except (TypeError, ValueError):
        layers = ()
    if len(layers) != 2:
        raise ValueError(f"token_layers must be two layers l,l' (1-based), e.g. 2,3; "
                         f"got {text!r}")
    return layers


def _s(name, group, type_, default, help_, *flags, **kw) -> Setting:
    """A setting whose flags are given as spellings (``"--k"``) or ``Flag``s."""
    flags = tuple(Flag(f) if isinstance(f, str) else f for f in flags)
    return Setting(name, group, type_, default, help_, flags=flags, **kw)


_ON = dict(const=True)     # a switch: the flag sets the setting to true

SCHEMA: tuple[Setting, ...] = (
    # ---- scan: the model and the prompts (ScanConfig) ----
    _s("model", "scan", "str | None", None,
       "hub id, save_pretrained folder, or GGUF file (FILE.gguf or a folder holding one; "
       "dequantized) (default: the embedded tiny model)", "--model"),
    _s("revision", "scan", "str | None", None, "hub revision (with a hub id only)",
       "--revision"),
    _s("dtype", "scan", "str", "float32", "weights' dtype (Jacobians are always float32)",
       "--dtype", choices=("float32", "bfloat16", "float16"), per_model=True),
    _s("random_init", "scan", "bool", False,
       "same architecture, fresh random weights (seed --init-seed)",
       Flag("--random-init", **_ON), per_model=True),
    _s("init_seed", "scan", "int", 0, "seed of --random-init", "--init-seed", per_model=True),
    _s("trust_remote_code", "scan", "bool", False, "run the model repository's own code",
       Flag("--trust-remote-code", **_ON), per_model=True),
    _s("weights", "scan", "str", "auto",
       "where the weights are while the scan runs: memory (all loaded), disk (each block "
       "read from the safetensors files for its turn: models larger than memory), auto "
       "(memory when it fits, else disk; --dry-run says which and why)", "--weights",
       choices=("auto", "memory", "disk")),
    _s("device", "scan", "str", "cpu",
       "where a local scan computes: cpu, or one GPU (cuda, cuda:N); with --weights disk each "
       "block is moved to the GPU for its turn, so a model larger than the GPU fits "
       "(--dry-run predicts the GPU's peak)", "--device"),
    _s("block_path", "scan", "str | None", None,
       "dotted path of the block list if it is not found", "--block-path", per_model=True),
    _s("prompts", "scan", "str", "builtin", "builtin | FILE.jsonl | hf:NAME[:split]",
       "--prompts"),
    _s("max_prompts", "scan", "int | None", None, "first N prompts", "--max-prompts"),
    _s("prompt_seed", "scan", "int | None", None, "shuffle prompts with this seed first",
       "--prompt-seed"),
    _s("max_tokens", "scan", "int | None", None, "truncate prompts to their first N tokens",
       "--max-tokens"),
    # ---- analysis: what is measured on each prompt (ScanSettings) ----
    _s("k", "analysis", "int", 10, "top-K singular vectors", "--k"),
    _s("svd", "analysis", "str", "auto", "top-K SVD method (exact: always the full SVD)",
       "--svd", choices=("auto", "exact", "randomized", "lanczos")),
    _s("jacobian", "analysis", "str", "local",
       "local: the smallest exact function per Jacobian (one token with its prefix cached, "
       "in causal models); full: the whole prompt per product, the paper authors' method "
       "(same numbers, ~n times slower)", "--jacobian", choices=JACOBIAN_FUNCTIONS),
    _s("token", "analysis", "str", "last",
       "token whose J^l_tt the depth-wise grid uses (all: averaged over tokens)", "--token",
       choices=("last", "all")),
    _s("measures", "analysis", "tuple", ("depth", "regularity"),
       "comma list of " + ",".join(MEASURES), Flag("--measures", metavar="LIST")),
    _s("last_block", "analysis", "str", "with-final-norm",
       "with-final-norm: f^L = norm(block_L(X)) - X, X^L after the final norm (the paper's "
       "Eq. 7); raw: no final norm",
       Flag("--raw-last-block", const="raw",
            help="last block without the final norm, X^L before it (last_block: raw; "
                 "default: with it, the paper's Eq. 7)"),
       Flag("--final-norm-in-last", const="with-final-norm", help="deprecated: now the default"),
       choices=("with-final-norm", "raw")),
    _s("final_norm_in_last", "analysis", "bool | None", None,
       "deprecated alias: true = last_block: with-final-norm, false = raw", deprecated=True),
    _s("deflate_ln", "analysis", "bool", False,
       "remove the trivial directions of post-norm blocks (BERT; the last block with its "
       "final norm), verified per block; a no-op elsewhere", Flag("--deflate-ln", **_ON)),
    _s("token_layers", "analysis", "tuple | None", None,
       "l,l' (1-based) for token-wise coupling (default: the middle two)",
       Flag("--token-layers", metavar="L,L'"), parser=parse_token_layers),
    _s("lss_window", "analysis", "int", 11, "layers per window of the windowed line-shape score"),
    _s("n_iter", "analysis", "int", 4, "randomized SVD power iterations"),
    _s("oversample", "analysis", "int", 10, "randomized SVD oversampling"),
    _s("arpack_maxiter", "analysis", "int | None", None,
       "ARPACK restarts before its dense fall-back (default: by d)"),
    _s("seed", "analysis", "int", 0, "seed of the randomized and ARPACK SVDs"),
    _s("chunk", "analysis", "int | None", None,
       "products per batch (memory; default 128 one-token, 64 on many tokens)", "--chunk"),
    # ---- scan: the output (ScanConfig) ----
    _s("out", "scan", "str | None", None, "output directory (default runs/<model>-<time>)",
       "--out"),
    _s("overwrite", "scan", "bool", False, "replace a finished output directory",
       Flag("--overwrite", **_ON)),
    _s("figures", "scan", "bool", True, "draw the figures into OUT/figures/",
       Flag("--no-figures", const=False, help="do not draw the figures (figures: false)")),
    _s("threads", "scan", "int | None", None,
       "torch threads (default: 1 for d<=256, else all)", "--threads"),
    _s("fail_fast", "scan", "bool", False,
       "stop at the first prompt that fails (default: record it in failures.json, finish "
       "the others, exit with code 3)", Flag("--fail-fast", **_ON)),
    # ---- ray: how `coupling scan --ray` / `python -m ray_jobs.scan` spread the work ----
    _s("placement", "ray", "str", "auto", "auto | replicas (whole model per actor) | stages "
       "(block ranges)", choices=("auto", "replicas", "stages"), per_model=True),
    _s("stages", "ray", "int | None", None, "force block-range placement with this many stages",
       per_model=True),
    _s("replicas", "ray", "int | None", None, "force replica placement with this many actors",
       per_model=True),
    _s("shard_size", "ray", "int", 8, "prompts per shard (unit of work and of resume)"),
    _s("cpus_per_actor", "ray", "float", 1, "CPUs reserved per actor"),
    _s("gpus_per_actor", "ray", "float | None", None,
       "GPUs per actor (default: GPUs if the cluster has them; 0: CPU only)"),
    _s("node_memory_gb", "ray", "float | None", None,
       "usable memory per node (per GPU with GPUs), overriding what Ray reports"),
    _s("gpu_memory_gb", "ray", "float | None", None, "memory per GPU when Ray cannot tell"),
    _s("max_restarts", "ray", "int", 2, "actor restarts after a crash"),
    _s("max_task_retries", "ray", "int", 2, "retries of a task whose actor died"),
    _s("max_in_flight", "ray", "int | None", None,
       "stages: coupled prompts awaiting collection (default 2)"),
    _s("placement_timeout_s", "ray", "float", 600,
       "seconds to wait for the cluster (autoscaler) to offer resources"),
    _s("autoscaler_config", "ray", "str | None", None,
       "launcher YAML (default: the head's bootstrap copy)"),
    _s("staging_dir", "ray", "str | None", None, "local copy when out is a cloud URI"),
    _s("address", "ray", "str | None", None, "Ray address (--ray ADDRESS wins)"),
)

BY_NAME = {s.name: s for s in SCHEMA}


def group(name: str) -> tuple[Setting, ...]:
    return tuple(s for s in SCHEMA if s.group == name)


def names(*groups: str) -> set[str]:
    return {s.name for s in SCHEMA if s.group in groups}


# ------------------------------------------------------------------------------------------
# The dataclasses
# ------------------------------------------------------------------------------------------
def settings_dataclass(group_name: str):
    """Class decorator: the group's settings become the class's first fields (in schema
    order, with their defaults), before any field the class body declares itself."""
    from dataclasses import dataclass

    def wrap(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        annotations = {}
        for s in group(group_name):
            if s.name in own:
                raise TypeError(f"{cls.__name__}.{s.name} is declared in coupling.settings.schema: "
                                "remove it from the class body")
            annotations[s.name] = s.type
            setattr(cls, s.name, s.default)      # immutable defaults only (None, tuples...)
        annotations.update(own)
        cls.__annotations__ = annotations
        return dataclass(cls)
    return wrap


# ------------------------------------------------------------------------------------------
# YAML keys
# ------------------------------------------------------------------------------------------
def check_keys(data: dict, groups: tuple, extra: tuple = ()):
    """One-line ValueError naming the keys of ``data`` that no setting of ``groups`` (or
    ``extra``) has, the closest valid spelling, and every valid key."""
    known = names(*groups) | set(extra)
    bad = sorted(k for k in data if k not in known)
    if not bad:
        return
    import difflib

    listed = sorted(k for k in known if k not in BY_NAME or not BY_NAME[k].deprecated)
    hints = [f"{m[0]!r} for {k!r}" for k in bad
             for m in [difflib.get_close_matches(str(k), listed, n=1)] if m]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    raise ValueError(f"unknown config key(s) {bad}{hint}: valid keys are {', '.join(listed)}")


# ------------------------------------------------------------------------------------------
# Command-line flags
# ------------------------------------------------------------------------------------------
def help_text(s: Setting, flag: Flag | None = None) -> str:
    """The help of a flag (or of a YAML-only key): its own text, the setting's default
    appended where the text does not already say it."""
    if flag is not None and flag.help is not None:
        return flag.help
    text = s.help
    shown = s.type != "bool" and s.default is not None and "default" not in text
    return f"{text} (default {_yaml(s.default)})" if shown else text


def _yaml(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_flags(parser: argparse.ArgumentParser, groups=("scan", "analysis"), only=None):
    """Every flag of the settings of ``groups`` (or just the settings named in ``only``);
    each defaults to None (= not given), so that a ``--config`` file's value stands unless
    the flag is given."""
    chosen = [s for s in SCHEMA if s.group in groups and (only is None or s.name in only)]
    for s in chosen:
        for f in s.flags:
            if f.const is VALUE:
                parser.add_argument(f.spelling, dest=s.name, type=_flag_type(s),
                                    choices=s.choices, metavar=f.metavar,
                                    help=help_text(s, f))
            else:
                parser.add_argument(f.spelling, dest=s.name, action="store_const",
                                    const=f.const, help=help_text(s, f))
    parser.set_defaults(**{s.name: None for s in chosen if s.flags})


def _flag_type(s: Setting):
    def convert(text):
        try:
            return s.parse(text)
        except ValueError as e:   # argparse prints "argument --x: <this>" and exits 2
            raise argparse.ArgumentTypeError(str(e) if s.parser is not None
                                             else f"invalid {s.type} value: {text!r}")
    convert.__name__ = s.type.split("|")[0].strip()
    return convert


def flag_values(args: argparse.Namespace, groups=("scan", "analysis")) -> dict:
    """``{name: value}`` of the flags given on the command line."""
    return {s.name: getattr(args, s.name) for s in SCHEMA
            if s.group in groups and s.flags and getattr(args, s.name, None) is not None}


def yaml_only_help(groups=("scan", "analysis"), title="config-file keys without a flag") -> str:
    """Epilog lines ``name  help`` for the settings of ``groups`` that have no flag."""
    rows = [s for s in SCHEMA if s.group in groups and not s.flags and not s.deprecated]
    width = max((len(s.name) for s in rows), default=0)
    return "\n".join([f"{title}:"] + [textwrap.fill(help_text(s), 96, initial_indent=
                                                    f"  {s.name:<{width}}  ",
                                                    subsequent_indent=" " * (width + 4))
                                      for s in rows])
