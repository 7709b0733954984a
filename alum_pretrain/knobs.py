"""One name per knob: the fairseq spelling of the native config keys, derived by one rule.

**Rule.**  The native key ``<section>.<field>`` (``alum-train --alum.k_steps``) is the fairseq option
``--<section>-<field>`` with underscores as hyphens (``fairseq-train --alum-k-steps``), i.e. the fairseq
dataclass field ``<section>_<field>``, with the native field's type, default and help text.  It covers
the sections the fairseq plugin implements: ``alum.*`` (:class:`~alum_pretrain.adversarial.ALUMConfig`,
options of the criterion ``alum_masked_lm``) and ``masking.*`` (:class:`~alum_pretrain.masking.MaskingConfig`,
options of the task ``alum_masked_lm``).  The plugin generates its option dataclasses from
:func:`dataclass_fields` and reads them back with :func:`from_flat`; ``alum-launch --engine fairseq`` writes
them with :func:`to_argv`.  This module does not import fairseq.

**Deprecated spellings** (:data:`DEPRECATED`, the plugin's names before the rule) stay accepted for one
release: they are extra options defaulting to None; a given one is mapped to its knob with a one-time
``FutureWarning`` (an error if the knob itself is also given with another value).
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .adversarial import PERTURB_AT, PROJECTIONS, ALUMConfig
from .divergence import DIVERGENCES
from .masking import SCHEDULES, MaskingConfig
from .passes import ADV_DROPOUT, OBJECTIVES, SCALES

__all__ = ["SECTIONS", "DEPRECATED", "Knob", "knobs", "flag_of", "dataclass_fields", "from_flat", "to_argv"]

#: section -> its native dataclass, for the sections the fairseq plugin implements
SECTIONS: dict[str, type] = {"alum": ALUMConfig, "masking": MaskingConfig}
#: str knobs with a closed set of values (the constants their dataclasses validate against)
_CHOICES: dict[str, tuple[str, ...]] = {"alum.projection": PROJECTIONS, "alum.perturb_at": PERTURB_AT,
                                        "alum.divergence": DIVERGENCES, "masking.schedule": SCHEDULES,
                                        "alum.adv_dropout": ADV_DROPOUT, "alum.objective": OBJECTIVES,
                                        "alum.scale": SCALES}
#: old fairseq spelling (its dataclass field) -> native key; accepted with a warning for one release
DEPRECATED: dict[str, str] = {
    "alum_k": "alum.k_steps",
    "alum_start_update": "alum.start_step",
    "mask_schedule": "masking.schedule",
    "mask_start_rate": "masking.start_rate",
    "mask_end_rate": "masking.end_rate",
    "mask_num_phases": "masking.num_phases",
    "mask_constant_rate": "masking.constant_rate",
    "mask_replace_prob": "masking.mask_prob",
    "mask_random_prob": "masking.random_prob",
    "mask_whole_words": "masking.whole_word",
    "mask_curriculum_updates": "masking.curriculum_steps",
    "valid_mask_rate": "masking.eval_rate",
}
_warned: set[str] = set()


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


@dataclass(frozen=True)
class Knob:
    """One native config field and its flat (fairseq) spelling."""

    section: str
    name: str
    type: type
    default: Any
    help: str
    choices: Optional[tuple[str, ...]]

    @property
    def key(self) -> str:
        """The native key, e.g. ``alum.k_steps``."""
        return f"{self.section}.{self.name}"

    @property
    def dest(self) -> str:
        """The flat field name, e.g. ``alum_k_steps``."""
        return f"{self.section}_{self.name}"

    @property
    def flag(self) -> str:
        """The flat option, e.g. ``--alum-k-steps``."""
        return _flag(self.dest)

    def convert(self, value: Any) -> Any:
        """A flat value (argparse / OmegaConf, enums included) as the native field's type."""
        if self.choices is not None or self.type is str:
            return str(value)
        return self.type(value)


