"""Tokenizers: load one (WordPiece ``vocab.txt``, sentencepiece ``.model``, HF ``tokenizer.json``) or train
one on the corpus (WordPiece with ``tokenizers``; unigram / BPE with ``sentencepiece``), and save it as a
HuggingFace fast-tokenizer folder plus a fairseq ``dict.txt``.

Every tokenizer ends up as a :class:`tokenizers.Tokenizer` wrapped in
:class:`transformers.PreTrainedTokenizerFast` with explicit special tokens:

* WordPiece (BERT style): ``[CLS] [SEP] [MASK] [PAD] [UNK]``;
* sentencepiece / BPE / other ``tokenizer.json`` (RoBERTa style): ``<s> </s> <mask> <pad> <unk>``.

Special tokens missing from a given vocabulary are appended (new ids at the end), so the saved folder
always has all five.  The worker processes encode with the very ``tokenizer.json`` that is saved in
``OUT/tokenizer/`` (``add_special_tokens=False``), so ``AutoTokenizer.from_pretrained(OUT/tokenizer)``
gives the ids that are on disk (minus the fairseq offset of 4).

A sentencepiece model is converted to a ``tokenizers`` pipeline the way ``transformers``' ``SpmConverter``
does it (``Precompiled`` normaliser from the model's charsmap, ``Metaspace`` pre-tokenizer/decoder,
``Unigram`` or ``BPE`` with the model's pieces/merges); the tests check the ids against ``sentencepiece``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from alum_pretrain.atomic import atomic_dir, atomic_file

BERT_SPECIALS = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"}
ROBERTA_SPECIALS = {"cls": "<s>", "sep": "</s>", "mask": "<mask>", "pad": "<pad>", "unk": "<unk>"}
TRAIN_KINDS = ("wordpiece", "spm-unigram", "spm-bpe")
# fairseq's Dictionary puts these at ids 0..3 before the symbols of dict.txt.
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_SPACE_RE = re.compile(r"\s")


def infer_lowercase(vocab_file: str | os.PathLike) -> bool:
    """A WordPiece vocab is uncased when no ordinary token has an upper-case ASCII letter.

    Bracketed tokens (``[CLS]``, ``[unused0]``) do not count.
    """
    text = Path(vocab_file).read_text(encoding="utf-8")
    return re.search(r"^(?!\[[^\n]*\]$)[^\n]*[A-Z]", text, flags=re.M) is None


def _wrap(tok, specials: dict[str, str], model_max_length: int):
    """Add missing special tokens, wrap in PreTrainedTokenizerFast with them named explicitly."""
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    cls, sep = specials["cls"], specials["sep"]
    tok.post_processor = TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token=specials["cls"],
        sep_token=specials["sep"],
        mask_token=specials["mask"],
        pad_token=specials["pad"],
        unk_token=specials["unk"],
        bos_token=None if specials["cls"] == "[CLS]" else specials["cls"],
        eos_token=None if specials["sep"] == "[SEP]" else specials["sep"],
        model_max_length=model_max_length,
    )


def from_vocab(vocab_file: str | os.PathLike, lowercase: bool | None, model_max_length: int):
    from tokenizers import BertWordPieceTokenizer

    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{vocab_file}: --vocab file not found")
    check_text_vocab(vocab_file)
    seen: dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            tok = line.rstrip("\n")
            if tok in seen:
                raise ValueError(f"{vocab_file}:{lineno}: token {tok!r} already on line {seen[tok]}; "
                                 "a WordPiece vocab needs one distinct token per line")
            seen[tok] = lineno
    if lowercase is None:
        lowercase = infer_lowercase(vocab_file)
    bw = BertWordPieceTokenizer(str(vocab_file), lowercase=lowercase, strip_accents=None, clean_text=True)
    tok = bw._tokenizer
    if tok.token_to_id("[UNK]") is None:
        raise ValueError(f"{vocab_file}: a WordPiece vocab must contain [UNK] (one token per line, BERT style)")
    return _wrap(tok, BERT_SPECIALS, model_max_length), {"kind": "wordpiece", "lowercase": lowercase}


def check_text_vocab(vocab_file: Path) -> None:
    """Refuse a ``--vocab`` file that is not a UTF-8 text vocab.txt, naming it and the likely right flag."""
    data = vocab_file.read_bytes()
    what = "a WordPiece vocab.txt (UTF-8 text, one token per line)"
    if not data.strip():
        raise ValueError(f"{vocab_file}: --vocab file is empty; --vocab takes {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{vocab_file}: not a text vocab file (invalid UTF-8 at byte {e.start}, line {line}); --vocab takes {what} — "
            "a sentencepiece .model goes to --spm-model, a tokenizer.json to --tokenizer-json"
        ) from None
    if "\x00" in text:
        raise ValueError(f"{vocab_file}: not a text vocab file (it holds NUL bytes: binary data); --vocab takes {what} — "
                         "a sentencepiece .model goes to --spm-model")
    if text.lstrip().startswith("{"):
        raise ValueError(f"{vocab_file}: looks like JSON, not a vocab.txt; pass a HuggingFace tokenizer.json with "
                         "--tokenizer-json (--vocab takes one token per line)")


def _spm_to_tokenizers(model_file: str | os.PathLike):
    """sentencepiece ``.model`` -> (tokenizers.Tokenizer, special token names, model type name)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = pb.ModelProto()
    with open(model_file, "rb") as fh:
        try:
            proto.ParseFromString(fh.read())
        except Exception as e:  # protobuf's DecodeError
            raise ValueError(f"{model_file}: not a sentencepiece model ({e})") from None
    spec = proto.trainer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if not pieces:  # protobuf parses many byte strings (even empty ones) as an empty message
        raise ValueError(f"{model_file}: not a sentencepiece model (no pieces in it); --spm-model takes the .model "
                         "file written by sentencepiece training")
    if spec.model_type == pb.TrainerSpec.UNIGRAM:
        model = Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
        kind = "spm-unigram"
    elif spec.model_type == pb.TrainerSpec.BPE:
        from transformers.tokenization_utils_base import generate_merges

        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        model = BPE(vocab, generate_merges(vocab), unk_token=spec.unk_piece, fuse_unk=True,
                    byte_fallback=spec.byte_fallback)
        kind = "spm-bpe"
    else:
        raise ValueError(f"{model_file}: sentencepiece model type {spec.model_type} is not supported (unigram or bpe)")
    tok = Tokenizer(model)
    norms = []
    if proto.normalizer_spec.precompiled_charsmap:
        norms.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    norms.append(normalizers.Replace(Regex(" {2,}"), " "))
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    if spec.byte_fallback:  # "<0xE2><0x82><0xAC>" pieces decode back to the character they encode
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), tok.decoder])
    # Control (3) and user-defined (4) pieces are atomic; control pieces are special.
    added = [AddedToken(p.piece, special=p.type == 3, normalized=False) for p in proto.pieces if p.type in (3, 4)]
    if added:
        tok.add_tokens(added)
    specials = dict(ROBERTA_SPECIALS)
    if spec.unk_piece:
        specials["unk"] = spec.unk_piece
    if spec.bos_id >= 0 and spec.bos_piece:
        specials["cls"] = spec.bos_piece
    if spec.eos_id >= 0 and spec.eos_piece:
        specials["sep"] = spec.eos_piece
    if spec.pad_id >= 0 and spec.pad_piece:
        specials["pad"] = spec.pad_piece
    return tok, specials, kind


