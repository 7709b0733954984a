"""The typed-config parser: defaults < YAML < flags, type conversion, clear errors, --help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from alum_pretrain.config import config_from_dict, config_to_dict, diff_configs, opt, parse_config, section


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
