"""Per-step metrics of a Trainer subclass, averaged into ``trainer.state.log_history`` at each logging step."""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["MetricLogMixin"]


class MetricLogMixin:
    """Sums detached 0-dim metrics per micro-batch (no host sync) and turns them into per-step means.

    A micro-batch's metric is its contribution to the optimizer step's value (the engines' convention:
    the contributions of the accumulated micro-batches add up to the step's value), so the mean per step
    is ``sum * gradient_accumulation_steps / micro-batches``; with several processes it is averaged over
    them (one all-reduce and one host sync per logging step).
    """

    def accumulate_metrics(self, metrics: dict, keys: Iterable[str]) -> None:
        sums = self.__dict__.setdefault("_metric_sums", {})
        counts = self.__dict__.setdefault("_metric_counts", {})
        for k in keys:
            v = metrics.get(k)
            if isinstance(v, torch.Tensor):
                v = v.detach().float().reshape(())
                sums[k] = sums[k] + v if k in sums else v
                counts[k] = counts.get(k, 0) + 1

    def metric_means(self) -> dict[str, float]:
        """Per-step means of the metrics accumulated since the last call (then reset)."""
        sums = self.__dict__.get("_metric_sums", {})
        counts = self.__dict__.get("_metric_counts", {})
        self.__dict__["_metric_sums"], self.__dict__["_metric_counts"] = {}, {}
        if not sums:
            return {}
        ga = max(1, int(self.args.gradient_accumulation_steps))
        keys = sorted(sums)
        stacked = torch.stack([sums[k].to(self.args.device) * ga / counts[k] for k in keys])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="mean")
        return dict(zip(keys, stacked.tolist()))
