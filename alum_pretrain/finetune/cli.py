"""``alum-finetune``: fine-tune a HuggingFace checkpoint on a GLUE-style task with plain, SMART/ALUM,
FreeLB, PGD, FreeAT or RIFT training.

    alum-finetune --model DIR --task sst2 --train train.tsv --dev dev.tsv --method freelb --out runs/x \\
        [--freelb.adv_lr=0.1 ...] [--config run.yaml]

Multi-GPU: ``torchrun --nproc_per_node N -m alum_pretrain.finetune.cli ...`` (same flags).
"""

from __future__ import annotations

import logging
import sys

from .. import stopping
from ..config import parse_config
from .config import ALIASES, FinetuneConfig

DESCRIPTION = __doc__.split("\n\n")[0] + """

Shorthands: --model = --model.path, --task = --data.task, --train = --data.train, --dev = --data.dev,
--test = --data.test, --method = --run.method, --out = --run.out, --seed = --run.seed.
Outputs in --out: best/ (HF folder of the best dev epoch), predictions_dev.tsv, results.json,
checkpoint.pt (resumed automatically when present)."""


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(FinetuneConfig, argv, prog="alum-finetune", description=DESCRIPTION, aliases=ALIASES)
    from .methods.base import NonFiniteError
    from .trainer import finetune

    try:
        with stopping.raising():  # a stop signal ends the run at once; OUT/checkpoint.pt keeps the last epoch
            res = finetune(cfg)
    except stopping.StopRequested as stop:
        return stopping.report("alum-finetune", stop, f"{cfg.run.out}/checkpoint.pt holds the last finished "
                               "epoch; the same command resumes from it")
    except ValueError as exc:
        print(f"alum-finetune: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:  # diverged: checkpoint.pt / best/ hold the last finite state
        print(f"alum-finetune: error: {exc}; {cfg.run.out}/checkpoint.pt holds the last finished epoch - "
              "lower --optim.lr", file=sys.stderr)
        return 3
    best = res["best"]
    if best is not None:
        print(f"best dev {res['metric']} = {best['score']:.4f} (epoch {best['epoch'] + 1}); "
              f"model in {cfg.run.out}/best")
    return 0


if __name__ == "__main__":
    sys.exit(main())
