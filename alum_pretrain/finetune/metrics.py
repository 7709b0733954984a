"""Task metrics (GLUE): accuracy, F1 (positive class 1), Matthews correlation, Pearson/Spearman."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")


def compute_metrics(names, preds, labels) -> dict[str, float]:
    """``preds``: class ids (classification) or floats (regression); ``labels`` alike."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, preds))
        elif name == "f1":
            out[name] = float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0))
        elif name == "matthews":
            out[name] = float(matthews_corrcoef(labels, preds))
        elif name in ("pearson", "spearman"):
            if len(preds) < 2 or np.std(preds) == 0 or np.std(labels) == 0:
                out[name] = 0.0  # correlation undefined for constant predictions: report 0, not NaN
            else:
                fn = pearsonr if name == "pearson" else spearmanr
                out[name] = float(fn(preds, labels)[0])
        else:
            raise ValueError(f"--data.metric={name!r}: unknown metric (choose from {', '.join(METRICS)})")
    return out