def knobs(section: str) -> list[Knob]:
    """The knobs of ``section`` in field order (ValueError for a section the rule does not cover)."""
    if section not in SECTIONS:
        raise ValueError(f"knobs: unknown section {section!r} (known: {', '.join(SECTIONS)})")
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp not in (bool, int, float, str):
            raise TypeError(f"{section}.{f.name}: type {tp} has no flat spelling (bool, int, float or str only)")
        if tp is bool and f.default is not False:
            raise TypeError(f"{section}.{f.name}: a bool knob must default to false (its flag switches it on)")
        out.append(Knob(section, f.name, tp, f.default, f.metadata.get("help", ""),
                        _CHOICES.get(f"{section}.{f.name}")))
    return out


def flag_of(key: str) -> str:
    """``alum.k_steps`` -> ``--alum-k-steps`` (ValueError for an unknown key)."""
    section, _, name = key.partition(".")
    for k in knobs(section):
        if k.name == name:
            return k.flag
    raise ValueError(f"flag_of: {key!r} is not a field of {section}.*")


def _deprecated(section: str) -> list[tuple[str, Knob]]:
    by_key = {k.key: k for k in knobs(section)}
    return [(old, by_key[key]) for old, key in DEPRECATED.items() if key in by_key]


def dataclass_fields(section: str, choice_type: Callable[[list[str]], type]) -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` triples for ``dataclasses.make_dataclass``: one per knob (named
    :attr:`Knob.dest`, default and help from the native field) and one per deprecated spelling (Optional,
    default None).  ``choice_type(choices)`` makes the type of a knob with choices (fairseq's ChoiceEnum)."""
    def tp(k: Knob) -> Any:
        return choice_type(list(k.choices)) if k.choices is not None else k.type

    out = [(k.dest, tp(k), dataclasses.field(default=k.default, metadata={"help": k.help.replace("%", "%%")}))
           for k in knobs(section)]
    out += [(old, Optional[tp(k)], dataclasses.field(default=None, metadata={
        "help": f"deprecated spelling of {k.flag} (accepted for one release)"})) for old, k in _deprecated(section)]
    return out


def from_flat(section: str, values: Any) -> Any:
    """The native section config (e.g. an ``ALUMConfig``) from an object with the flat fields as attributes
    (a fairseq task/criterion config).  Deprecated spellings that are set are mapped with a one-time
    warning.  Validation errors name the flat option."""
    ks = knobs(section)
    kwargs = {k.name: k.convert(getattr(values, k.dest)) for k in ks}
    for old, k in _deprecated(section):
        v = getattr(values, old, None)
        if v is None:
            continue
        v = k.convert(v)
        if old not in _warned:
            _warned.add(old)
            warnings.warn(f"{_flag(old)} is deprecated and will be removed in the next release; use {k.flag} "
                          f"(the same knob as {k.key} of alum-train)", FutureWarning, stacklevel=2)
        if kwargs[k.name] != k.default and kwargs[k.name] != v:
            raise ValueError(f"{_flag(old)}={v!r} and {k.flag}={kwargs[k.name]!r}: the same option given twice "
                             f"with different values; keep {k.flag} only")
        kwargs[k.name] = v
    try:
        return SECTIONS[section](**kwargs)
    except ValueError as exc:
        msg = str(exc)
        for k in ks:
            if msg.startswith(k.key + "="):
                msg = k.flag + "=" + msg[len(k.key) + 1:]
        raise ValueError(msg) from None


def to_argv(section: str, cfg: Any) -> list[str]:
    """Flat options for every knob of ``cfg`` (a native section config); a bool knob as its flag when true."""
    argv: list[str] = []
    for k in knobs(section):
        v = getattr(cfg, k.name)
        if k.type is bool:
            argv += [k.flag] if v else []
        else:
            argv += [k.flag, str(v)]
    return argv
