"""Readers for the corpus layouts people download today: Parquet and Zstandard-compressed JSON lines.

``--format parquet``
    Apache Parquet files, or folders of ``*.parquet`` shards as the HuggingFace hub lays them out
    (``wikimedia/wikipedia``: ``20231101.en/train-00000-of-00041.parquet``, columns
    ``id, url, title, text``; OpenWebText-style sets: a ``text`` column).  One row = one document, its
    text in ``--text-column`` (default ``text``); ``--title-column`` optionally names the title column
    (recorded as the document's title, and kept as its first line with ``--keep-headings``).  The file
    is read **one row group at a time** and only the needed columns are decoded, so memory is bounded
    by the largest row group's text, never by the file.  A document's stream position (used to cut the
    input into restartable segments) is the file's byte size scaled by the row's index in the file:
    monotonic and deterministic.  Null cells are empty documents (dropped and counted as ``empty``).

``.jsonl.zst`` (any line format, ``.zst`` suffix)
    Zstandard streams (The Pile, RedPajama, Dolma ship ``*.jsonl.zst``), decompressed incrementally,
    several concatenated frames included.  The ``zstandard`` library silently stops at the end of a
    truncated stream; :class:`ZstdReader` checks that the last frame is complete and otherwise raises
    a ``ValueError`` naming the file and the decompressed byte offset.  (``.gz``, ``.xz`` and ``.bz2``
    use the standard library's decompressors, see :mod:`data_prep.readers`.)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Iterator

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


# --- Zstandard ---------------------------------------------------------------------------------------------


class ZstdReader(io.RawIOBase):
    """A read-only stream of the decompressed bytes of a ``.zst`` file (multi-frame, truncation-checked)."""

    def __init__(self, raw: BinaryIO, where: str, chunk: int = 1 << 20):
        try:
            import zstandard
        except ImportError:  # pragma: no cover - a core dependency
            raise ValueError(f"{where}: reading .zst needs the 'zstandard' package (pip install zstandard)") from None
        self._zstd = zstandard
        self._raw = raw
        self._where = where
        self._chunk = chunk
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = None  # the decompressor of the current frame (None between frames)
        self._buf = b""
        self._out = 0  # decompressed bytes handed out so far (for error messages)
        self._done = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._buf and not self._done:
            data = self._raw.read(self._chunk)
            if not data:
                if self._obj is not None:
                    raise ValueError(
                        f"{self._where}: Zstandard data is truncated (the stream ends inside a frame after "
                        f"{self._out + len(self._buf)} decompressed bytes); re-download or re-compress the file")
                self._done = True
                return
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        while data:
            if self._obj is None:
                self._obj = self._dctx.decompressobj()
            try:
                self._buf += self._obj.decompress(data)
            except self._zstd.ZstdError as e:
                raise ValueError(f"{self._where}: corrupt Zstandard data after {self._out + len(self._buf)} "
                                 f"decompressed bytes ({e}); re-download or re-compress the file") from None
            if not self._obj.eof:
                return
            data = self._obj.unused_data  # the next frame starts here
            self._obj = None

    def readinto(self, b) -> int:
        self._fill()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self._out += n
        return n


def open_zstd(raw: BinaryIO, where: str) -> BinaryIO:
    """A buffered binary stream (``readline``/``read``) over a ``.zst`` file's decompressed bytes."""
    return io.BufferedReader(ZstdReader(raw, where), buffer_size=1 << 20)


# --- Parquet -------------------------------------------------------------------------------------------------


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a core dependency
        raise ValueError("--format parquet needs the 'pyarrow' package (pip install pyarrow)") from None
    return pq


def parquet_documents(path: Path, base: int, *, text_column: str = "text", title_column: str | None = None,
                      keep_title: bool = False, decode=None, batch_rows: int = 1024) -> Iterator[tuple]:
    """``(text, pos, source, title)`` for every row of one Parquet file, row group by row group.

    ``decode(data: bytes, where: str, offset: int) -> str`` decodes ``binary`` columns (the caller's
    ``--on-decode-error`` policy); string columns come decoded from Arrow.  Errors are ``ValueError``\\ s
    naming the file (and the row group for damaged data).
    """
    import pyarrow as pa

    pq = _pq()
    where = str(path)
    try:
        # CRC-checked pages where the writer stored checksums (pyarrow's write_page_checksum=True).
        pf = pq.ParquetFile(str(path), page_checksum_verification=True)
        meta = pf.metadata
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{where}: not a readable Parquet file ({e}); check that the download is complete "
                         "(a Parquet file ends with the 4 bytes 'PAR1') or choose the right --format") from None
    names = schema.names
    columns = [text_column]
    if text_column not in names:
        raise ValueError(f"{where}: no column {text_column!r} (the file has {', '.join(names)}); "
                         "set --text-column to the column that holds the document text")
    if title_column is not None:
        if title_column not in names:
            raise ValueError(f"{where}: no column {title_column!r} (the file has {', '.join(names)}); "
                             "fix --title-column or leave it out")
        if title_column != text_column:
            columns.append(title_column)
    for col in columns:
        typ = schema.field(col).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
                or pa.types.is_large_binary(typ) or getattr(pa.types, "is_string_view", lambda t: False)(typ)):
            raise ValueError(f"{where}: column {col!r} has type {typ}, not text; "
                             f"choose a string column with --{'text' if col == text_column else 'title'}-column")
    size = path.stat().st_size
    total_rows = max(meta.num_rows, 1)
    row = 0
    for rg in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(rg, columns=columns)
            table.validate(full=True)  # e.g. invalid UTF-8 in a string column from a damaged page
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{where}: row group {rg} of {pf.num_row_groups} is corrupt or truncated ({e}); "
                             "re-download the file") from None
        # Batches of rows -> Python strings: one row group's *text column* is in memory at a time.
        for batch in table.to_batches(max_chunksize=batch_rows):
            texts = batch.column(0).to_pylist()
            titles = batch.column(columns.index(title_column)).to_pylist() if title_column else [None] * len(texts)
            for i, (text, title) in enumerate(zip(texts, titles)):
                src = f"{where}:row group {rg}:row {row}"
                if isinstance(text, bytes):
                    text = decode(text, f"{where} row group {rg} row {row}", 0) if decode else text.decode("utf-8")
                if isinstance(title, bytes):
                    title = decode(title, f"{where} row group {rg} row {row}", 0) if decode else title.decode("utf-8")
                if text is None:
                    text = ""  # a null cell: an empty document (dropped, counted as 'empty')
                elif keep_title and title:
                    text = f"{title}\n{text}"
                yield text, base + size * row // total_rows, src, title
                row += 1
        del table
