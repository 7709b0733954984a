"""``plot.png``: the loss parts (mlm, nsp, adv) and the masking rate against the step, from ``log.jsonl``."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_file
from .metrics import read_log


def plot_run(log_path: str | os.PathLike, out_path: str | os.PathLike, title: str = "",
             alum_start: int | None = None) -> Path:
    """Draw the training curves of one run; written to a temp name and renamed (atomic).

    A record at step s covers the steps since the previous record, hence the ``pre`` steps; ``alum_start``
    (0-based optimizer step) marks where ALUM switched on (else: the first record with ALUM on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    # A resumed run re-logs nothing twice, but keep the last record per step in case it did.
    train = {r["step"]: r for r in records if r.get("kind", "train") == "train"}
    valid = {r["step"]: r for r in records if r.get("kind") == "valid"}
    steps = sorted(train)

    fig, (ax, ax_rate) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for key, style in (("loss", "-"), ("mlm", "-"), ("nsp", "--"), ("adv", ":")):
        xs = [s for s in steps if train[s].get(key) is not None]
        if xs and any(train[s][key] for s in xs):
            ax.plot(xs, [train[s][key] for s in xs], style, label=key)
    if valid:
        vs = sorted(valid)
        ax.plot(vs, [valid[s]["valid_mlm"] for s in vs], "o-", ms=3, label="valid mlm")
    if alum_start is None:
        alum_on = [s for s in steps if train[s].get("alum")]
        alum_start = alum_on[0] - 1 if alum_on else None
    if alum_start is not None and steps and alum_start < steps[-1]:
        ax.axvline(alum_start, color="grey", lw=0.8)
        ax.text(alum_start, ax.get_ylim()[1], " ALUM on", va="top", fontsize=8, color="grey")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "alum-train")
    ax.grid(alpha=0.3)
    ax_rate.step(steps, [100 * train[s]["mask_rate"] for s in steps], where="pre", color="tab:purple")
    ax_rate.set_ylabel("mask rate (%)")
    ax_rate.set_xlabel("optimizer step")
    ax_rate.grid(alpha=0.3)
    fig.tight_layout()

    out = Path(out_path)
    try:
        with atomic_file(out, keep_suffix=True) as tmp:  # plot.tmp.png: matplotlib picks the format by suffix
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out
