"""``--format hf-dataset``: corpora held as HuggingFace ``datasets`` on disk, read with pyarrow alone.

Accepted inputs:

* a ``Dataset.save_to_disk`` folder - ``dataset_info.json``, ``state.json`` and ``data-0000K-of-0000N.arrow``
  files, read in the order ``state.json`` lists them (``_data_files``);
* a ``DatasetDict.save_to_disk`` folder - ``dataset_dict.json`` naming the splits, one such folder per
  split; every split is read, in the order ``dataset_dict.json`` lists them (pass a split's folder to read
  only that split);
* ``.arrow`` files (the Arrow IPC *stream* format ``datasets`` writes, as in its cache folders; the IPC
  *file* format is accepted too), and folders of them (sorted by name).

One row = one document, its text in ``--text-column`` (default ``text``; ``--text-field`` is accepted as
the same flag), optionally a title in ``--title-column``.  Files are read **one record batch at a time**
(``pyarrow.ipc``; the ``datasets`` package is not needed), so memory is bounded by a batch.  A document's
stream position (used to cut the input into restartable segments) is the byte offset of its batch in the
file, interpolated over the batch's rows: monotonic and deterministic.  Null cells are empty documents
(dropped and counted as ``empty``).  Errors are ``ValueError``\\ s naming the file (and the row).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

__all__ = ["ARROW_SUFFIX", "hf_dataset_files", "arrow_documents"]

ARROW_SUFFIX = ".arrow"


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
    except ImportError:  # pragma: no cover - a core dependency
        raise ValueError("--format hf-dataset needs the 'pyarrow' package (pip install pyarrow)") from None
    return pa


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e}); is the save_to_disk folder complete?") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _dataset_folder_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    if state.is_file():
        entries = _read_json(state).get("_data_files")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{state}: no '_data_files' list; is this a datasets save_to_disk folder?")
        files = []
        for e in entries:
            name = e.get("filename") if isinstance(e, dict) else None
            if not isinstance(name, str) or not (folder / name).is_file():
                raise ValueError(f"{state}: lists data file {name!r}, which is missing from {folder}")
            files.append(folder / name)
        return files
    return sorted(f for f in folder.rglob(f"*{ARROW_SUFFIX}") if f.is_file() and not f.name.startswith("."))


def hf_dataset_files(folder: Path) -> list[Path]:
    """The ``.arrow`` files of a ``save_to_disk`` folder (Dataset or DatasetDict) or a folder of them, in
    reading order (module docstring)."""
    folder = Path(folder)
    dd = folder / "dataset_dict.json"
    if dd.is_file():
        splits = _read_json(dd).get("splits")
        if not isinstance(splits, list) or not splits:
            raise ValueError(f"{dd}: no 'splits' list; is this a datasets DatasetDict.save_to_disk folder?")
        files = []
        for split in splits:
            sub = folder / str(split)
            if not sub.is_dir():
                raise ValueError(f"{dd}: names split {split!r}, but {sub} is missing")
            files += _dataset_folder_files(sub)
        return files
    files = _dataset_folder_files(folder)
    if not files:
        raise ValueError(f"{folder}: no .arrow files and no state.json/dataset_dict.json; pass a datasets "
                         "save_to_disk folder or .arrow files for --format hf-dataset")
    return files


def _open_batches(path: Path, fh):
    """A record-batch reader over ``fh``: the IPC stream format (what ``datasets`` writes), else the file format."""
    pa = _pa()
    try:
        return pa.ipc.open_stream(fh)
    except pa.ArrowInvalid:
        fh.seek(0)
        try:
            f = pa.ipc.open_file(fh)
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: not an Arrow IPC stream or file ({e}); check the download or the "
                             "--format") from None
        return (f.get_batch(i) for i in range(f.num_record_batches))


def _check_columns(path: Path, schema, text_column: str, title_column: str | None) -> list[str]:
    pa = _pa()
    names = schema.names
    cols = [text_column] + ([title_column] if title_column and title_column != text_column else [])
    for col in cols:
        if col not in names:
            raise ValueError(f"{path}: no column {col!r} (the dataset has {', '.join(names)}); set "
                             f"--{'text' if col == text_column else 'title'}-column to the column that holds it")
        typ = schema.field(col).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
                or pa.types.is_large_binary(typ) or getattr(pa.types, "is_string_view", lambda t: False)(typ)):
            raise ValueError(f"{path}: column {col!r} has type {typ}, not text; choose a string column with "
                             f"--{'text' if col == text_column else 'title'}-column")
    return cols


def arrow_documents(path: Path, base: int, *, text_column: str = "text", title_column: str | None = None,
                    keep_title: bool = False, decode=None) -> Iterator[tuple]:
    """``(text, pos, source, title)`` for every row of one ``.arrow`` file, record batch by record batch.

    ``decode(data: bytes, where: str, offset: int) -> str`` decodes ``binary`` columns (the caller's
    ``--on-decode-error`` policy).  Errors are ``ValueError``\\ s naming the file and the row.
    """
    pa = _pa()
    row = 0
    with pa.OSFile(str(path), "rb") as fh:
        reader = _open_batches(path, fh)
        schema = getattr(reader, "schema", None)
        cols = None if schema is None else _check_columns(path, schema, text_column, title_column)
        start = fh.tell()
        while True:
            try:
                batch = next(reader) if not hasattr(reader, "read_next_batch") else reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{path}: corrupt or truncated Arrow data after row {row} ({e}); re-create the "
                                 "file (datasets save_to_disk) or re-download it") from None
            if cols is None:
                cols = _check_columns(path, batch.schema, text_column, title_column)
            end = fh.tell()
            texts = batch.column(batch.schema.get_field_index(text_column)).to_pylist()
            titles = (batch.column(batch.schema.get_field_index(title_column)).to_pylist() if title_column
                      else [None] * len(texts))
            n = max(len(texts), 1)
            for i, (text, title) in enumerate(zip(texts, titles)):
                where = f"{path} row {row}"
                if isinstance(text, bytes):
                    text = decode(text, where, 0) if decode else text.decode("utf-8")
                if isinstance(title, bytes):
                    title = decode(title, where, 0) if decode else title.decode("utf-8")
                if text is None:
                    text = ""  # a null cell: an empty document (dropped, counted as 'empty')
                elif keep_title and title:
                    text = f"{title}\n{text}"
                yield text, base + start + (end - start) * i // n, f"{path}:row {row}", title
                row += 1
            start = end
