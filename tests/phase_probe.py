"""``python tests/phase_probe.py PHASE STAMP MODULE [ARGS...]``: ``MODULE.main(ARGS)`` made slow inside one phase.

The stop-signal tests run this in a subprocess.  One library function of the phase is wrapped so that,
once the phase is entered, it writes ``STAMP`` (the test then knows the process is inside the phase and
sends the signal) and sleeps ``SLOW`` seconds per unit of work; nothing else changes, so what stops the
command is the library's own look at the stop flag (or its signal handler), not this probe.

    planning:E   the train split's data planning of epoch E and later (per document, 2 s; the planning
                 looks at the stop flag every 4 documents here instead of 4096, so that a tiny corpus is a
                 long planning)
    eval:K       the K-th validation pass of alum-train and later ones (per batch, 1 s)
    smooth       alum-train's smoothness evaluation (per batch, 1 s)
    save         alum-train's checkpoint saves, while the weights are written (5 s each)
    export       alum-export, while the HF folder is written into its temporary folder (30 s)
    prep         alum-prep, while documents are cleaned (per document, 30 s; in the pool's workers too)
    finetune:E   alum-finetune / alum-bench, in every training step of epoch E (0-based) and later (30 s)
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

PHASE, STAMP, MODULE, ARGS = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4:]


def announce_and_sleep(seconds: float) -> None:
    if not STAMP.exists():
        STAMP.write_text(f"{os.getpid()} {time.time()!r}")
    time.sleep(seconds)


def wrap(owner, name: str, before) -> None:
    orig = getattr(owner, name)

    def wrapped(*a, **kw):
        before(*a, **kw)
        return orig(*a, **kw)

    setattr(owner, name, wrapped)


def install(phase: str) -> None:
    kind, _, arg = phase.partition(":")
    if kind == "planning":
        from alum_pretrain.data import loader as L
        from alum_pretrain.data import plans as P

        P.PLAN_CHUNK_DOCS = 4
        epoch = {"now": -1, "split": ""}
        orig_plan = L.PretrainLoader.plan

        def plan(self, e):
            epoch["now"], epoch["split"] = e, self.split
            return orig_plan(self, e)

        L.PretrainLoader.plan = plan
        walk = next(v for k, v in vars(P).items() if k.endswith("PairWalk"))
        wrap(walk, "document", lambda *a, **k: (epoch["split"] == "train" and epoch["now"] >= int(arg)
                                                and announce_and_sleep(2.0)))
    elif kind == "eval":
        from alum_pretrain.engine import step as S

        count = {"n": 0}
        orig_eval = S.evaluate

        def evaluate(run, step):
            count["n"] += 1
            return orig_eval(run, step)

        S.evaluate = evaluate
        importlib.import_module("alum_pretrain.train").evaluate = evaluate
        wrap(S, "mlm_eval_batch", lambda *a, **k: count["n"] >= int(arg) and announce_and_sleep(1.0))
    elif kind == "smooth":
        from alum_pretrain import smoothness as SM

        name = next(k for k in vars(SM) if k.endswith("measure_batch"))
        wrap(SM, name, lambda *a, **k: announce_and_sleep(1.0))
    elif kind == "save":
        from alum_pretrain import models

        wrap(models, "save_model", lambda *a, **k: announce_and_sleep(5.0))
    elif kind == "export":
        from alum_pretrain import export

        wrap(export, "model_card", lambda *a, **k: announce_and_sleep(30.0))
    elif kind == "prep":
        from data_prep import work

        # a module-level helper of the workers' functions (those are pickled by name, so stay unwrapped)
        wrap(work, next(k for k in vars(work) if k.endswith("clean_doc")), lambda *a, **k: announce_and_sleep(30.0))
    elif kind == "finetune":
        from alum_pretrain.finetune import trainer

        name = next(k for k in vars(trainer) if k.endswith("train_epoch"))
        orig_epoch = getattr(trainer, name)

        def train_epoch(job, epoch, *a, **kw):
            if epoch >= int(arg or 0):
                wrap(job.method, "train_step", lambda *x, **y: announce_and_sleep(30.0))
            return orig_epoch(job, epoch, *a, **kw)

        setattr(trainer, name, train_epoch)
    else:
        raise SystemExit(f"phase_probe: unknown phase {phase!r}")


if __name__ == "__main__":
    install(PHASE)
    sys.exit(importlib.import_module(MODULE).main(ARGS))
