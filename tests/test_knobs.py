"""One name per knob (alum_pretrain/knobs.py): the --<section>-<field> rule, the flat round trip and the
deprecated fairseq spellings.  No fairseq needed (the plugin's parser is tested in test_fairseq.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from alum_pretrain import knobs
from alum_pretrain.adversarial import ALUMConfig
from alum_pretrain.masking import MaskingConfig
from conftest import ROOT

NON_DEFAULT = {
    "alum": ALUMConfig(alpha=3.0, epsilon=2e-5, step_size=5e-4, noise_std=3e-5, k_steps=2, projection="l2",
                       perturb_at="embedding_output", start_step=7, divergence="sym_kl", include_nsp=True,
                       log_baseline=True),
    "masking": MaskingConfig(schedule="constant", start_rate=0.1, end_rate=0.3, num_phases=4, constant_rate=0.2,
                             mask_prob=0.7, random_prob=0.2, whole_word=True, curriculum_steps=40, eval_rate=0.2),
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(knobs, "_warned", set())


def _flat(section, cfg, **extra):
    """What a fairseq config holds: every knob's dest (+ the deprecated fields, None unless given)."""
    values = {k.dest: getattr(cfg, k.name) for k in knobs.knobs(section)}
    values.update({old: None for old, key in knobs.DEPRECATED.items() if key.startswith(section + ".")})
    values.update(extra)
    return SimpleNamespace(**values)


def test_rule_names_every_field_of_the_sections():
    for section, cls in knobs.SECTIONS.items():
        names = [f.name for f in dataclasses.fields(cls)]
        ks = knobs.knobs(section)
        assert [k.name for k in ks] == names
        for k, f in zip(ks, dataclasses.fields(cls)):
            assert k.flag == f"--{section}-{f.name.replace('_', '-')}" and k.key == f"{section}.{f.name}"
            assert k.default == f.default and k.help == f.metadata["help"]
    assert knobs.flag_of("alum.k_steps") == "--alum-k-steps"
    assert knobs.flag_of("alum.start_step") == "--alum-start-step"
    assert knobs.flag_of("masking.mask_prob") == "--masking-mask-prob"
    with pytest.raises(ValueError, match="alum.nope"):
        knobs.flag_of("alum.nope")
    # every deprecated spelling maps to a knob of a section
    for old, key in knobs.DEPRECATED.items():
        knobs.flag_of(key)


@pytest.mark.parametrize("section", sorted(knobs.SECTIONS))
def test_flat_round_trip_and_argv(section):
    cfg = NON_DEFAULT[section]
    assert knobs.from_flat(section, _flat(section, cfg)) == cfg
    default = knobs.SECTIONS[section]()
    assert knobs.from_flat(section, _flat(section, default)) == default
    argv = knobs.to_argv(section, cfg)
    for k in knobs.knobs(section):
        if k.type is bool:
            assert (k.flag in argv) == getattr(cfg, k.name)
        else:
            assert argv[argv.index(k.flag) + 1] == str(getattr(cfg, k.name))
    assert not any(f.startswith("--") and f[2:].replace("-", "_") in knobs.DEPRECATED for f in argv)


def test_deprecated_spellings_are_mapped_with_one_warning():
    flat = _flat("alum", ALUMConfig(), alum_k=3, alum_start_update=9)
    with pytest.warns(FutureWarning, match="--alum-k is deprecated.*--alum-k-steps"):
        cfg = knobs.from_flat("alum", flat)
    assert (cfg.k_steps, cfg.start_step) == (3, 9)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        assert knobs.from_flat("alum", flat) == cfg
    flat = _flat("masking", MaskingConfig(), mask_replace_prob=0.6, mask_whole_words=True, mask_schedule="constant")
    with pytest.warns(FutureWarning, match="--mask-replace-prob"):
        m = knobs.from_flat("masking", flat)
    assert (m.mask_prob, m.whole_word, m.schedule) == (0.6, True, "constant")
    # old and new spelling with different values: refused, naming both
    with pytest.raises(ValueError, match="--alum-k=3.*--alum-k-steps=2"):
        knobs.from_flat("alum", _flat("alum", ALUMConfig(k_steps=2), alum_k=3))


def test_bad_values_name_the_flat_option():
    with pytest.raises(ValueError, match=r"^--alum-k-steps=-1"):
        knobs.from_flat("alum", _flat("alum", SimpleNamespace(**{**vars(ALUMConfig()), "k_steps": -1})))
    with pytest.raises(ValueError, match=r"^--masking-schedule='x'"):
        knobs.from_flat("masking", _flat("masking", SimpleNamespace(**{**vars(MaskingConfig()), "schedule": "x"})))


def test_knobs_and_launch_spec_do_not_import_fairseq():
    code = ("import sys; sys.modules['fairseq'] = None\n"
            "import alum_pretrain.knobs, launch.spec\n"
            "assert not any(m.startswith('fairseq') for m, v in sys.modules.items() if v)\nprint('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


def test_curriculum_length_and_eval_rate_are_one_knob_for_both_engines():
    """masking.curriculum_steps / masking.eval_rate of alum-train are the fairseq options
    --masking-curriculum-steps / --masking-eval-rate (what alum-launch writes, what the task reads back), and
    the plugin's former --mask-curriculum-updates / --valid-mask-rate map to the same values."""
    from alum_pretrain.config import parse_config
    from alum_pretrain.engine.config import TrainConfig

    native = parse_config(TrainConfig, ["--masking.curriculum_steps=40", "--masking.eval_rate=0.2"]).masking
    assert (native.curriculum_steps, native.eval_rate) == (40, 0.2)
    argv = knobs.to_argv("masking", native)
    assert argv[argv.index("--masking-curriculum-steps") + 1] == "40"
    assert argv[argv.index("--masking-eval-rate") + 1] == "0.2"
    assert knobs.from_flat("masking", _flat("masking", native)) == native
    with pytest.warns(FutureWarning, match="--mask-curriculum-updates is deprecated.*--masking-curriculum-steps"):
        old = knobs.from_flat("masking", _flat("masking", MaskingConfig(), mask_curriculum_updates=40,
                                               valid_mask_rate=0.2))
    assert old == native
    # one schedule for both engines: the curriculum length replaces the run's length
    assert native.rate_at(8, 1000) == MaskingConfig().rate_at(8, 40) == 0.10
    assert native.rate_at(8, 10) == MaskingConfig().rate_at(8, 40)
    with pytest.raises(ValueError, match="--masking-eval-rate=1.5"):
        knobs.from_flat("masking", _flat("masking", MaskingConfig(), masking_eval_rate=1.5))
    with pytest.raises(ValueError, match="--masking-curriculum-steps=-1"):
        knobs.from_flat("masking", _flat("masking", MaskingConfig(), masking_curriculum_steps=-1))
