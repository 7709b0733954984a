"""The typed-config parser: defaults < YAML < flags, type conversion, clear errors, --help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from alum_pretrain.config import (add_dataclass_arguments, config_from_dict, config_to_dict, dataclass_from_args,
                                  diff_configs, opt, parse_config, section)


@dataclass
class _Optim:
    """Optimizer."""

    lr: float = opt(1e-4, "peak learning rate")
    betas: tuple[float, float] = opt((0.9, 0.999), "Adam betas")
    steps: int = opt(10, "number of steps")

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"--optim.lr must be > 0 (got {self.lr})")


@dataclass
class _Data:
    """Data."""

    path: str = opt("", "data-bin folder")
    nsp: bool = opt(True, "next-sentence prediction")
    mode: Literal["pairs", "blocks"] = opt("pairs", "sampling mode")
    tags: list[str] = opt([], "free tags")


@dataclass
class _Root:
    optim: _Optim = section(_Optim)
    data: _Data = section(_Data)


def test_defaults_yaml_and_flags_precedence(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("optim:\n  lr: 0.002\n  steps: 7\ndata:\n  mode: blocks\n")
    cfg = parse_config(_Root, ["--config", str(yml), "--optim.lr=3e-4", "--data.nsp", "false", "--optim.betas", "0.9,0.98"])
    assert cfg.optim.lr == pytest.approx(3e-4)  # flag beats YAML
    assert cfg.optim.steps == 7  # YAML beats default
    assert cfg.optim.betas == (0.9, 0.98)
    assert cfg.data.nsp is False and cfg.data.mode == "blocks"
    assert parse_config(_Root, ["--data.nsp"]).data.nsp is True  # bare bool flag
    assert parse_config(_Root, ["--optim.steps", "1e3"]).optim.steps == 1000


def test_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(_Root, ["--optim.lr=-1"])
    assert "--optim.lr must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(_Root, ["--data.mode", "nope"])
    assert "--data.mode must be one of pairs, blocks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(_Root, ["--optim.steps", "1.5"])
    assert "--optim.steps must be an integer" in capsys.readouterr().err
    yml = tmp_path / "bad.yaml"
    yml.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(SystemExit):
        parse_config(_Root, ["--config", str(yml)])
    assert "unknown key optim.lrr (did you mean optim.lr?)" in capsys.readouterr().err


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(_Root, ["--help"], prog="t")
    out = capsys.readouterr().out
    for flag, default in [("--optim.lr", "0.0001"), ("--optim.betas", "[0.9, 0.999]"), ("--data.path", '""'),
                          ("--data.nsp", "True"), ("--data.mode", "pairs"), ("--data.tags", "[]")]:
        assert flag in out and f"(default: {default})" in out


def test_dict_round_trip_and_diff():
    cfg = parse_config(_Root, ["--data.tags", "a,b"])
    d = config_to_dict(cfg)
    assert d["data"]["tags"] == ["a", "b"] and d["optim"]["betas"] == [0.9, 0.999]
    again = config_from_dict(_Root, d)
    assert again == cfg
    other = config_from_dict(_Root, {**d, "optim": {**d["optim"], "lr": 1.0}})
    assert diff_configs(cfg, other) == ["optim.lr"]
    assert diff_configs(cfg, other, ignore=["optim"]) == []


# ------------------------------------------------------------------------------------------------------
# Flat command lines: add_dataclass_arguments / dataclass_from_args
# ------------------------------------------------------------------------------------------------------
@dataclass
class _Flat:
    inputs: list[str] = opt(None, "input files", positional=True, metavar="INPUT")
    out: Path = opt(None, "output folder", required=True)
    fmt: str = opt("text", "format", choices=("text", "jsonl"))
    mode: Literal["a", "b"] = opt("a", "mode")
    shards: int = opt(1, "shard count")
    frac: float = opt(0.5, "a share of 100%")
    seed: int | None = opt(None, "seed")
    keep: bool = opt(False, "keep headings")
    progress: bool = opt(True, "progress bars")
    lowercase: bool | None = opt(None, "lower-case")
    env: list[str] = opt([], "KEY=VALUE (repeatable)", metavar="KEY=VALUE")
    models: list[str] = opt(None, "model folders", required=True, metavar="DIR")

    def __post_init__(self):
        if self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")


def _flat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flat")
    add_dataclass_arguments(p, _Flat)
    return p


def test_flat_flags_types_and_defaults():
    ns = _flat_parser().parse_args(["a", "b", "--out", "o", "--models", "m1", "m2"])
    cfg = dataclass_from_args(_Flat, ns)
    assert cfg == _Flat(inputs=["a", "b"], out=Path("o"), models=["m1", "m2"])
    assert (cfg.fmt, cfg.mode, cfg.shards, cfg.frac, cfg.seed) == ("text", "a", 1, 0.5, None)
    assert (cfg.keep, cfg.progress, cfg.lowercase, cfg.env) == (False, True, None, [])
    ns = _flat_parser().parse_args(["a", "--out", "o", "--models", "m", "--fmt", "jsonl", "--mode", "b",
                                    "--shards", "3", "--frac", "0.25", "--seed", "7", "--env", "A=1",
                                    "--env", "B=2"])
    cfg = dataclass_from_args(_Flat, ns)
    assert (cfg.fmt, cfg.mode, cfg.shards, cfg.frac, cfg.seed, cfg.env) == ("jsonl", "b", 3, 0.25, 7, ["A=1", "B=2"])
    assert _Flat(inputs=["x"]).env is not _Flat(inputs=["y"]).env  # list defaults are not shared


def test_flat_bool_flags():
    base = ["a", "--out", "o", "--models", "m"]
    cfg = dataclass_from_args(_Flat, _flat_parser().parse_args([*base, "--keep", "--no-progress", "--lowercase"]))
    assert (cfg.keep, cfg.progress, cfg.lowercase) == (True, False, True)
    cfg = dataclass_from_args(_Flat, _flat_parser().parse_args([*base, "--progress", "--no-lowercase"]))
    assert (cfg.progress, cfg.lowercase) == (True, False)
    with pytest.raises(SystemExit):  # a False-default bool is a plain switch: no --no-keep
        _flat_parser().parse_args([*base, "--no-keep"])


def test_flat_errors(capsys):
    base = ["a", "--out", "o", "--models", "m"]
    for argv, says in [([*base, "--fmt", "csv"], "argument --fmt: invalid choice: 'csv'"),
                       ([*base, "--mode", "c"], "argument --mode: invalid choice: 'c'"),
                       ([*base, "--shards", "x"], "argument --shards: invalid int value: 'x'"),
                       (["a", "--models", "m"], "the following arguments are required: --out"),
                       (["--out", "o", "--models", "m"], "the following arguments are required: INPUT"),
                       (["a", "--out", "o"], "the following arguments are required: --models")]:
        with pytest.raises(SystemExit):
            _flat_parser().parse_args(argv)
        assert says in capsys.readouterr().err, argv
    with pytest.raises(ValueError, match="--shards must be >= 1"):  # the dataclass's own checks run
        dataclass_from_args(_Flat, _flat_parser().parse_args([*base, "--shards", "0"]))


def test_flat_help_shows_defaults_choices_and_metavars():
    text = " ".join(_flat_parser().format_help().split())
    for part in ["INPUT input files", "--out OUT output folder", "--fmt {text,jsonl} format (default: text)",
                 "--mode {a,b} mode (default: a)", "--shards SHARDS shard count (default: 1)",
                 "a share of 100% (default: 0.5)", "--seed SEED seed", "--keep keep headings (default: False)",
                 "--progress, --no-progress progress bars (default: True)", "--lowercase, --no-lowercase lower-case",
                 "--env KEY=VALUE KEY=VALUE (repeatable)", "--models DIR [DIR ...] model folders"]:
        assert part in text, part
    for shown in ["seed (default", "lower-case (default", "(repeatable) (default", "output folder (default"]:
        assert shown not in text  # no default shown for None or an empty list


def test_flat_builder_refuses_a_type_without_a_command_line_form():
    @dataclass
    class _Bad:
        table: dict = opt({}, "a mapping")

    with pytest.raises(TypeError, match="_Bad.table"):
        add_dataclass_arguments(argparse.ArgumentParser(), _Bad)
