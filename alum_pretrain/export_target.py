"""Where an export may be written: ``--overwrite`` replaces only a folder that is itself an export.

Every export carries a marker file, :data:`EXPORT_MARKER` (``alum_export.json``: what was exported, when,
and the files written).  Before anything is loaded, :func:`check_export_target` refuses an OUT that

* is a training run (a folder with ``checkpoints/``, or a run's ``config.yaml`` + ``log.jsonl``), a
  checkpoint (``train_state.pt``) or a data-bin (``manifest.json``), or lies inside a checkpoint, a run's
  ``checkpoints/`` or a data-bin (a new export inside a run folder, ``RUN/hf``, is fine, but there only a
  folder holding the marker is replaced);
* contains the checkpoint being exported, or any folder (an export holds only files);
* exists, is not empty and is not an export, even with ``--overwrite``.

An export written before the marker existed is recognised by its structure: only plain files, all of
the kinds an export writes (``config.json``, ``*.safetensors``, tokenizer files, ``README.md``, ...),
including ``config.json`` and a ``*.safetensors`` file, and not inside a run or a data-bin.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

__all__ = ["EXPORT_MARKER", "ExportTargetError", "check_export_target", "export_marker", "is_export",
           "write_export_marker"]

#: the marker file every export holds
EXPORT_MARKER = "alum_export.json"

#: files an export (native or fairseq, any transformers version) may hold
_EXPORT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.txt", "vocab.json", "merges.txt", "*.model", "chat_template.*", "README.md",
                 "nsp_head.json", EXPORT_MARKER)

_MANIFEST = "manifest.json"  # (alum_pretrain.data.databin.MANIFEST; not imported to keep this module light)


class ExportTargetError(ValueError):
    """OUT cannot be written or replaced by an export; the message says why and what to do."""


def _is_databin(d: Path) -> bool:
    try:
        manifest = json.loads((d / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (d / _MANIFEST).is_file() and (d / "tokenizer").is_dir()
    return isinstance(manifest, dict) and ("num_shards" in manifest or "format_version" in manifest)


def _run_or_databin(d: Path, itself: bool) -> str | None:
    """What ``d`` is, when it is a run, a checkpoint or a data-bin (else None).

    ``itself``: ``d`` is OUT (which would be replaced), so any sign counts; for a folder above OUT only a
    complete signature does (a run's ``checkpoints/`` with its ``config.yaml`` or ``log.jsonl``)."""
    if _is_databin(d):
        return "a data-bin (it holds manifest.json)"
    has_log = (d / "config.yaml").is_file() or (d / "log.jsonl").is_file()
    if (d / "checkpoints").is_dir() and (itself or has_log):
        return "a training run (it holds checkpoints/)"
    if (d / "train_state.pt").is_file():
        return "a checkpoint (it holds train_state.pt)"
    if (d / "config.yaml").is_file() and (d / "log.jsonl").is_file():
        return "a training run (it holds config.yaml and log.jsonl)"
    return None


def write_export_marker(tmp: Path, source: str, **extra) -> None:
    """Write the marker into the finished export folder ``tmp`` (last, so it lists every file)."""
    import datetime

    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    marker = {"format": "alum-export", "version": 1, "source": str(source),
              "written_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **extra, "files": files}
    (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def export_marker(out: Path) -> dict | None:
    """The marker of the export ``out`` (None when there is none or it is unreadable)."""
    try:
        data = json.loads((out / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == "alum-export" else None


def is_export(out: Path) -> bool:
    """Whether ``out`` holds an export: its marker, or (older exports) an export's files and nothing else."""
    if export_marker(out) is not None:
        return True
    entries = list(out.iterdir())
    names = {e.name for e in entries}
    if any(not e.is_file() or e.is_symlink() for e in entries):
        return False
    if any(not any(fnmatch.fnmatch(n, pat) for pat in _EXPORT_FILES) for n in names):
        return False
    return "config.json" in names and any(n.endswith(".safetensors") for n in names)


def _refuse_place(out: Path, resolved: Path) -> bool:
    """Refuse an OUT that is a run, a checkpoint or a data-bin, or lies inside a checkpoint, a run's
    ``checkpoints/`` or a data-bin; returns whether OUT lies inside a run (elsewhere)."""
    inside_run = False
    for d in (resolved, *resolved.parents):
        what = _run_or_databin(d, d == resolved) if d.is_dir() else None
        if what is None and d != resolved and d.name == "checkpoints" and _run_or_databin(d.parent, False):
            what = "the checkpoints/ folder of a training run"
        if what is None:
            continue
        if d != resolved and what.startswith("a training run"):
            inside_run = True  # RUN/hf: a new export may go there, but only an export is replaced
            continue
        where = "is" if d == resolved else f"lies inside {d}, which is"
        raise ExportTargetError(f"{out}: refusing to export here: OUT {where} {what}; exporting would "
                                "replace or mix with it. Choose an OUT outside it (e.g. a sibling folder "
                                "RUN-hf or RUN/hf)")
    return inside_run


def check_export_target(out: str | Path, source: str | Path | None, overwrite: bool) -> None:
    """Refuse an OUT the export must not write or replace (see the module docstring)."""
    out = Path(out)
    resolved = out.resolve()
    inside_run = _refuse_place(out, resolved)
    if source is not None:
        src = Path(source).resolve()
        if src == resolved or resolved in src.parents:
            raise ExportTargetError(f"{out}: refusing to export here: OUT contains the checkpoint being "
                                    f"exported ({source}); choose another OUT")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise ExportTargetError(f"{out}: is a file, not a folder; choose another OUT")
    if not overwrite:
        raise ExportTargetError(f"{out}: already exists; choose another OUT or pass --overwrite")
    if not is_export(out) or (inside_run and export_marker(out) is None):
        odd = sorted(e.name + ("/" if e.is_dir() else "") for e in out.iterdir()
                     if e.is_dir() or not any(fnmatch.fnmatch(e.name, p) for p in _EXPORT_FILES))
        raise ExportTargetError(f"{out}: --overwrite replaces only an earlier export (a folder holding "
                                f"{EXPORT_MARKER}, or only an export's files), and this folder is not one"
                                + (f" (it holds {', '.join(odd[:5])})" if odd else "")
                                + "; choose another OUT, or remove the folder yourself if it is disposable")
    for e in out.iterdir():
        if e.is_dir():
            raise ExportTargetError(f"{out}: --overwrite refused: the export folder now holds a folder "
                                    f"({e.name}/) that replacing it would delete; move it out first")
