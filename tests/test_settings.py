"""The one settings schema (coupling.settings.schema): the dataclasses, the `coupling scan` flags and
their help, the YAML keys and the Ray config keys all come from it."""
import dataclasses
import subprocess
import sys

import pytest
import yaml

from coupling.cli import build_parser, scan_config_dict
from coupling.scan import ScanConfig
from coupling.settings import schema as S
from coupling.settings.scan_settings import ScanSettings
from ray_jobs.config import ENTRY_KEYS, RAY_KEYS, RayOptions, parse_config


def _fields(cls, skip=()):
    return [(f.name, f.default) for f in dataclasses.fields(cls) if f.name not in skip]


def test_dataclass_fields_are_the_schema():
    for cls, group, skip in ((ScanSettings, "analysis", ()), (ScanConfig, "scan", ("settings",)),
                             (RayOptions, "ray", ())):
        assert _fields(cls, skip) == [(s.name, s.default) for s in S.group(group)], cls
    assert RAY_KEYS == {s.name for s in S.group("ray")}
    assert {"dtype", "random_init", "placement", "stages", "replicas"} <= ENTRY_KEYS


def test_schema_choices_are_what_the_library_accepts():
    from coupling.model.trajectory import LAST_BLOCKS
    from coupling.spectrum.svd import METHODS

    assert S.BY_NAME["svd"].choices == METHODS
    assert S.BY_NAME["last_block"].choices == LAST_BLOCKS
    for name in ("svd", "jacobian", "token", "last_block"):     # each choice is accepted...
        for choice in S.BY_NAME[name].choices:
            assert getattr(ScanSettings(**{name: choice}), name) == choice
        with pytest.raises(ValueError):                          # ...and nothing else (YAML)
            ScanSettings(**{name: "bogus"})
    for choice in S.BY_NAME["placement"].choices:
        assert RayOptions(placement=choice).placement == choice


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scan", "--help"])
    return "".join(capsys.readouterr().out.split())   # argparse wraps at any width


def test_scan_help_lists_every_setting_with_its_help(capsys):
    text = _help_text(capsys)
    for s in S.SCHEMA:
        if s.deprecated:
            continue
        for f in s.flags:                                # a flag: its spelling and help
            assert "".join(f.spelling.split()) in text, f.spelling
            assert "".join(S.help_text(s, f).split()) in text, f.spelling
        if not s.flags:                                  # config file only: its key and help
            assert "".join((s.name + S.help_text(s)).split()) in text, s.name
    assert "(default10)" in text and "(default8)" in text    # defaults come from the schema


def _flag_and_yaml(s: S.Setting, f: S.Flag):
    """A non-default value of ``s``: (argv for flag ``f``, the YAML value)."""
    if f.const is not S.VALUE:
        return [f.spelling], f.const
    if s.name == "token_layers":
        return [f.spelling, "2,3"], [2, 3]
    if s.name == "measures":
        return [f.spelling, "depth,tokens"], ["depth", "tokens"]
    if s.name == "device":           # checked when the config is made, used only when scanning
        return [f.spelling, "cuda:1"], "cuda:1"
    if s.choices:
        value = next(c for c in s.choices if c != s.default)
    elif s.type.startswith("int"):
        value = 7
    else:
        value = "some/where"
    return [f.spelling, str(value)], value


@pytest.mark.parametrize("setting,flag", [(s, f) for s in S.SCHEMA for f in s.flags],
                         ids=lambda x: getattr(x, "spelling", None) or x.name)
def test_flag_and_yaml_key_give_the_same_config(tmp_path, setting, flag):
    argv, value = _flag_and_yaml(setting, flag)
    base = [] if setting.name == "out" else ["--out", str(tmp_path / "o")]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({setting.name: value}))
    parse = build_parser().parse_args
    by_flag = ScanConfig.from_dict(scan_config_dict(parse(["scan", *base, *argv])))
    by_yaml = ScanConfig.from_dict(scan_config_dict(parse(["scan", *base, "--config", str(cfg)])))
    assert by_flag == by_yaml
    if value != setting.default:                        # --final-norm-in-last: the default
        assert by_flag != ScanConfig.from_dict(scan_config_dict(parse(["scan", *base])))


def test_flags_override_the_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("k: 3\nfigures: true\nlss_window: 5\ntoken_layers: 1,2\nout: a\n")
    args = build_parser().parse_args(["scan", "--config", str(cfg), "--k", "5", "--no-figures",
                                      "--raw-last-block"])
    c = ScanConfig.from_dict(scan_config_dict(args))
    assert (c.settings.k, c.figures, c.settings.last_block) == (5, False, "raw")
    assert (c.settings.lss_window, c.settings.token_layers, c.out) == (5, (1, 2), "a")


def test_unknown_keys_name_the_closest_and_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError) as e:
        ScanConfig.from_dict({"max_token": 3})
    msg = str(e.value)
    assert "\n" not in msg and "did you mean 'max_tokens' for 'max_token'" in msg
    listed = msg.split("valid keys are ")[1].split(", ")
    assert listed == sorted(S.names("scan", "analysis") - {"final_norm_in_last"})
    with pytest.raises(ValueError) as e:
        parse_config({"shard_sise": 2})
    listed = str(e.value).split("valid keys are ")[1].split(", ")
    assert "shard_size" in str(e.value).split(":")[0]
    assert set(listed) == S.names("scan", "analysis", "ray") - {"final_norm_in_last"} | {"models"}


def test_deprecated_alias_still_accepted():
    with pytest.warns(DeprecationWarning):
        c = ScanConfig.from_dict({"final_norm_in_last": False})
    assert c.settings.last_block == "raw"


def test_bad_flag_values_are_argument_errors():
    code = "import coupling.cli as c; c.main(sys.argv[1:])"
    for argv, expect in ((["scan", "--token-layers", "2"], "token_layers must be two layers"),
                         (["scan", "--k", "x"], "argument --k: invalid int value: 'x'"),
                         (["scan", "--svd", "qr"], "argument --svd: invalid choice")):
        out = subprocess.run([sys.executable, "-c", "import sys; " + code, *argv],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and expect in out.stderr, (argv, out.stderr)
