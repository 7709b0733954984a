"""Values checked against the model, the data and the objective before any work starts.

A setting can be valid on its own (``__post_init__`` of its dataclass accepts it) and still make a run
meaningless or crash hours in: a sequence longer than the model's position table (a tensor-shape
traceback), a masking rate that leaves nothing to predict (an MLM loss of exactly 0), a validation that
measures zero tokens (an accuracy "of 0" or "of 1" from nothing).  The functions here compare a resolved
value with what it must fit and raise :class:`ValueError` naming the flag, its value, what it conflicts
with and what to do.  Every command calls them before it creates or touches its output folder:
``alum-train`` (:func:`check_pretrain_values` from ``engine.setup.check_inputs``), ``alum-finetune``,
``alum-smoothness``, the Trainer integration (``alum_pretrain.hf``) and the fairseq plugin share the
objective checks (:func:`check_masking`, :func:`check_alum`) and the model check (:func:`check_positions`).

The classes of values, and what each is checked against (docs/faults.md lists every row with its test):

* **model**: sequence lengths against the position table (:func:`usable_positions`: RoBERTa/XLM-R number
  positions from ``pad_token_id + 1``; relative-position DeBERTa has no limit); NSP against the segment
  (token type) vocabulary.
* **data**: the global batch against the number of sequences an epoch of the corpus can give
  (:func:`max_samples`), the validation split against emptiness.
* **objective**: every masking rate the schedule produces (> 0), the eval rate (> 0 when validation runs),
  the 80/10/10 split (some [MASK]); ALUM's step size and noise against the settings that make its term
  identically zero or pure dropout (its start step against the run's length: a warning); validation and
  smoothness batch counts.  A validation that still masks no token reports ``null``, never 0.

No torch import at module level and no engine import: every command can call these cheaply.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger("alum_pretrain.compat")

__all__ = ["bad_value", "flag_name", "usable_positions", "check_positions", "check_segments", "schedule_rates",
           "check_masking", "check_alum", "max_samples", "check_pretrain_values"]


def bad_value(flag: str, value: Any, conflict: str, remedy: str) -> ValueError:
    """The one error format: ``--flag=value: what it conflicts with; what to do``."""
    flag = flag if flag.startswith("-") else f"--{flag}"
    return ValueError(f"{flag}={value!r}: {conflict}; {remedy}")


def flag_name(section, key: str) -> str:
    """The command-line spelling of ``section.key``: ``--section.key``, or ``section(key)`` when ``section`` is
    a callable (the fairseq plugin's ``--masking-start-rate`` spelling)."""
    return section(key) if callable(section) else f"--{section}.{key}"


# ---- the model ------------------------------------------------------------------------------------


def usable_positions(hf_config) -> Optional[int]:
    """Tokens per sequence (specials included) the model's position embeddings can number; None = no limit.

    ``max_position_embeddings`` minus the family's offset: RoBERTa and XLM-R number positions from
    ``pad_token_id + 1`` (514 rows hold 512 tokens).  DeBERTa-v2/v3 without absolute positions
    (``position_biased_input=False``: relative, log-bucketed positions inside attention) has no limit."""
    from .families import family_of

    n = getattr(hf_config, "max_position_embeddings", None)
    if n is None or getattr(hf_config, "position_biased_input", True) is False:
        return None
    if family_of(hf_config).padding_positions:
        n -= int(getattr(hf_config, "pad_token_id", 1) or 0) + 1
    return int(n)


def check_positions(flag: str, value: int, hf_config, source: str) -> None:
    """``value`` tokens per sequence must fit ``source``'s position table (:func:`usable_positions`)."""
    limit = usable_positions(hf_config)
    flag = flag if flag.startswith("-") else f"--{flag}"
    if limit is not None and value > limit:
        off = "" if limit == hf_config.max_position_embeddings else (
            f" ({hf_config.max_position_embeddings} position rows, numbered from pad_token_id + 1)")
        raise bad_value(flag, value, f"the model {source} has positions for {limit} tokens per sequence{off}, "
                                     "so longer sequences would index past its position table",
                        f"use {flag}={limit} or less")


def check_segments(nsp: bool, hf_config, source: str) -> None:
    """Next-sentence prediction needs two segment (token type) ids to tell segment A from B."""
    types = int(getattr(hf_config, "type_vocab_size", 2) or 0)
    if nsp and types < 2:
        raise bad_value("data.nsp", True, f"the model {source} has type_vocab_size={types}: it cannot tell "
                                          "segment A from segment B", "set --data.nsp=false")


# ---- the objective -------------------------------------------------------------------------------


def schedule_rates(masking) -> dict[str, float]:
    """``{flag: rate}`` for the rates that bound every rate a :class:`~alum_pretrain.masking.MaskingConfig`
    schedule produces: the constant rate, or the curriculum's first and last phase (the phases in between
    lie on the line between them)."""
    if masking.schedule == "constant":
        return {"constant_rate": masking.constant_rate}
    if masking.num_phases == 1:
        return {"start_rate": masking.start_rate}
    return {"start_rate": masking.start_rate, "end_rate": masking.end_rate}


def check_masking(masking, *, section="masking", validation: bool = True, split: bool = True) -> None:
    """The masking schedule leaves something to predict at every step, and so does validation.

    A rate of 0 selects no token: the MLM loss is exactly 0 and its accuracy is computed over nothing.
    ``mask_prob = random_prob = 0`` keeps every selected token as it is (the task becomes copying the input,
    accuracy near 1 without learning anything); ``mask_prob = 0`` never shows the model ``[MASK]``, the
    token that validation and fill-mask put at the positions to predict.  ``validation``: also the eval
    rate; ``split``: also the 80/10/10 split (off where another component, e.g. a Trainer's collator, does
    the replacing)."""
    for key, rate in schedule_rates(masking).items():
        if rate <= 0:
            raise bad_value(flag_name(section, key), rate, f"the {masking.schedule} masking schedule would mask no "
                                                      "token at some steps: nothing to predict, an MLM loss of "
                                                      "exactly 0 and an accuracy over no token",
                            "give every phase a rate > 0 (BERT: a constant 0.15; ALUM: 0.05 -> 0.25)")
    if validation and masking.eval_rate <= 0:
        raise bad_value(flag_name(section, "eval_rate"), masking.eval_rate,
                        "validation would mask no token, so its loss and accuracy would be computed over nothing",
                        "use a rate > 0 (0.15)")
    if split and masking.mask_prob <= 0:
        what = ("every selected token stays unchanged: the task is copying the input and its accuracy is near 1 "
                "without learning") if masking.random_prob <= 0 else (
                "no selected token becomes [MASK], the token validation and fill-mask predict at")
        raise bad_value(flag_name(section, "mask_prob"), masking.mask_prob, what, "use a fraction > 0 (BERT: 0.8)")


def check_alum(alum, *, section="alum", max_steps: Optional[int] = None, nsp: Optional[bool] = None,
               strict: bool = True) -> list[str]:
    """ALUM's knobs against the settings that make its term meaningless (only when ``alpha > 0``).

    Refused (ValueError naming the flag): an ascent with step size 0 (K passes that cannot move delta) and NSP
    in R without an NSP head.  Warned about (logged, naming the flag): delta fixed at 0 - ``noise_std = 0``
    with ``k_steps = 0``: R is dropout disagreement alone (what ``objective=rdrop`` names), exactly 0 with
    ``adv_dropout=shared`` - the controls the tests and the delta-share measurement use; and
    ``start_step >= max_steps``, ALUM never switching on in this run - extending the run later
    (``--train.resume_override=train.max_steps``) is how the standard objective is trained first.
    ``strict=False`` (the Python API) logs the refusals as warnings too.  Returns the messages logged.
    ``section`` names the flags (``alum``, ``smart``, or a callable: see :func:`flag_name`)."""
    def f(key: str) -> str:
        return flag_name(section, key)

    if alum.alpha <= 0:
        return []
    warnings, errors = [], []
    if max_steps is not None and getattr(alum, "start_step", 0) >= max_steps:
        warnings.append(str(bad_value(
            f("start_step"), alum.start_step, f"ALUM will not switch on in this run of {max_steps} steps although "
                                              f"{f('alpha')}={alum.alpha} asks for it",
            f"it switches on only if the run is extended; lower {f('start_step')} below {max_steps}, or set "
            f"{f('alpha')}=0 for a run without ALUM")))
    if nsp is not None and getattr(alum, "include_nsp", False) and not nsp:
        errors.append(bad_value(f("include_nsp"), True, "the run has no NSP head, so there is no NSP distribution "
                                                        "to put into R", f"set {f('include_nsp')}=false, or train "
                                                                         "with NSP"))
    if alum.objective == "alum" and alum.k_steps > 0 and alum.step_size <= 0:
        errors.append(bad_value(f("step_size"), alum.step_size,
                                f"the {alum.k_steps} ascent step(s) of {f('k_steps')} would not move delta (each "
                                "costs a forward and a backward pass for nothing)",
                                f"use a step size > 0 (paper: 1e-3), or {f('k_steps')}=0 for a random perturbation"))
    if alum.objective == "alum" and alum.noise_std <= 0 and alum.k_steps == 0:
        what = "exactly 0 (both passes share their dropout masks)" if alum.adv_dropout == "shared" else (
            "the dropout disagreement alone, what objective=rdrop names")
        warnings.append(str(bad_value(f("noise_std"), alum.noise_std,
                                      f"with {f('k_steps')}=0 delta is exactly 0, so R is {what}, not the effect of "
                                      "a perturbation", "use a noise std > 0 (paper: 1e-5)")))
    if errors and strict:
        raise errors[0]
    warnings += [str(e) for e in errors]
    for w in warnings:
        log.warning(w)
    return warnings


# ---- the data ------------------------------------------------------------------------------------


def max_samples(sizes, max_seq_len: int) -> int:
    """An upper bound on the training sequences one pass over items of ``sizes`` tokens can give.

    No sequence holds fewer than one item's worth of tokens unless the item is cut to fit: pairs take
    whole sentences (truncated, never split) and blocks pack ``max_seq_len - 2`` tokens, so every item yields
    at most ``ceil(size / (max_seq_len - 3))`` sequences."""
    import numpy as np

    body = max(max_seq_len - 3, 1)
    s = np.maximum(np.asarray(sizes, dtype=np.int64), 1)
    return int(((s + body - 1) // body).sum())


def _check_batch_fits(databin, data, global_batch: int, batch_flag: str) -> None:
    """One global batch must fit in every epoch (``per_epoch``: each shard alone; ``interleave``: all)."""
    shards = [k for k in range(databin.num_shards) if databin.has_split(k, "train")]
    bounds = {k: max_samples(databin.split(k, "train").sizes, data.max_seq_len) for k in shards}
    if not bounds:
        return  # the loader names the missing train split
    if data.shard_mode == "per_epoch":
        shard, most = min(bounds.items(), key=lambda kv: kv[1])
        where = f"shard{shard} (one shard per epoch, --data.shard_mode=per_epoch)"
    else:
        most, where = sum(bounds.values()), "all shards together"
    if most < global_batch:
        raise bad_value(batch_flag, global_batch,
                        f"{databin.path}: {where} can give at most {most} sequences of --data.max_seq_len="
                        f"{data.max_seq_len}, fewer than one global batch of {global_batch}",
                        "lower --train.batch_size (or --train.grad_accum / --train.global_batch_size), or "
                        "prepare more data")


def _validation_on(cfg, databin) -> bool:
    """True when the run will evaluate: the data-bin has the validation split and eval_batches > 0; an
    existing but empty split is refused (there would be nothing to measure)."""
    split = cfg.data.valid_split
    shards = [k for k in range(databin.num_shards) if databin.has_split(k, split)]
    if not shards or cfg.train.eval_batches == 0:
        return False
    if all(len(databin.split(k, split)) == 0 for k in shards):
        raise bad_value("data.valid_split", split, f"{databin.path}: the {split!r} split holds no sequence in "
                                                   "any shard, so validation would measure nothing",
                        "re-run alum-prep with a held-out share, or name another split")
    return True


def check_pretrain_values(cfg, databin, *, global_batch: int, hf_config=None, model_source: str = "") -> bool:
    """Every ``alum-train`` value checked against the model, the data-bin and the objective.

    ``cfg``: the resolved ``TrainConfig``; ``hf_config``: the ``--model.init_from`` config (None: a scratch
    preset, whose position table is sized to ``--data.max_seq_len``).  Returns whether validation will run."""
    tc = cfg.train
    if hf_config is not None:
        check_positions("data.max_seq_len", cfg.data.max_seq_len, hf_config, model_source)
        check_segments(cfg.data.nsp, hf_config, model_source)
    batch_flag = "train.global_batch_size" if tc.global_batch_size else "train.batch_size"
    _check_batch_fits(databin, cfg.data, global_batch, batch_flag)
    validation = _validation_on(cfg, databin)
    check_masking(cfg.masking, validation=validation)
    check_alum(cfg.alum, max_steps=tc.max_steps, nsp=cfg.data.nsp)
    if tc.smooth_every:
        if tc.smooth_batches == 0:
            raise bad_value("train.smooth_batches", 0, f"--train.smooth_every={tc.smooth_every} asks for a "
                                                       "smoothness measurement over zero batches",
                            "use --train.smooth_batches >= 1, or --train.smooth_every=0")
        if not validation:
            why = ("--train.eval_batches=0 turns validation off" if tc.eval_batches == 0 else
                   f"{databin.path} has no {cfg.data.valid_split!r} split")
            raise bad_value("train.smooth_every", tc.smooth_every, f"smoothness is measured on validation batches "
                                                                   f"and {why}",
                            "set --train.smooth_every=0, or give the run a validation split")
    if cfg.masking.whole_word:
        from .data.tokens import build_token_tables

        if build_token_tables(databin).kind == "none":
            raise bad_value("masking.whole_word", True, f"the tokenizer of {databin.path} marks no word-piece "
                                                        "continuations, so whole-word masking would mask "
                                                        "single pieces", "set --masking.whole_word=false")
    if tc.eval_every and tc.eval_every > tc.max_steps and validation:
        log.info("--train.eval_every=%d > --train.max_steps=%d: validation runs at step 0 and at the end only",
                 tc.eval_every, tc.max_steps)
    return validation

