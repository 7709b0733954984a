"""Streaming readers: input files -> raw documents (run in the main process; memory independent of size).

Every reader yields :class:`RawDoc` records in a deterministic order.  ``pos`` is the document's start
position in *on-disk bytes* counted over all inputs in order (for a compressed input: the position in the
compressed file, which is what the total input size is made of); the pipeline cuts the stream into
segments by ``pos`` (see :mod:`data_prep.pipeline`).  A record with ``text=None`` is a page the reader
skipped (``skip`` says why: a wiki redirect or a non-article namespace) so that it is counted.

Formats (``--format``):

``text``          documents separated by one or more blank lines; each non-blank line is a paragraph.
``jsonl``         one JSON object per line, the document in the ``--json-key`` field (default ``text``).
``wikitext``      WikiText-2/103 files: a line `` = Title = `` (exactly one ``=`` each side) starts a
                  document; `` = = Section = = `` lines are section headings inside it.
``wikiextractor`` WikiExtractor output (a folder such as ``text/AA/wiki_00`` or files, optionally .bz2):
                  ``<doc id=.. url=.. title=..>`` ... ``</doc>`` blocks (the first line, which repeats
                  the title, is dropped) or its ``--json`` output (one object per line, ``text`` field);
                  WikiExtractor's HTML escapes (``&amp;``) are undone in the workers.
``wiki-xml``      a MediaWiki ``*-pages-articles.xml`` dump, plain or ``.bz2``, streamed through
                  :class:`xml.etree.ElementTree.XMLPullParser`; only main-namespace (``ns`` 0),
                  non-redirect pages are kept.  The wikitext is turned into text in the workers by the
                  ``wikiextractor`` library (:func:`data_prep.work.to_plain_text`).
``parquet``       Parquet files or folders of ``*.parquet`` shards, one row per document (``--text-column``,
                  ``--title-column``); read row group by row group, see :mod:`data_prep.readers_columnar`.
``hf-dataset``    HuggingFace ``datasets`` ``save_to_disk`` folders (Dataset or DatasetDict) and ``.arrow`` files,
                  one row per document (``--text-column``), read record batch by record batch with pyarrow,
                  see :mod:`data_prep.readers_arrow`.
``owt``           OpenWebText: a folder (or files) of ``.txt`` documents, ``.xz`` files, and ``.tar`` /
                  ``.tar.xz`` archives of them (nested archives too, as in ``openwebtext.tar.xz`` whose
                  members ``urlsf_subset*.xz`` are tar.xz archives of ``.txt`` files); one file = one document.

Line formats (``text``, ``jsonl``, ``wikitext``, ``wikiextractor``) and ``wiki-xml`` read ``.gz``, ``.bz2``,
``.xz`` and ``.zst`` (Zstandard, e.g. ``*.jsonl.zst``) files transparently, by file name suffix.

UTF-8 decoding: ``on_decode_error="replace"`` replaces each invalid byte sequence by U+FFFD and counts it;
``"fail"`` raises ``ValueError`` naming the file and the byte offset (in the decompressed stream for
compressed inputs).  Lines longer than :data:`LINE_LIMIT` bytes are cut into pieces at a UTF-8 character
boundary (each piece becomes its own paragraph) so that no single read is unbounded.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import html
import io
import json
import lzma
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from .hygiene import check_tar_end, open_decompressed, read_error
from .readers_arrow import arrow_documents, hf_dataset_files
from .readers_columnar import PARQUET_SUFFIXES, parquet_documents

FORMATS = ("wikitext", "wikiextractor", "wiki-xml", "owt", "text", "jsonl", "parquet", "hf-dataset")
LINE_LIMIT = 16 * 1024 * 1024

# A WikiText title line: " = Title = " with exactly one '=' on each side.
WIKITEXT_TITLE_RE = re.compile(r"^ ?= (?!=)(.*?[^=]) = ?$")
# A WikiText section heading: " = = Section = = " (two or more '=' each side).
WIKITEXT_HEADING_RE = re.compile(r"^ ?(?:= ){2,}(.*?)(?: =){2,} ?$")

_DOC_OPEN_RE = re.compile(r"^<doc\b[^>]*>$")
_DOC_TITLE_RE = re.compile(r'\btitle="([^"]*)"')


@dataclass
class RawDoc:
    text: str | None
    pos: int
    source: str
    title: str | None = None
    skip: str | None = None


# --- UTF-8 decoding with a counting replacement handler -------------------------------------------------

_REPLACED = [0]


def _count_replace(exc: UnicodeDecodeError):
    _REPLACED[0] += 1
    return "\ufffd", exc.end


codecs.register_error("alum_prep_count", _count_replace)


class Decoder:
    """Decodes byte lines; counts replacements (mode ``replace``) or fails with the byte offset."""

    def __init__(self, mode: str):
        if mode not in ("replace", "fail"):
            raise ValueError(f"--on-decode-error must be 'replace' or 'fail', got {mode!r}")
        self.mode = mode

    @staticmethod
    def replacements() -> int:
        return _REPLACED[0]

    def decode(self, data: bytes, where: str, offset: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.mode == "fail":
                bad = data[e.start : e.start + 4]
                raise ValueError(
                    f"{where}: invalid UTF-8 at byte offset {offset + e.start} (bytes {bad!r}); fix the file or "
                    "re-run with --on-decode-error replace to replace and count such bytes"
                ) from None
            return data.decode("utf-8", errors="alum_prep_count")


def _utf8_cut(data: bytes) -> int:
    """Index at which ``data`` can be cut without splitting a UTF-8 character (the end if it is whole)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 != 0x80:  # not a continuation byte: a lead (or ASCII) byte
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return n if back >= need else n - back
    return n


