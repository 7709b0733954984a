"""PWWS-style greedy word-substitution attack (Ren et al., ACL 2019) with WordNet synonyms.

For an input x = (w_1 .. w_n) with true class y and the model's probability P(y | x):

1. best substitute per word: for every substitutable word w_i and each synonym c,
   dP_i(c) = P(y|x) - P(y|x[w_i -> c]); w_i* = argmax_c dP_i(c);
2. word saliency: S_i = P(y|x) - P(y|x[w_i -> UNK]);
3. priority: H_i = softmax(S)_i * dP_i(w_i*);
4. greedy: substitute words in decreasing H order, one at a time, until the prediction changes
   (success) - or the number of changed words would exceed ``max_change_fraction`` of the words, or
   the model-query budget is spent (failure: the example counts as robust).

Only WordNet synonyms of the word (:class:`.synonyms.SynonymSource`, capitalisation preserved) are
substituted; words are alphabetic runs of the text, so punctuation and spacing are kept exactly.
Every evaluated text counts as one query.  (TextAttack needs downloads - spaCy/NLTK data, USE
encoders - so the attack is written here on nltk + the local WordNet database.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .synonyms import SynonymSource, match_case

_WORD = re.compile(r"[A-Za-z]+")

# probs_fn(list of (text_a, text_b or None)) -> (N, C) class probabilities
ProbsFn = Callable[[Sequence[tuple[str, Optional[str]]]], np.ndarray]


@dataclass
class AttackResult:
    original: tuple[str, Optional[str]]
    adversarial: tuple[str, Optional[str]]
    label: int
    clean_pred: int
    adv_pred: int
    success: bool                 # the attack flipped a correct prediction
    skipped: bool                 # already misclassified: not attacked
    changed: int                  # words substituted
    words: int                    # words in the attacked field(s)
    queries: int
    substitutions: list = field(default_factory=list)  # (field, start, end, old, new)


class _Slots:
    """The substitutable words of an example: (field index, start, end, word)."""

    def __init__(self, texts: tuple[str, Optional[str]], fields: str):
        self.texts = texts
        self.slots = []
        self.n_words = 0
        for f, text in enumerate(texts):
            if text is None or (fields == "a" and f != 0) or (fields == "b" and f != 1):
                continue
            for m in _WORD.finditer(text):
                self.slots.append((f, m.start(), m.end(), m.group()))
                self.n_words += 1

    def render(self, subs: dict[int, str]) -> tuple[str, Optional[str]]:
        """The texts with slot i replaced by subs[i] (spans never overlap)."""
        out = []
        for f, text in enumerate(self.texts):
            if text is None:
                out.append(None)
                continue
            parts, pos = [], 0
            for i in sorted((i for i in subs if self.slots[i][0] == f), key=lambda i: self.slots[i][1]):
                _, s, e, _ = self.slots[i]
                parts.append(text[pos:s])
                parts.append(subs[i])
                pos = e
            parts.append(text[pos:])
            out.append("".join(parts))
        return tuple(out)  # type: ignore[return-value]


def pwws_attack(probs_fn: ProbsFn, texts: tuple[str, Optional[str]], label: int, synonyms: SynonymSource, *,
                unk_token: str, max_candidates: int = 20, max_change_fraction: float = 0.2,
                query_budget: int = 2000, fields: str = "all") -> AttackResult:
    """Attack one example (see the module docstring)."""
    queries = 0

    def query(batch):
        nonlocal queries
        queries += len(batch)
        return probs_fn(batch)

    p0 = query([texts])[0]
    pred0 = int(np.argmax(p0))
    slots = _Slots(texts, fields)
    res = AttackResult(texts, texts, label, pred0, pred0, False, pred0 != label, 0, slots.n_words, queries)
    if pred0 != label:
        return res
    max_changes = int(math.floor(max_change_fraction * slots.n_words))
    cands = {i: [match_case(w, c) for c in synonyms.synonyms(w)[:max_candidates]]
             for i, (_, _, _, w) in enumerate(slots.slots)}
    cands = {i: c for i, c in cands.items() if c}
    if max_changes < 1 or not cands:
        res.queries = queries
        return res
    order = sorted(cands)
    # steps 1-2: saliency (UNK) and best substitute per word, in as few batched queries as the budget allows
    texts_q, owners = [], []
    for i in order:
        texts_q.append(slots.render({i: unk_token}))
        owners.append((i, None))
        for c in cands[i]:
            texts_q.append(slots.render({i: c}))
            owners.append((i, c))
    if queries + len(texts_q) > query_budget:
        keep = max(0, query_budget - queries)
        texts_q, owners = texts_q[:keep], owners[:keep]
    probs = query(texts_q) if texts_q else np.zeros((0, len(p0)))
    saliency: dict[int, float] = {}
    best: dict[int, tuple[float, str]] = {}
    for (i, c), p in zip(owners, probs):
        drop = float(p0[label] - p[label])
        if c is None:
            saliency[i] = drop
        elif i not in best or drop > best[i][0]:
            best[i] = (drop, c)
    scored = [i for i in order if i in best and i in saliency]
    if not scored:
        res.queries = queries
        return res
    s = np.array([saliency[i] for i in scored])
    w = np.exp(s - s.max())
    w /= w.sum()
    priority = sorted(zip(scored, w * np.array([best[i][0] for i in scored])), key=lambda t: -t[1])
    # step 4: greedy substitution
    subs: dict[int, str] = {}
    adv_pred = pred0
    for i, _h in priority:
        if len(subs) >= max_changes or queries >= query_budget:
            break
        subs[i] = best[i][1]
        p = query([slots.render(subs)])[0]
        adv_pred = int(np.argmax(p))
        if adv_pred != label:
            break
    res.adversarial = slots.render(subs)
    res.adv_pred = adv_pred
    res.success = adv_pred != label
    res.changed = len(subs)
    res.queries = queries
    res.substitutions = [(slots.slots[i][0], slots.slots[i][1], slots.slots[i][2], slots.slots[i][3], v)
                         for i, v in sorted(subs.items())]
    return res