def from_spm(model_file: str | os.PathLike, model_max_length: int):
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: --spm-model file not found")
    tok, specials, kind = _spm_to_tokenizers(model_file)
    hf = _wrap(tok, specials, model_max_length)
    return hf, {"kind": kind, "lowercase": None}


def from_tokenizer_json(path: str | os.PathLike, model_max_length: int):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --tokenizer-json file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a HuggingFace tokenizer.json ({e})") from None
    specials = BERT_SPECIALS if tok.token_to_id("[CLS]") is not None else ROBERTA_SPECIALS
    return _wrap(tok, specials, model_max_length), {"kind": "tokenizer-json", "lowercase": None}


def train(kind: str, sentences: Callable[[], Iterator[str]], vocab_size: int, lowercase: bool | None,
          model_max_length: int, workdir: Path, max_sentences: int = 10_000_000, seed: int = 1234,
          byte_fallback: bool = True):
    """Train a tokenizer on the corpus.  ``sentences()`` returns a fresh iterator over cleaned sentences.

    sentencepiece training is reproducible (fixed seed, one thread); WordPiece pieces are renumbered
    canonically (:func:`canonical_vocab`) because ``tokenizers``' trainer numbers tied pieces in hash-map
    order.  The trained tokenizer is saved once and reused when a killed run resumes, so one data-bin is
    always encoded with one tokenizer.

    sentencepiece models get ``byte_fallback`` (default): 256 ``<0xNN>`` pieces, so a character outside
    the vocabulary (below ``character_coverage``) is encoded as its UTF-8 bytes instead of ``<unk>``;
    without it a model emits ``<unk>`` even on its own training text.
    """
    if kind == "wordpiece":
        from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece
        from tokenizers.trainers import WordPieceTrainer

        lowercase = True if lowercase is None else lowercase  # BERT-uncased convention
        tok = Tokenizer(WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=lowercase, strip_accents=None)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
        trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(_capped(sentences(), max_sentences), trainer=trainer)
        tok.model = WordPiece(canonical_vocab(tok.get_vocab(with_added_tokens=False), len(specials)),
                              unk_token="[UNK]", continuing_subword_prefix="##")
        return _wrap(tok, BERT_SPECIALS, model_max_length), {"kind": "wordpiece", "lowercase": lowercase}
    if kind in ("spm-unigram", "spm-bpe"):
        import sentencepiece as spm

        if lowercase:
            raise ValueError("--lowercase is not supported with sentencepiece training (sentencepiece models are cased)")
        workdir.mkdir(parents=True, exist_ok=True)
        prefix = workdir / "spm"
        spm.set_random_generator_seed(seed)  # sentence sampling/shuffling: reproducible
        try:
            _train_spm(spm, sentences, max_sentences, prefix, kind, vocab_size, byte_fallback)
        except RuntimeError as e:  # sentencepiece's own checks ("Vocabulary size is smaller than ...")
            m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
            if m:
                raise ValueError(f"--vocab-size {m.group(1)} is too small for this corpus: its characters"
                                 f"{' and the 256 byte pieces' if byte_fallback else ''} and the special tokens need "
                                 f"at least {m.group(2)}; raise --vocab-size") from None
            raise ValueError(f"sentencepiece training failed: {str(e).strip().splitlines()[0]}") from None
        hf, info = from_spm(str(prefix) + ".model", model_max_length)
        info["kind"] = kind
        return hf, info
    raise ValueError(f"--train-tokenizer must be one of {', '.join(TRAIN_KINDS)}, got {kind!r}")


