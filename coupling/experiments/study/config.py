"""The study's YAML spec, expanded into the runs it trains and the scans it makes.

A spec (``configs/study.yaml``) names one base language model and the values each factor
takes when it alone is varied; the base model is trained with several seeds (the noise
floor), every variation with the first seed.  The ViT grid is a full product of stochastic
depth x weight decay x seeds.  Every key is checked: an unknown or mistyped key is a one-line
error naming the valid keys, never a silently ignored setting.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

# factor name (the table's ``factor`` column) -> the LMSpec field it varies
LM_FACTORS = {"width": "n_embd", "depth": "n_layer", "steps": "steps",
              "weight_decay": "weight_decay", "dropout": "dropout"}
VIT_FACTORS = ("stochastic_depth", "weight_decay")
# The scan variants: "main" is the one every analysis uses; the others answer analysis 2
# (does the shape over training depend on K or on the last-block convention?)
DEFAULT_VARIANTS = {"main": {}, "k2": {"k": 2}, "raw": {"last_block": "raw"}}
TOP_KEYS = {"name", "data", "lm", "scan", "vit", "pruning"}
DATA_KEYS = {"tokenizer", "max_chars", "corpus_seed", "mc_items", "mc_context", "mc_continuation",
             "mc_choices", "eval_windows"}
LM_KEYS = {"base", "seeds", "vary"}
SCAN_KEYS = {"prompts", "max_prompts", "max_tokens", "k", "variants", "replicas", "shard_size"}
VIT_KEYS = {"base", "seeds", "grid", "k", "n_images"}
PRUNING_KEYS = {"models", "max_removed", "n_random"}


@dataclass
class LMRun:
    """One language model of the suite: its name, the factor it varies, its training spec."""

    name: str
    factor: str          # "base" or a key of LM_FACTORS
    spec: dict           # LMSpec keyword arguments (name and seed included)


@dataclass
class StudySpec:
    name: str
    data: dict
    lm_runs: list
    scan: dict
    variants: dict
    vit_runs: list
    vit: dict
    pruning: dict
    raw: dict = field(default_factory=dict)

    def lm_run(self, name: str) -> LMRun:
        return next(r for r in self.lm_runs if r.name == name)


def _check(d, allowed: set, where: str) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    bad = sorted(set(d) - allowed)
    if bad:
        raise ValueError(f"{where}: unknown key(s) {bad}; valid keys: {', '.join(sorted(allowed))}")
    return dict(d)


def _seeds(value, where: str) -> list[int]:
    seeds = value if value is not None else [0]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ValueError(f"{where}.seeds must be a non-empty list of integers, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}.seeds lists a seed twice: {seeds}")
    return seeds


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def lm_runs(lm: dict) -> list[LMRun]:
    """Base model x seeds, then one run per (factor, value) at the first seed."""
    base = dict(lm.get("base") or {})
    seeds = _seeds(lm.get("seeds"), "lm")
    runs = [LMRun(f"base-s{s}", "base", {**base, "seed": s, "name": f"base-s{s}"}) for s in seeds]
    vary = _check(lm.get("vary"), set(LM_FACTORS), "lm.vary")
    for factor, values in vary.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"lm.vary.{factor} must be a non-empty list of values")
        key = LM_FACTORS[factor]
        for v in values:
            if base.get(key) == v:
                raise ValueError(f"lm.vary.{factor} lists the base value {v!r}: the base runs "
                                 "already have it; remove it")
            name = f"{factor}-{_fmt(v)}"
            runs.append(LMRun(name, factor, {**base, key: v, "seed": seeds[0], "name": name}))
    return runs


def vit_runs(vit: dict) -> list[dict]:
    grid = _check(vit.get("grid"), set(VIT_FACTORS), "vit.grid")
    axes = [grid.get(k, [vit.get("base", {}).get(k, 0.0)]) for k in VIT_FACTORS]
    for k, values in zip(VIT_FACTORS, axes):
        if not isinstance(values, list) or not values:
            raise ValueError(f"vit.grid.{k} must be a non-empty list of numbers")
    runs = []
    for sd, wd, seed in itertools.product(*axes, _seeds(vit.get("seeds"), "vit")):
        name = f"vit-sd{_fmt(sd)}-wd{_fmt(wd)}-s{seed}"
        runs.append({**vit.get("base", {}), "stochastic_depth": sd, "weight_decay": wd,
                     "seed": seed, "name": name})
    return runs


def parse_study(data: dict) -> StudySpec:
    """Validate a spec mapping; every problem is a one-line ValueError."""
    data = _check(data, TOP_KEYS, "study spec")
    raw = copy.deepcopy(data)
    lm = _check(data.get("lm"), LM_KEYS, "lm")
    if not lm:
        raise ValueError("the study spec needs an 'lm' section (base, seeds, vary)")
    scan = _check(data.get("scan"), SCAN_KEYS, "scan")
    variants = scan.pop("variants", None) or DEFAULT_VARIANTS
    if "main" not in variants:
        raise ValueError("scan.variants must include 'main' (the scan every analysis uses)")
    for name, v in variants.items():
        v = _check(v, {"k", "last_block", "factors"}, f"scan.variants.{name}")
        bad = sorted(set(v.get("factors") or []) - {"base", *LM_FACTORS})
        if bad:
            raise ValueError(f"scan.variants.{name}.factors: unknown factor(s) {bad}; use "
                             f"base, {', '.join(LM_FACTORS)}")
    vit = _check(data.get("vit"), VIT_KEYS, "vit")
    pruning = _check(data.get("pruning"), PRUNING_KEYS, "pruning")
    spec = StudySpec(name=str(data.get("name", "study")),
                     data=_check(data.get("data"), DATA_KEYS, "data"), lm_runs=lm_runs(lm),
                     scan=scan, variants=variants, vit_runs=vit_runs(vit) if vit else [],
                     vit=vit, pruning=pruning, raw=raw)
    _check_pruning(spec)
    return spec


def _check_pruning(spec: StudySpec):
    names = {r.name for r in spec.lm_runs}
    models = spec.pruning.get("models", "largest")
    if models != "largest":
        if not isinstance(models, list) or not models:
            raise ValueError("pruning.models must be 'largest' or a list of run names")
        unknown = sorted(set(models) - names)
        if unknown:
            raise ValueError(f"pruning.models names unknown runs {unknown}; runs: "
                             f"{', '.join(sorted(names))}")


def load_study(path) -> StudySpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study spec {path} does not exist: give a YAML file such as "
                         "configs/study.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_study(data or {})


def spec_dict(obj) -> dict:
    """A dataclass or mapping as a plain dict (for JSON records)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
