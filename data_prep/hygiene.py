"""Input hygiene for ``alum-prep``: garbled documents, corpus-level garbage checks, format and compression
sniffing, and the one place where errors raised while reading an input are turned into messages that name it.

Garbled documents (``--max-garbage-frac``)
------------------------------------------
A document's *garbage fraction* is the share of its characters (as decoded, before cleaning) that are
U+FFFD REPLACEMENT CHARACTER (an invalid UTF-8 sequence replaced at decode time, or one already in the
text) or C0/C1 control characters other than tab, line feed and carriage return.  A document whose
fraction exceeds ``--max-garbage-frac`` is dropped and counted as ``garbled``.  The default 0.2 sits
between the two populations measured on samples (see ``docs/faults-prep.md``):

* not text at all — random bytes, compressed data read as text, UTF-16, or Cyrillic/CJK text in an 8-bit
  or GBK encoding read as UTF-8: 0.55 to 0.81;
* damaged but readable text — Western-European text in Latin-1/cp1252 read as UTF-8 (each accented letter
  becomes one U+FFFD): 0.004 at most on English Wikipedia (WikiText-2), 0.13 on accent-dense French or
  German sentences.  (Central-European text in cp1250, 0.28 on a Czech pangram, is dropped: convert it.)

The first kind is dropped, the second kept (its replacements are counted and warned about, with the fix:
convert the file to UTF-8).  ``--max-garbage-frac 1`` keeps every document.

Corpus level
------------
The summary always reports decode replacements, control characters removed and garbled documents.  A
warning is printed when replacements or control characters exceed :data:`WARN_CHAR_SHARE` of all
characters read, or garbled documents exceed :data:`WARN_DOC_SHARE` of the documents read; a corpus where
more than :data:`MAX_GARBLED_SHARE` of the documents, or of the characters, were garbled is refused
(:class:`GarbledCorpusError`): such a run almost always reads the wrong file, format or encoding.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path
from typing import BinaryIO

from .readers_columnar import open_zstd

# Characters that make up "garbage": the replacement character and C0/C1 controls except \t \n \r
# (line ends are normalised by cleaning, not garbage; the byte-order mark is not counted either).
GARBAGE_RE = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

DEFAULT_MAX_GARBAGE_FRAC = 0.2
WARN_CHAR_SHARE = 0.001  # 0.1 % of the characters read
WARN_DOC_SHARE = 0.01  # 1 % of the documents read
MAX_GARBLED_SHARE = 0.5  # "mostly garbage"


class GarbledCorpusError(ValueError):
    """Most of the corpus was garbage (replacement / control characters): wrong file, format or encoding."""


class EmptyCorpusError(ValueError):
    """No document survived reading and cleaning."""


def garbage_count(text: str) -> int:
    """Number of replacement and control characters (see :data:`GARBAGE_RE`) in ``text``."""
    # str.count for U+FFFD (the bulk in binary input) is 5x faster than one regex over both kinds.
    return text.count("\ufffd") + len(_CONTROL_RE.findall(text))


def is_garbled(text: str, max_frac: float) -> tuple[bool, int]:
    """``(garbled?, garbage characters)`` of one document for the threshold ``max_frac``."""
    n = garbage_count(text)
    return (bool(text) and n / len(text) > max_frac), n


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.2f}%" if b else "0%"


def hygiene_report(counts: dict, max_frac: float) -> tuple[str, list[str]]:
    """``(summary line, warnings)`` for the totals of a run (``counts`` as in the manifest)."""
    chars = counts.get("chars_read", 0)
    read = counts.get("documents_read", 0)
    rep = counts.get("decode_replacements", 0)
    ctrl = counts.get("control_chars_removed", 0)
    garbled = counts.get("dropped", {}).get("garbled", 0)
    line = (f"decode replacements {rep} ({_pct(rep, chars)} of {chars} characters), control characters removed "
            f"{ctrl} ({_pct(ctrl, chars)}), garbled documents dropped {garbled} ({_pct(garbled, read)} of {read} "
            f"read; --max-garbage-frac {max_frac})")
    warnings = []
    if chars and rep / chars > WARN_CHAR_SHARE:
        warnings.append(f"{rep} invalid UTF-8 sequences were replaced by U+FFFD ({_pct(rep, chars)} of the characters): "
                        "the input is probably not UTF-8 — convert it (e.g. iconv -f latin1 -t utf-8) or pass "
                        "--on-decode-error fail to find the first bad byte")
    if chars and ctrl / chars > WARN_CHAR_SHARE:
        warnings.append(f"{ctrl} control characters were removed ({_pct(ctrl, chars)} of the characters): "
                        "the input may be binary or in another encoding (UTF-16?) — check the files and --format")
    if read and garbled / read > WARN_DOC_SHARE:
        warnings.append(f"{garbled} of {read} documents ({_pct(garbled, read)}) were dropped as garbled (more than "
                        f"{max_frac:g} of their characters are replacement/control characters): check the inputs' "
                        "encoding and --format")
    return line, warnings


def check_not_mostly_garbage(counts: dict, max_frac: float, inputs: list[str]) -> None:
    """Raise :class:`GarbledCorpusError` when more than half of the documents or characters were garbled."""
    dropped = counts.get("dropped", {})
    # Pages a reader skipped by design (wiki redirects, other namespaces) carry no text: not counted.
    read = counts.get("documents_read", 0) - dropped.get("redirect", 0) - dropped.get("non_article_page", 0)
    chars = counts.get("chars_read", 0)
    garbled = counts.get("dropped", {}).get("garbled", 0)
    gchars = counts.get("garbled_chars", 0)
    if (read and garbled / read > MAX_GARBLED_SHARE) or (chars and gchars / chars > MAX_GARBLED_SHARE):
        raise GarbledCorpusError(
            f"{', '.join(inputs)}: mostly garbage — {garbled} of {read} documents ({_pct(garbled, read)}), "
            f"{gchars} of {chars} characters ({_pct(gchars, chars)}) are in documents whose share of "
            f"replacement/control characters exceeds --max-garbage-frac {max_frac:g} "
            f"({counts.get('decode_replacements', 0)} invalid UTF-8 sequences). This is not UTF-8 text in "
            "this --format: check the file (binary? compressed without its .gz/.bz2/.xz name?), its encoding "
            "(convert with iconv) and --format; --max-garbage-frac 1 keeps every document"
        )


# --- sniffing: compression magic and the format of --format text inputs ----------------------------------

# (name, magic bytes, file-name endings that announce it)
_MAGIC = (
    ("gzip", b"\x1f\x8b", (".gz", ".tgz")),
    ("bzip2", b"BZh", (".bz2", ".tbz", ".tbz2")),
    ("xz", b"\xfd7zXZ\x00", (".xz", ".txz")),
    ("zstd", b"\x28\xb5\x2f\xfd", (".zst", ".zstd", ".tzst")),
)
SNIFF_BYTES = 1 << 16
LINE_FORMATS = ("text", "wikitext", "jsonl", "wikiextractor", "wiki-xml")
SNIFF_FILES = 16  # only the first files of a large folder are sniffed (cheap, and one warning suffices)


def compression_mismatch(path: Path, head: bytes) -> str | None:
    """An error message when ``head`` (the file's first bytes) is compressed data whose format the name
    does not announce (such a file would be read as text: pure garbage), else None."""
    name = path.name.lower()
    for kind, magic, endings in _MAGIC:
        if kind == "bzip2":
            hit = len(head) >= 10 and head[:3] == magic and head[3:4] in b"123456789" and head[4:10] == b"1AY&SY"
        else:
            hit = head.startswith(magic)
        if hit and not name.endswith(endings):
            return (f"{path}: is {kind}-compressed but its name does not end in {' / '.join(endings)}, so it would "
                    f"be read as text; rename it (e.g. {path.name}{endings[0]}) or decompress it")
    return None


def guess_format(head: str, complete: bool = True) -> str | None:
    """The ``--format`` that ``head`` (the decoded start of a file; ``complete=False`` when it was cut by
    the sniff window) clearly is, or None when it looks like plain text.  Only strong signals count: a
    MediaWiki XML dump, WikiExtractor ``<doc id=..>`` blocks, other XML, JSON lines (each of the first
    non-blank lines a JSON object), a WikiText `` = Title = `` first line."""
    nonblank = [ln.strip() for ln in head.splitlines() if ln.strip()]
    if not complete and len(nonblank) > 1:
        nonblank = nonblank[:-1]  # the last line may be cut by the sniff window
    if not nonblank:
        return None
    start = head.lstrip("\ufeff \t\r\n")[:4096]
    if "<mediawiki" in start[:1024] or ("<page>" in head and "<revision>" in head and "<title>" in head):
        return "wiki-xml"
    if re.match(r"<doc\b[^>]*\bid=", nonblank[0]):
        return "wikiextractor"
    if start[:15].lower().startswith(("<!doctype html", "<html")):
        return "html"
    if start.startswith("<?xml"):
        return "xml"
    lines = nonblank[:20]
    if lines[0].startswith("{") and all(_is_json_object(ln) for ln in lines):
        return "jsonl"
    first = next(ln for ln in head.splitlines() if ln.strip())
    if re.match(r"^ ?= (?!=).*[^=] = ?$", first.rstrip("\r")):
        return "wikitext"
    return None


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def format_warning(path: Path, fmt: str, guess: str | None) -> str | None:
    """The warning for reading ``path`` as ``fmt`` when it clearly is ``guess``."""
    if guess is None or guess == fmt or fmt not in ("text", "wikitext"):
        return None
    if guess == "jsonl":
        what, hint = "JSON lines", "--format jsonl (and --json-key FIELD for the text field)"
    elif guess == "wiki-xml":
        what, hint = "a MediaWiki XML dump", "--format wiki-xml"
    elif guess == "wikiextractor":
        what, hint = "WikiExtractor output", "--format wikiextractor"
    elif guess == "wikitext":
        what, hint = "WikiText (' = Title = ' lines)", "--format wikitext"
    elif guess == "html":
        what, hint = "HTML", "a text extractor first (alum-prep does not strip HTML)"
    else:
        what, hint = "XML", "--format wiki-xml for a MediaWiki dump, or convert it to text first"
    return (f"{path} looks like {what}, but --format {fmt} reads it as plain text (markup and field names "
            f"would become training text); use {hint}")


def is_compressed_name(path: Path) -> bool:
    return path.name.lower().endswith(tuple(e for _, _, endings in _MAGIC for e in endings))


def read_error(path: Path, exc: BaseException) -> ValueError:
    """The error for an exception raised while reading ``path`` (any reader, any decompressor): names the
    file, says what failed and what to do.  A ``ValueError`` that already names the file is kept as is."""
    msg = str(exc)
    if isinstance(exc, ValueError) and str(path) in msg:
        return exc
    kind = type(exc).__name__
    if is_compressed_name(path) or isinstance(exc, (EOFError, lzma.LZMAError)) or "compress" in kind.lower() \
            or kind in ("BadGzipFile", "ReadError", "CompressionError", "ZstdError", "error"):
        return ValueError(f"{path}: compressed data is truncated or corrupt ({kind}: {msg or 'no detail'}); "
                          "re-download or re-compress the file (check it with its tool, e.g. bzip2 -t / xz -t / "
                          "gzip -t / tar -tf)")
    return ValueError(f"{path}: cannot be read ({kind}: {msg or 'no detail'}); check that the file is complete "
                      "and in the --format given")


def open_decompressed(path: Path, raw: BinaryIO) -> BinaryIO:
    """``raw`` (the open file ``path``) decompressed as its name says (.bz2, .xz, .gz, .zst), else ``raw``."""
    name = path.name
    if name.endswith(".bz2"):
        return bz2.BZ2File(raw)
    if name.endswith(".xz"):
        return lzma.LZMAFile(raw)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if name.endswith(".zst"):
        return open_zstd(raw, str(path))
    return raw


def sniff_inputs(files: list[Path], fmt: str, max_frac: float = DEFAULT_MAX_GARBAGE_FRAC) -> list[str]:
    """Look at the start of the first :data:`SNIFF_FILES` inputs before anything is written.

    Raises ``ValueError`` naming the file when its first bytes are compressed data its name does not
    announce, or when its (decompressed) start cannot be read — a corrupt or truncated compressed file
    fails here, before an output folder exists.  Returns warnings for ``--format text``/``wikitext`` inputs
    that clearly are another format (:func:`guess_format`) and for inputs whose start is mostly garbage
    (with the UTF-16 diagnosis when it applies)."""
    warnings = []
    for path in files[:SNIFF_FILES]:
        try:
            with open(path, "rb") as raw:
                head = raw.read(SNIFF_BYTES)
                if not path.name.lower().endswith(".tar"):  # tarfile reads compressed .tar transparently
                    problem = compression_mismatch(path, head[:16])
                    if problem:
                        raise ValueError(problem)
                raw.seek(0)
                stream = open_decompressed(path, raw)
                data = head if stream is raw else stream.read(SNIFF_BYTES)
        except MemoryError:
            raise
        except Exception as e:  # any reader / decompressor error, named
            raise read_error(path, e) from None
        text = data.decode("utf-8", "replace")
        w = format_warning(path, fmt, guess_format(text, len(data) < SNIFF_BYTES))
        if w:
            warnings.append(w)
        n = garbage_count(text)
        # UTF-16: a byte-order mark, or ASCII text's NUL byte in every other position
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff") or max(data[0:512:2].count(0), data[1:512:2].count(0)) > 100
        # Only for formats read as text lines (an archive or a binary columnar file is not text).
        if fmt in LINE_FORMATS and len(text) >= 256 and (utf16 or n / len(text) > MAX_GARBLED_SHARE):
            warnings.append(
                f"{path} starts with {100.0 * n / len(text):.0f}% replacement/control characters: "
                + ("it looks like UTF-16 text; convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)" if utf16 else
                   "it is not UTF-8 text (binary? another encoding?)")
                + (f"; its documents will be dropped as garbled (--max-garbage-frac {max_frac:g})" if n / len(text) > max_frac
                   else f"; kept because --max-garbage-frac is {max_frac:g}")
            )
    return warnings


def check_tar_end(tar, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when a tar archive stopped at a damaged member header.

    ``tarfile`` ends the iteration without a word at a header whose checksum fails (a bit flip), so every
    member after it would be lost silently.  A complete archive has only zero blocks after its last
    member; anything else left in the stream is the rest of a damaged archive."""
    while True:
        block = tar.fileobj.read(1 << 20)
        if not block:
            return
        if block.count(0) != len(block):
            raise ValueError(f"{where}: tar archive is damaged: a member header after byte {tar.offset} is invalid (bad "
                             "checksum) and the members after it cannot be read; re-download or re-create the archive")