def canonical_vocab(vocab: dict[str, int], n_specials: int) -> dict[str, int]:
    """A trained WordPiece ``vocab`` numbered canonically: the ``n_specials`` special tokens keep ids
    ``0..n_specials-1``, every other piece follows in sorted order.

    ``tokenizers``' WordPiece trainer numbers pieces that tie in frequency in hash-map order, which differs
    from process to process (the same corpus gave three numberings of one set of pieces in three
    processes).  Sorting makes the ids a function of the set of pieces; the segmentation (greedy longest
    match) depends only on that set.  At ties the trainer can also pick other pieces in another process;
    numbering cannot fix that.
    """
    specials = sorted((t for t, i in vocab.items() if i < n_specials), key=vocab.get)
    rest = sorted(t for t, i in vocab.items() if i >= n_specials)
    return {t: i for i, t in enumerate(specials + rest)}


def _train_spm(spm, sentences, max_sentences, prefix, kind, vocab_size, byte_fallback) -> None:
    # RoBERTa/fairseq order: <s>=0 <pad>=1 </s>=2 <unk>=3, then <mask> as a control symbol (4).
    spm.SentencePieceTrainer.train(
        sentence_iterator=_capped(sentences(), max_sentences),
        model_prefix=str(prefix),
        model_type=kind.split("-")[1],
        vocab_size=vocab_size,
        bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        bos_piece="<s>", pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        control_symbols=["<mask>"],
        character_coverage=0.9995,
        byte_fallback=byte_fallback,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,  # a small corpus may not support the full size; never fail on it
        minloglevel=2,
        num_threads=1,
    )


def _capped(it: Iterable[str], n: int) -> Iterator[str]:
    for i, s in enumerate(it):
        if i >= n:
            return
        yield s


def special_ids(hf) -> dict[str, int]:
    return {
        "cls": hf.cls_token_id,
        "sep": hf.sep_token_id,
        "mask": hf.mask_token_id,
        "pad": hf.pad_token_id,
        "unk": hf.unk_token_id,
    }


def special_tokens(hf) -> dict[str, str]:
    return {"cls": hf.cls_token, "sep": hf.sep_token, "mask": hf.mask_token, "pad": hf.pad_token, "unk": hf.unk_token}


def tokens_in_id_order(hf) -> list[str]:
    """Every token of the backend tokenizer (added tokens included) by id; checks the ids are dense."""
    vocab = hf.backend_tokenizer.get_vocab(with_added_tokens=True)
    n = len(vocab)
    out: list[str | None] = [None] * n
    for t, i in vocab.items():
        if not 0 <= i < n or out[i] is not None:
            raise ValueError(f"the tokenizer's ids are not dense 0..{n - 1} (token {t!r} has id {i}); cannot write dict.txt")
        out[i] = t
    return out  # type: ignore[return-value]


def write_dict(tokens: list[str], counts, path: Path) -> None:
    """fairseq ``dict.txt``: one ``<token> <count>`` line per tokenizer id, in id order.

    fairseq's ``Dictionary.add_from_file`` refuses a token it already has (its own ``<s> <pad> </s> <unk>``)
    unless the line ends with the ``#fairseq:overwrite`` flag; with it, the token gets a *new* index at its
    position (4 + tokenizer id), which keeps ``disk id = tokenizer id + 4`` for every token.  Tokens that
    cannot be written on one line (whitespace inside or empty) get a placeholder name; ids are unchanged.
    """
    with atomic_file(path, durable=True) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for i, t in enumerate(tokens):
            name = t
            if not t or _SPACE_RE.search(t):
                name = f"<alum_unprintable_{i}>"
            flag = " #fairseq:overwrite" if name in FAIRSEQ_SPECIALS else ""
            fh.write(f"{name} {int(counts[i])}{flag}\n")


def save(hf, out_dir: Path) -> None:
    """Write the HF folder atomically (temp folder, then rename)."""
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(str(tmp))
