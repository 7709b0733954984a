"""WordNet synonyms, read offline from Debian's ``wordnet-base`` package with nltk's WordNet reader.

``apt-get install wordnet-base`` installs the WordNet 3.0 database (``data.*``, ``index.*``, ``*.exc``)
in ``/usr/share/wordnet``.  nltk's :class:`~nltk.corpus.reader.wordnet.WordNetCorpusReader` reads that
layout, with three adjustments made here:

* the package lacks the ``lexnames`` file (the 45 lexicographer file names of WordNet 3.0, documented
  in ``lexnames(5WN)``); the reader gets it from :data:`LEXNAMES` instead;
* nltk's path sandbox only opens files under ``nltk.data.path``, so the folder is appended to it;
* the open-multilingual-wordnet mapping (``map_wn``), which would look for nltk's downloadable
  ``wordnet`` resource, is disabled (only English lemmas are used).

Set ``ALUM_WORDNET_DIR`` (or pass ``wordnet_dir``) to read another folder with the same files, e.g. an
unzipped nltk ``corpora/wordnet`` download.

:class:`SynonymSource` turns a word into substitution candidates: the lemma names of all synsets of the
word (in WordNet's sense-frequency order, so the commonest senses come first), single alphabetic words
only, lower-cased, without the word itself and without stop words.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from functools import lru_cache
from pathlib import Path

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"

# lexnames(5WN): file number, lexicographer file name, syntactic category (1 noun 2 verb 3 adj 4 adv).
_LEX = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
        "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
        "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
        "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
        "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
        "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
        "adj.ppl").split()
_CAT = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
LEXNAMES = "".join(f"{i:02d}\t{name}\t{_CAT[name.split('.')[0]]}\n" for i, name in enumerate(_LEX))

# Function words are never substituted (an attack that swaps "not" or "the" changes syntax, not wording).
STOP_WORDS = frozenset("""a about above after again against all am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most my myself no
nor not now of off on once only or other our ours ourselves out over own same she should so some such than that
the their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves n't 's 're 've 'd 'll
""".split())

_WORD = re.compile(r"^[a-z]+$")


class WordNetUnavailable(RuntimeError):
    pass


def wordnet_dir(path: str = "") -> Path:
    return Path(path or os.environ.get("ALUM_WORDNET_DIR", "") or DEFAULT_WORDNET_DIR)


def wordnet_available(path: str = "") -> bool:
    d = wordnet_dir(path)
    return all((d / f).is_file() for f in ("data.noun", "index.noun", "data.adj", "index.sense")) or \
        all((d / f).is_file() for f in ("data.noun", "index.noun", "data.adj", "noun.exc"))


@lru_cache(maxsize=4)
def load_wordnet(path: str = ""):
    """nltk's WordNet reader on the local database folder (cached per folder)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = wordnet_dir(path)
    if not wordnet_available(str(root)):
        raise WordNetUnavailable(
            f"WordNet database not found in {root} (data.noun, index.noun ...): install it with "
            "`apt-get install wordnet-base` or set ALUM_WORDNET_DIR to a folder holding the WordNet 3.0 files")

    class _LocalWordNet(WordNetCorpusReader):
        def open(self, file):  # noqa: A003 - nltk's API name
            if file == "lexnames" and not (root / "lexnames").is_file():
                return io.StringIO(LEXNAMES)
            return super().open(file)

        def map_wn(self, version="wordnet"):
            return None  # no open-multilingual-wordnet mapping (would need nltk's downloadable resource)

    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return _LocalWordNet(str(root), None)


class SynonymSource:
    """``synonyms(word) -> list[str]``: WordNet substitution candidates (cached)."""

    def __init__(self, wordnet_path: str = "", max_candidates: int = 50):
        self.wn = load_wordnet(wordnet_path)
        self.max_candidates = max_candidates
        self._cache: dict[str, tuple[str, ...]] = {}

    def synonyms(self, word: str) -> tuple[str, ...]:
        w = word.lower()
        if w in self._cache:
            return self._cache[w]
        out: list[str] = []
        if _WORD.match(w) and w not in STOP_WORDS and len(w) > 1:
            seen = {w}
            for syn in self.wn.synsets(w):
                for lemma in syn.lemma_names():
                    cand = lemma.lower()
                    if cand in seen or not _WORD.match(cand) or cand in STOP_WORDS:
                        continue
                    seen.add(cand)
                    out.append(cand)
                    if len(out) >= self.max_candidates:
                        break
                if len(out) >= self.max_candidates:
                    break
        res = tuple(out)
        self._cache[w] = res
        return res


def match_case(template: str, word: str) -> str:
    """``word`` with the capitalisation pattern of ``template`` (Title, UPPER or lower)."""
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word
