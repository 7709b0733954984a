"""The ``alum-bench`` summary: per (checkpoint, method, column) the seeds' median and range, the paired rows
of later checkpoints against the first, and the Markdown table of both.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .bench_suite import Suite
from .tasks import get_task


def _columns(suite: Suite) -> list[tuple[str, str]]:
    """(column key, header) in table order: per task its dev metric, then each robust set."""
    cols = []
    for t in suite.tasks:
        metric = get_task(t.task).metric
        cols.append((f"{t.name}/dev", f"{t.name} dev ({metric})"))
        for r in t.robust:
            cols.append((f"{t.name}/{r.name}", f"{t.name} {r.name} (acc)"))
            if r.attack.get("enabled", False):
                cols.append((f"{t.name}/{r.name}/attacked", f"{t.name} {r.name} attacked (acc)"))
    return cols


def _value(rec: dict, col: str) -> Optional[float]:
    task, _, rest = col.partition("/")
    if rest == "dev":
        v = rec["dev"].get(rec["metric"])
    elif rest.endswith("/attacked"):
        v = rec["robust"].get(rest[:-len("/attacked")], {}).get("attacked_accuracy")
    else:
        v = rec["robust"].get(rest, {}).get("accuracy")
    return None if v is None else 100.0 * float(v)


def summarise(suite: Suite, checkpoints: list[str], records: list[dict]) -> dict:
    """Per (checkpoint, method, column): per-seed values, median, min, max (non-finite values counted apart);
    per later checkpoint vs the first: per-seed differences (seeds both have), median and sign count."""
    cols = _columns(suite)
    methods = list(dict.fromkeys(m for t in suite.tasks for m in t.methods))
    summary: dict = {}
    for ck in checkpoints:
        for m in methods:
            row = {}
            for key, _ in cols:
                task = key.split("/")[0]
                vals = {r["seed"]: _value(r, key) for r in records
                        if r["checkpoint"] == ck and r["method"] == m and r["task"] == task}
                if not vals:
                    continue
                finite = [v for v in vals.values() if v is not None and math.isfinite(v)]
                row[key] = {"values": {str(s): v for s, v in sorted(vals.items())}, "n": len(finite),
                            "non_finite": len(vals) - len(finite),
                            "median": float(np.median(finite)) if finite else None,
                            "min": min(finite) if finite else None, "max": max(finite) if finite else None}
            if row:
                summary.setdefault(ck, {})[m] = row
    paired = []
    base = checkpoints[0]
    for ck in checkpoints[1:]:
        for m in methods:
            row = {}
            for key, _ in cols:
                a = (summary.get(base, {}).get(m, {}).get(key) or {}).get("values", {})
                b = (summary.get(ck, {}).get(m, {}).get(key) or {}).get("values", {})
                diffs = {s: b[s] - a[s] for s in a if s in b and a[s] is not None and b[s] is not None
                         and math.isfinite(a[s]) and math.isfinite(b[s])}
                if not diffs:
                    continue
                d = list(diffs.values())
                row[key] = {"differences": diffs, "median": float(np.median(d)),
                            "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d),
                            "ties": sum(x == 0 for x in d)}
            if row:
                paired.append({"checkpoint": ck, "baseline": base, "method": m, "columns": row})
    return {"columns": [{"key": k, "header": h} for k, h in cols], "summary": summary, "paired": paired}


def markdown_table(summary: dict, seeds: list) -> str:
    cols = summary["columns"]
    head = "| checkpoint | method | " + " | ".join(c["header"] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for ck, by_method in summary["summary"].items():
        for m, row in by_method.items():
            cells = []
            for c in cols:
                s = row.get(c["key"])
                if not s or s["median"] is None:
                    cells.append("n/a" if not s else f"n/a ({s['non_finite']} failed/non-finite)")
                    continue
                cell = f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"
                if s["non_finite"]:
                    cell += f" [{s['non_finite']} failed/non-finite]"
                cells.append(cell)
            lines.append(f"| {ck} | {m} | " + " | ".join(cells) + " |")
    for p in summary["paired"]:
        cells = []
        for c in cols:
            s = p["columns"].get(c["key"])
            if not s:
                cells.append("n/a")
                continue
            diffs = ", ".join(f"{d:+.1f}" for _, d in sorted(s["differences"].items(), key=lambda kv: int(kv[0])))
            cells.append(f"{s['median']:+.1f} [{s['wins']}+ {s['losses']}− {s['ties']}=] ({diffs})")
        lines.append(f"| {p['checkpoint']} − {p['baseline']} | {p['method']} | " + " | ".join(cells) + " |")
    note = (f"\nCells: median over seeds {', '.join(map(str, seeds))} (min–max), in %.  Paired rows: median of the "
            "per-seed differences [seeds better+ worse− equal=] (the differences in seed order).")
    return "\n".join(lines) + "\n" + note + "\n"
