"""``alum-train``: MLM (+NSP) pre-training with ALUM under the masking-rate curriculum (native engine).

Usage::

    alum-train --config alum_pretrain/configs/bert-base-scratch.yaml --data.path data-bin --train.output_dir runs/x
    torchrun --nproc_per_node 8 -m alum_pretrain.train --config ...      # DDP (NCCL on GPU, gloo on CPU)
    alum-train --help                                                    # every key with its default

The loop below reads top to bottom: mask -> forward (clean + ALUM in one module) -> backward -> clip ->
step -> log / evaluate / checkpoint.  Everything else is a component in :mod:`alum_pretrain.engine`.
An existing run in ``train.output_dir`` is resumed from its latest checkpoint; SIGTERM/SIGUSR1 and Ctrl-C
(SIGINT; a second one stops at once without saving) finish the current step, save a checkpoint and exit
0; one that arrives inside a longer phase (planning an epoch of data, an evaluation or smoothness pass)
cuts that phase short and saves the same way (the cut evaluation is not logged; :mod:`alum_pretrain.stopping`);
``OUTPUT/COMPLETED`` marks a finished run.  A second process on the same ``train.output_dir`` exits 2 at
once naming the first (:mod:`alum_pretrain.runlock`).
A step whose loss or gradient norm is NaN/Inf is skipped (no update, no LR-schedule step; ``nonfinite_skipped``
in the log); ``train.max_nonfinite`` of them in a row stop the run with exit code 3 naming the last good
checkpoint.  A checkpoint write that runs out of disk space exits 4 naming the folder, the bytes needed and
the last intact checkpoint (a warning comes earlier when free space is short).  Resume verifies checkpoints (checksums, safe loading, finite weights) and falls back past
damaged ones (:mod:`alum_pretrain.engine.checkpoint`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import stopping
from .atomic import write_json
from .config import parse_config
from .diskspace import DiskFullError
from .engine import distributed as D
from .engine.config import TrainConfig
from .engine.metrics import LOG, DeltaShareWatch
from .engine.plot import plot_run
from .engine.checkpoint import last_good_checkpoint, nan_remedy, restore, save
from .engine.setup import Checked, build_run, check_inputs, claim_output_dir
from .engine.step import NonFiniteError, evaluate
from .masking import SampleNoise
from .stopping import StopRequested


@dataclass
class Progress:
    """Where the loop stands: what a stop inside a phase between steps saves (:func:`stop_in_phase`)."""

    step: int  # optimizer steps done
    saved: int  # the newest step on disk (0: none)
    data: dict  # the training loader's state after ``step`` steps


def train(cfg: TrainConfig, env: D.DistEnv, checked: Optional[Checked] = None) -> dict:
    """Run (or resume) training; returns ``{"step", "completed", "stopped"}``."""
    run = build_run(cfg, env, checked)  # model, DDP step module, optimizer, schedule, scaler, loaders, logger
    step = restore(run)  # 0, or the step of the latest checkpoint in train.output_dir
    tc = cfg.train
    pbar = tqdm(total=tc.max_steps, initial=step, disable=not (env.is_main and tc.progress),
                desc="alum-train", dynamic_ncols=True)
    prog = Progress(step, step, run.loader.state_dict())
    stopped = True
    try:
        if step == 0 and run.valid is not None:  # the baseline (e.g. of a continual pre-training run)
            run.logger.log(evaluate(run, 0), write=pbar.write)
        if step < tc.max_steps:
            stopping.poll("set-up")  # a signal during setup / the baseline
        stopped = loop(run, prog, pbar)
    except StopRequested as stop:  # inside a phase (data planning, evaluation): save as between steps
        stop_in_phase(run, prog, stop)
    pbar.close()
    step = prog.step
    completed = step >= tc.max_steps
    if env.is_main and completed:  # the last step was checkpointed in the loop
        run.logger.close()
        plot_run(run.out / "log.jsonl", run.out / "plot.png", title=f"alum-train {run.out.name}",
                 alum_start=cfg.alum.start_step if cfg.alum.alpha > 0 else None)
        write_json(run.out / "COMPLETED", {"step": step, "max_steps": tc.max_steps}, durable=True)
        LOG.info("done: %d steps; log %s; plot %s", step, run.out / "log.jsonl", run.out / "plot.png")
    run.logger.close()
    return {"step": step, "completed": completed, "stopped": stopped}


def loop(run, prog: Progress, pbar) -> bool:
    """The optimizer steps from ``prog.step`` to ``train.max_steps``; True when a stop signal ended them."""
    cfg, env, tc = run.cfg, run.env, run.cfg.train
    batches = run.batches()
    acc = run.new_accumulator()
    watch = DeltaShareWatch(cfg, tc.log_every)  # says once if R is mostly dropout consistency
    step, stopped = prog.step, False
    nonfinite_run = 0  # consecutive skipped steps
    while step < tc.max_steps:
        # ---- masking (per sample, from (seed, step, global sample index); on the host) -------------
        rate = cfg.masking.rate_at(step, tc.max_steps)
        alum_on = cfg.alum.active(step)
        micro = [run.masker(next(batches), rate, step, run.sample_ids(m)) for m in range(run.grad_accum)]
        # Global masked-token count of this optimizer step -> the MLM mean over the whole global batch.
        n_masked = D.all_reduce_cpu(env, torch.tensor([float(sum(b["n_masked"] for b in micro))]))
        mlm_denom = max(n_masked.item(), 1.0) / env.world_size  # a host tensor: no device sync
        nsp_denom = run.global_batch / env.world_size

        # ---- forward (clean + ALUM) and backward, once per micro-batch (the engine's stepper) -------
        loss_sum = torch.zeros((), device=env.device)  # finiteness check only (no host sync here)
        for m, batch in enumerate(micro):
            # per-sample noise keys, computed where the model runs (the ids are B integers)
            gens = SampleNoise(tc.seed, step, batch["sample_ids"].to(run.gen_device)) if alum_on else None
            batch = run.to_device(batch)
            loss, metrics = run.stepper.forward_backward(batch, last=m == run.grad_accum - 1, alum_on=alum_on,
                                                         mlm_denom=mlm_denom, nsp_denom=nsp_denom,
                                                         alum_generators=gens, baseline=watch.probe(step, alum_on))
            acc.add(metrics, batch)
            loss_sum += loss.detach().float()

        # ---- clip, non-finite guard, optimizer step, schedule ---------------------------------------
        # A NaN/Inf loss or gradient (bf16/fp32) skips the update and the schedule; an fp16 overflow is
        # skipped and handled by the loss scaler.  The guard is the step's one host sync.
        out = run.stepper.optimizer_step(loss_sum)
        skip = out.skipped
        nonfinite_run = nonfinite_run + 1 if skip else 0
        step += 1
        prog.step, prog.data = step, run.loader.state_dict()  # what a stop in the evaluation below saves
        acc.end_step(out.grad_norm, rate, alum_on, out.lr, loss_ok=out.loss_ok, grad_ok=out.grad_ok, skipped=skip)
        pbar.update(1)
        give_up = nonfinite_run >= tc.max_nonfinite

        # ---- log / evaluate / checkpoint ------------------------------------------------------------
        if step % tc.log_every == 0 or step == tc.max_steps or give_up:
            record = acc.flush(step)  # the one host sync of the interval (all-reduce + .item())
            run.logger.log(record, write=pbar.write)
            watch.observe(record, run.logger.warning)
            if record["loss"] is not None:
                pbar.set_postfix(loss=f"{record['loss']:.3f}", rate=f"{record['mask_rate']:.2f}")
        if give_up:
            raise NonFiniteError(
                f"step {step}: the loss or gradient norm was NaN/Inf for {nonfinite_run} consecutive steps "
                f"(--train.max_nonfinite={tc.max_nonfinite}); those updates were skipped; "
                f"{last_good_checkpoint(run)}; {nan_remedy(run, step - nonfinite_run + 1)}")
        if run.valid is not None and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps):
            run.logger.log(evaluate(run, step), write=pbar.write)
        stopped = D.any_rank(env, stopping.requested() is not None)
        if stopped or step == tc.max_steps or (tc.save_every and step % tc.save_every == 0):
            save(run, step)
            prog.saved = step  # a signal that arrived during the save stops right after it
            stopped = stopped or (step < tc.max_steps and D.any_rank(env, stopping.requested() is not None))
        if stopped:
            run.logger.info(f"{stop_name()} received: saved step {step}, exiting (resume by re-running)")
            break
    watch.finish(run.logger.warning, step)
    return stopped


def stop_name() -> str:
    sig = stopping.requested()
    return f"signal {stopping.signal_name(sig)}" if sig is not None else "another rank's stop signal"


def stop_in_phase(run, prog: Progress, stop: StopRequested) -> None:
    """A stop signal inside a phase between steps (:mod:`alum_pretrain.stopping`): the steps done since the
    last checkpoint are saved with the data position they reached, as a stop between steps would (the
    interrupted evaluation is not logged; a planning interrupted before the first step saves nothing)."""
    if prog.step > prog.saved:
        if run.loader.state_dict() != prog.data:  # micro-batches drawn for the unfinished step are not spent
            run.loader.load_state_dict(prog.data)
        save(run, prog.step)
        prog.saved = prog.step
        run.logger.info(f"{stop} at step {prog.step}: saved step {prog.step}, exiting (resume by re-running)")
    else:
        run.logger.info(f"{stop} at step {prog.step}: nothing new to save, exiting (resume by re-running)")


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)


def run_training(cfg: TrainConfig) -> dict:
    """Set up the process group from torchrun's env, install the signal handlers, train, tear down."""
    # Handlers first: a preemption signal that arrives while the process group or the model is being
    # set up is remembered and honoured before the first step (exit 0) instead of being lost.
    with stopping.handlers(stopping.record):
        env = None
        failed = True  # until train() returns: the exception path must not run collectives (D.cleanup)
        try:
            env = D.setup(cfg.train.device)
            setup_logging(env.rank)
            # Every rank looks at the stop flag at the same points of a data planning (the plan is the same).
            stopping.set_poll((lambda flag: D.any_rank(env, flag)) if env.distributed else None)
            # A refused start or resume changes nothing on disk: check first, then lock the folder (one job
            # per output folder), then build the run in it.
            checked = check_inputs(cfg, env)
            lock = claim_output_dir(cfg, env)
            try:
                result = train(cfg, env, checked)
            finally:
                if lock is not None:
                    lock.release()
            failed = False
            return result
        finally:
            stopping.set_poll(None)
            if env is not None:
                D.cleanup(env, failed=failed)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, prog="alum-train", description=__doc__.split("\n\n")[0])
    try:
        run_training(cfg)
    except (ValueError, FileNotFoundError) as exc:  # user errors: one clear line, no traceback
        print(f"alum-train: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:  # diverged: nothing non-finite was checkpointed
        print(f"alum-train: error: {exc}", file=sys.stderr)
        return 3
    except DiskFullError as exc:  # the half-written checkpoint is removed; the previous one is intact
        print(f"alum-train: error: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