def iter_byte_lines(stream: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """``(line without its newline, offset of the line in the stream)``; long lines come in pieces."""
    offset = 0
    carry = b""
    while True:
        chunk = stream.readline(LINE_LIMIT)
        if not chunk:
            if carry:
                yield carry, offset
            return
        data = carry + chunk
        if data.endswith(b"\n"):
            yield data[:-1], offset
            offset += len(data)
            carry = b""
        elif len(chunk) < LINE_LIMIT:  # last line of the file, no newline
            yield data, offset
            offset += len(data)
            carry = b""
        else:  # an over-long line: emit what we have up to a character boundary
            cut = _utf8_cut(data)
            yield data[:cut], offset
            offset += cut
            carry = data[cut:]


def iter_byte_blocks(stream: BinaryIO, size: int = 1 << 20) -> Iterator[tuple[bytes, int]]:
    """``(block, offset)``: ~``size``-byte blocks of the stream that end after a newline (or, in a line
    longer than a block, at a UTF-8 character boundary), so that each block decodes on its own."""
    offset = 0
    carry = b""
    while True:
        chunk = stream.read(size)
        if not chunk:
            if carry:
                yield carry, offset
            return
        data = carry + chunk
        cut = data.rfind(b"\n") + 1 or _utf8_cut(data)
        yield data[:cut], offset
        offset += cut
        carry = data[cut:]


# --- input listing ---------------------------------------------------------------------------------------

_OWT_SUFFIXES = (".txt", ".xz", ".tar", ".tgz", ".gz", ".bz2")


def list_inputs(inputs: list[str | os.PathLike], fmt: str) -> list[Path]:
    """Expand folders (sorted, recursive) and check that every input exists and is readable."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not inputs:
        raise ValueError("no input given: pass one or more files or folders")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"{p}: input not found (check the path)")
        if p.is_dir() and fmt == "hf-dataset":  # save_to_disk folders: the order state.json/dataset_dict.json give
            files.extend(hf_dataset_files(p))
        elif p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                and (fmt != "owt" or f.name.endswith(_OWT_SUFFIXES))
                and (fmt != "parquet" or f.name.endswith(PARQUET_SUFFIXES))  # hub folders also hold README.md
            )
            if not found:
                raise ValueError(f"{p}: folder has no input files for --format {fmt}")
            files.extend(found)
        elif not p.is_file():  # a device (/dev/urandom), FIFO or socket: endless or unrepeatable
            raise ValueError(f"{p}: not a regular file; write the data to a file first")
        else:
            files.append(p)
    for f in files:
        if not os.access(f, os.R_OK):
            raise PermissionError(f"{f}: input not readable (check its permissions)")
    return files


# --- readers ----------------------------------------------------------------------------------------------


class Reader:
    """Iterate all documents of ``files`` (already listed) in order."""

    def __init__(self, files: list[Path], fmt: str, decoder: Decoder, json_key: str = "text",
                 text_column: str = "text", title_column: str | None = None, keep_headings: bool = False):
        self.files = files
        self.fmt = fmt
        self.decoder = decoder
        self.json_key = json_key
        self.text_column = text_column
        self.title_column = title_column
        self.keep_headings = keep_headings
        self.total_bytes = sum(f.stat().st_size for f in files)

    def __iter__(self) -> Iterator[RawDoc]:
        base = 0
        for path in self.files:
            with open(path, "rb") as raw:
                fn = {
                    "text": self._text,
                    "jsonl": self._jsonl,
                    "wikitext": self._wikitext,
                    "wikiextractor": self._wikiextractor,
                    "wiki-xml": self._wiki_xml,
                    "owt": self._owt,
                    "parquet": self._parquet,
                    "hf-dataset": self._arrow,
                }[self.fmt]
                try:
                    yield from fn(path, raw, base)
                except MemoryError:
                    raise
                except Exception as e:  # any reader's or decompressor's error names the file (see hygiene.read_error)
                    raise read_error(path, e) from None
            base += path.stat().st_size

    # Lines of a (possibly compressed) file as (text, 1-based line number, global position).
    def _lines(self, path: Path, raw: BinaryIO, base: int) -> Iterator[tuple[str, int, int]]:
        stream = open_decompressed(path, raw)
        for lineno, (data, off) in enumerate(iter_byte_lines(stream), start=1):
            pos = base + (raw.tell() if stream is not raw else off)
            yield self.decoder.decode(data, str(path), off), lineno, pos

    def _text(self, path, raw, base):
        buf: list[str] = []
        start = 0
        first = 0
        for line, lineno, pos in self._lines(path, raw, base):
            if line.strip():
                if not buf:
                    start, first = pos, lineno
                buf.append(line)
            elif buf:
                yield RawDoc("\n".join(buf), start, f"{path}:{first}")
                buf = []
        if buf:
            yield RawDoc("\n".join(buf), start, f"{path}:{first}")

    def _jsonl(self, path, raw, base, key=None):
        key = key or self.json_key
        for line, lineno, pos in self._lines(path, raw, base):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or key not in obj:
                raise ValueError(f"{path}:{lineno}: no {key!r} field in this JSON line (set --json-key)")
            text = obj[key]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {key!r} is {type(text).__name__}, not a string")
            yield RawDoc(text, pos, f"{path}:{lineno}", title=obj.get("title"))

    def _wikitext(self, path, raw, base):
        buf: list[str] = []
        start, first = 0, 0
        for line, lineno, pos in self._lines(path, raw, base):
            if WIKITEXT_TITLE_RE.match(line.rstrip("\r")) and buf:
                yield RawDoc("\n".join(buf), start, f"{path}:{first}")
                buf = []
            if not buf:
                if not line.strip():
                    continue
                start, first = pos, lineno
            buf.append(line)
        if buf:
            yield RawDoc("\n".join(buf), start, f"{path}:{first}")

    def _wikiextractor(self, path, raw, base):
        lines = self._lines(path, raw, base)
        for line, lineno, pos in lines:
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):  # WikiExtractor --json output
                # Re-open: the JSON reader handles the whole file.
                raw.seek(0)
                yield from self._jsonl(path, raw, base, key="text")
                return
            break
        else:
            return
        raw.seek(0)
        buf: list[str] | None = None
        title = None
        start, first = 0, 0
        for line, lineno, pos in self._lines(path, raw, base):
            s = line.strip()
            if buf is None:
                if not s:
                    continue
                m = _DOC_OPEN_RE.match(s)
                if not m:
                    raise ValueError(f"{path}:{lineno}: expected a WikiExtractor '<doc ...>' line, got {s[:60]!r}")
                t = _DOC_TITLE_RE.search(s)
                title = html.unescape(t.group(1)) if t else None
                buf, start, first = [], pos, lineno
            elif s == "</doc>":
                if buf and title is not None and buf[0].strip() == title:
                    buf = buf[1:]  # WikiExtractor repeats the title as the first line
                yield RawDoc("\n".join(buf), start, f"{path}:{first}", title=title)
                buf = None
            else:
                buf.append(line)
        if buf is not None:
            raise ValueError(f"{path}:{first}: '<doc>' block not closed by '</doc>' (truncated file?)")

    def _wiki_xml(self, path, raw, base):
        stream = open_decompressed(path, raw)
        parser = ET.XMLPullParser(events=("start", "end"))
        root = None
        page_start = base
        for data, off in iter_byte_blocks(stream):
            # Decoded and re-encoded so that invalid UTF-8 follows --on-decode-error like every format.
            text = self.decoder.decode(data, str(path), off)
            try:
                parser.feed(text.encode("utf-8"))
                events = list(parser.read_events())
            except ET.ParseError as e:
                raise ValueError(f"{path}: invalid XML ({e}; line numbers count from the start of the file)") from None
            for event, elem in events:
                tag = elem.tag.rsplit("}", 1)[-1]
                if event == "start":
                    if root is None:
                        root = elem
                    if tag == "page":
                        page_start = base + (raw.tell() if stream is not raw else off)
                    continue
                if tag != "page":
                    continue
                fields = {c.tag.rsplit("}", 1)[-1]: c for c in elem}
                title = fields["title"].text if "title" in fields else None
                ns = fields["ns"].text if "ns" in fields else "0"
                src = f"{path}:page {title!r}"
                if ns is not None and ns.strip() != "0":
                    yield RawDoc(None, page_start, src, title, skip="non_article_page")
                elif "redirect" in fields:
                    yield RawDoc(None, page_start, src, title, skip="redirect")
                else:
                    body = ""
                    rev = fields.get("revision")
                    if rev is not None:
                        for c in rev:
                            if c.tag.rsplit("}", 1)[-1] == "text":
                                body = c.text or ""
                    if body.lstrip()[:9].upper() == "#REDIRECT":
                        yield RawDoc(None, page_start, src, title, skip="redirect")
                    else:
                        yield RawDoc(body, page_start, src, title)
                elem.clear()
                if root is not None:
                    root.clear()  # drop finished pages so memory stays flat
        try:
            parser.close()
        except ET.ParseError as e:
            raise ValueError(f"{path}: invalid or truncated XML at the end of the file: {e}") from None

    def _parquet(self, path, raw, base):
        for text, pos, src, title in parquet_documents(
                path, base, text_column=self.text_column, title_column=self.title_column,
                keep_title=self.keep_headings, decode=self.decoder.decode):
            yield RawDoc(text, pos, src, title=title)

    def _arrow(self, path, raw, base):
        for text, pos, src, title in arrow_documents(
                path, base, text_column=self.text_column, title_column=self.title_column,
                keep_title=self.keep_headings, decode=self.decoder.decode):
            yield RawDoc(text, pos, src, title=title)

    def _owt(self, path, raw, base):
        name = path.name
        if name.endswith(".txt"):
            data = raw.read()
            yield RawDoc(self.decoder.decode(data, str(path), 0), base, str(path))
            return
        if tarfile.is_tarfile(path):
            raw.seek(0)
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                yield from self._owt_tar(tar, str(path), lambda: base + raw.tell())
            return
        stream = open_decompressed(path, raw)  # a single compressed text document
        yield RawDoc(self.decoder.decode(stream.read(), str(path), 0), base, str(path))

    def _owt_tar(self, tar: tarfile.TarFile, where: str, position) -> Iterator[RawDoc]:
        for member in tar:
            if not member.isfile():
                continue
            pos = position()
            fh = tar.extractfile(member)
            data = fh.read() if fh is not None else b""
            inner = f"{where}!{member.name}"
            if member.name.endswith((".xz", ".tar", ".gz", ".bz2", ".tgz")):
                try:
                    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as sub:
                        for doc in self._owt_tar(sub, inner, lambda: pos):
                            yield doc
                    continue
                except tarfile.ReadError:
                    data = _decompress_bytes(member.name, data, inner)
            elif not member.name.endswith(".txt"):
                continue
            yield RawDoc(self.decoder.decode(data, inner, 0), pos, inner)
        check_tar_end(tar, where)


def _decompress_bytes(name: str, data: bytes, where: str) -> bytes:
    try:
        if name.endswith(".xz"):
            return lzma.decompress(data)
        if name.endswith(".gz"):
            return gzip.decompress(data)
        if name.endswith(".bz2"):
            return bz2.decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise ValueError(f"{where}: cannot decompress ({e})") from None
    return data
