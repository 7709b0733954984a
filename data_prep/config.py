"""``PrepConfig``: every option of ``alum-prep`` / :func:`data_prep.prepare`, typed, with help and checks.

Options are of two kinds: those that change the output (recorded in the manifest's
``config`` and its ``fingerprint``; a re-run with different values is refused unless ``--overwrite``)
and those that change only speed or display (``workers``, ``progress``, ``tokenizer_engine``; free to change on a re-run).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from alum_pretrain.config import opt

from .hygiene import DEFAULT_MAX_GARBAGE_FRAC
from .readers import FORMATS
from .tokenizer import TRAIN_KINDS

#: formats whose documents are table rows (--text-column / --title-column apply)
COLUMN_FORMATS = ("parquet", "hf-dataset")


@dataclass
class PrepConfig:
    inputs: list[str] = opt(None, "input files or folders (folders are read recursively, sorted by name)",
                            positional=True, metavar="INPUT")
    format: str = opt(None, "input format", choices=FORMATS, required=True)
    out: Path = opt(None, "output data-bin folder", required=True)
    vocab: str | None = opt(None, "WordPiece vocab.txt (BERT); one of --vocab/--spm-model/--tokenizer-json/--train-tokenizer")
    spm_model: str | None = opt(None, "sentencepiece .model file to encode with")
    tokenizer_json: str | None = opt(None, "HuggingFace tokenizer.json to encode with")
    train_tokenizer: str | None = opt(None, "train a tokenizer on the corpus", choices=TRAIN_KINDS)
    vocab_size: int | None = opt(None, "vocabulary size for --train-tokenizer")
    lowercase: bool | None = opt(
        None,
        "lower-case (and strip accents) before WordPiece; default: inferred from --vocab (uncased when it has no "
        "upper-case tokens), on for --train-tokenizer wordpiece; not allowed with sentencepiece/tokenizer.json",
    )
    shards: int = opt(1, "number of output shards (fairseq reads one shard per epoch: DATA=OUT/shard0:OUT/shard1:...)")
    valid_fraction: float = opt(0.01, "fraction of documents put in the valid split (chosen by a hash of the document and --seed)")
    seed: int = opt(1234, "seed of the train/valid split")
    min_doc_chars: int = opt(32, "drop documents with fewer characters than this after cleaning (counted)")
    max_tokens: int = opt(510, "sentences longer than this many tokens are cut into chunks of this size (counted); 510 = 512 - [CLS] - [SEP]")
    sentence_splitter: str = opt(
        "rules",
        "sentence splitter: 'rules' (fast rule-based, abbreviation list) or 'punkt' (NLTK Punkt, ~10x slower); "
        "see data_prep/clean.py",
        choices=("rules", "punkt"),
    )
    keep_headings: bool = opt(False, "keep titles and section headings (wikitext, wiki-xml) as their own sentences instead of dropping them")
    json_key: str = opt("text", "JSON field holding the document text (--format jsonl)")
    text_column: str = opt("text", "column holding the document text, one row per document (--format parquet or "
                                     "hf-dataset; --text-field is the same flag)")
    title_column: str | None = opt(None, "column holding the document title (--format parquet or hf-dataset; optional): "
                                         "kept as the document's first line with --keep-headings")
    on_decode_error: str = opt("replace", "invalid UTF-8: replace with U+FFFD and count it, or fail naming the file and byte offset", choices=("replace", "fail"))
    max_garbage_frac: float = opt(
        DEFAULT_MAX_GARBAGE_FRAC,
        "drop (and count as 'garbled') a document when more than this share of its characters are U+FFFD "
        "replacement or control characters; binary or wrongly-encoded input scores 0.55-0.81, Latin-1 text read "
        "as UTF-8 0.004-0.13; 1 keeps every document. A corpus more than half garbled is an error",
    )
    spm_byte_fallback: bool = opt(
        True,
        "sentencepiece training (--train-tokenizer spm-*): add 256 byte pieces so that characters outside the "
        "vocabulary become bytes instead of <unk> (needs --vocab-size >= 262)",
    )
    segment_mb: float = opt(256.0, "restart granularity: the input stream is processed in segments of this many MB of input; a killed run redoes at most the unfinished segment")
    tokenizer_train_sentences: int = opt(10_000_000, "at most this many sentences are used to train a tokenizer (the first ones of the corpus)")
    workers: int = opt(1, "worker processes for cleaning, sentence splitting and tokenization (1 = all in this process)", speed_only=True)
    progress: bool = opt(True, "show tqdm progress bars (docs/s and MB/s)", speed_only=True)
    tokenizer_engine: str = opt(
        "auto",
        "encoding engine: 'auto' = kitoken when it loads the tokenizer and gives HF's ids on a sample of this input "
        "(checked every run; else HF, saying why), 'hf' = HF tokenizers only, 'kitoken' = kitoken or an error; "
        "the ids written are HF's either way",
        choices=("auto", "hf", "kitoken"), speed_only=True,
    )

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("no input given: pass one or more files or folders")
        self.inputs = [str(p) for p in self.inputs]
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.out is None:
            raise ValueError("--out is required")
        self.out = Path(self.out)
        chosen = [n for n in ("vocab", "spm_model", "tokenizer_json", "train_tokenizer") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "choose exactly one tokenizer: --vocab vocab.txt, --spm-model X.model, --tokenizer-json tokenizer.json "
                f"or --train-tokenizer {{{','.join(TRAIN_KINDS)}}} (got {', '.join('--' + c.replace('_', '-') for c in chosen) or 'none'})"
            )
        if self.train_tokenizer is not None:
            if self.train_tokenizer not in TRAIN_KINDS:
                raise ValueError(f"--train-tokenizer must be one of {', '.join(TRAIN_KINDS)}, got {self.train_tokenizer!r}")
            if self.vocab_size is None or self.vocab_size < 16:
                raise ValueError(f"--train-tokenizer needs --vocab-size N (N >= 16), got {self.vocab_size}")
        elif self.vocab_size is not None:
            raise ValueError("--vocab-size only applies to --train-tokenizer")
        if self.lowercase is not None and (self.spm_model or self.tokenizer_json or
                                           (self.train_tokenizer or "").startswith("spm")):
            raise ValueError("--lowercase/--no-lowercase only apply to WordPiece (--vocab or --train-tokenizer wordpiece)")
        if self.shards < 1:
            raise ValueError(f"--shards must be >= 1, got {self.shards}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        if self.min_doc_chars < 0:
            raise ValueError(f"--min-doc-chars must be >= 0, got {self.min_doc_chars}")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.sentence_splitter not in ("rules", "punkt"):
            raise ValueError(f"--sentence-splitter must be 'rules' or 'punkt', got {self.sentence_splitter!r}")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise ValueError(f"--text-column must name a column, got {self.text_column!r}")
        if self.title_column is not None and (not isinstance(self.title_column, str) or not self.title_column):
            raise ValueError(f"--title-column must name a column, got {self.title_column!r}")
        if self.format not in COLUMN_FORMATS and (self.text_column != "text" or self.title_column is not None):
            raise ValueError("--text-column/--title-column only apply to --format parquet or hf-dataset "
                             "(use --json-key for jsonl)")
        if self.on_decode_error not in ("replace", "fail"):
            raise ValueError(f"--on-decode-error must be 'replace' or 'fail', got {self.on_decode_error!r}")
        if not 0.0 <= self.max_garbage_frac <= 1.0:
            raise ValueError(f"--max-garbage-frac must be in [0, 1] (a share of characters), got {self.max_garbage_frac}")
        if (self.train_tokenizer or "").startswith("spm") and self.spm_byte_fallback and self.vocab_size < 262:
            raise ValueError(
                f"--vocab-size {self.vocab_size} is too small for --spm-byte-fallback (256 byte pieces + 5 special "
                "tokens + at least one character need >= 262); raise --vocab-size or pass --no-spm-byte-fallback"
            )
        if not self.segment_mb > 0:
            raise ValueError(f"--segment-mb must be > 0, got {self.segment_mb}")
        if self.tokenizer_engine not in ("auto", "hf", "kitoken"):
            raise ValueError(f"--tokenizer-engine must be auto, hf or kitoken, got {self.tokenizer_engine!r}")
        if self.tokenizer_train_sentences < 1:
            raise ValueError(f"--tokenizer-train-sentences must be >= 1, got {self.tokenizer_train_sentences}")

    def result_options(self) -> dict:
        """The options that change the output (go into the manifest fingerprint)."""
        skip = {"inputs", "out"}
        out = {}
        for f in fields(self):
            if f.name in skip or f.metadata.get("speed_only"):
                continue
            if f.name in ("text_column", "title_column") and self.format not in COLUMN_FORMATS:
                continue  # meaningless for other formats; left out so older data-bins keep their fingerprint
            v = getattr(self, f.name)
            out[f.name] = str(Path(v).resolve()) if f.name in ("vocab", "spm_model", "tokenizer_json") and v else v
        return out
