"""Sentence queries as SPAR samples them: at least one per passage, seeded, and more from a
document's first passages (pseudo-exponential)."""

import numpy as np
import pytest

from jaxret.data import sentences as S
from jaxret.data.readers import Corpus

SENT = "This is sentence number {} of passage {} in document {}."


def synthetic(docs=300, passages=8, sents=6):
    ids, titles, texts = [], [], []
    for d in range(docs):
        for p in range(passages):
            ids.append(f"d{d}p{p}")
            titles.append(f"Document {d}")
            texts.append(" ".join(SENT.format(s, p, d) for s in range(sents)))
    return Corpus(ids, titles, texts)


@pytest.mark.parametrize("splitter", ["sentencex", "moses"])
def test_splitters_split_real_sentences(splitter):
    split = S.splitter(splitter)
    text = "Dr. Smith went to Washington D.C. in 1999. He met Mr. Jones! Was it fun? Yes."
    assert split(text) == [
        "Dr. Smith went to Washington D.C. in 1999.",
        "He met Mr. Jones!",
        "Was it fun?",
        "Yes.",
    ]


def test_pseudo_exponential_prefers_early_passages():
    corpus = synthetic()
    spec = S.QuerySpec(mode="auto", seed=3)
    q = S.sample_queries(corpus, spec, progress=False)
    per = np.bincount(q.rows, minlength=len(corpus)).reshape(300, 8)
    assert per.min() >= 1  # every passage gives at least one query
    # SPAR's count: max(1, round(6 / (1.2 · (i + 1)))) = 5, 2, 2, 1, 1, 1, 1, 1
    np.testing.assert_array_equal(per[0], [5, 2, 2, 1, 1, 1, 1, 1])
    assert (per == per[0]).all()
    # Which sentences are drawn is random but uniform within a passage: a chi-square-like
    # check that the first passage's 5 of 6 leave each sentence out about equally often.
    first = q.sentence[np.isin(q.rows, np.arange(0, len(corpus), 8))]
    counts = np.bincount(first, minlength=6)  # 300 × 5 draws over 6 sentences: 250 each
    assert np.abs(counts - 250).max() < 40
    assert S.has_document_structure(corpus)


def test_uniform_and_all_modes_and_determinism():
    flat = Corpus(
        [f"p{i}" for i in range(50)],
        [""] * 50,
        [" ".join(SENT.format(s, i, 0) for s in range(6)) for i in range(50)],
    )
    assert not S.has_document_structure(flat)
    q = S.sample_queries(flat, S.QuerySpec(mode="auto"), progress=False)
    assert (np.bincount(q.rows) == 5).all()  # uniform: every passage as a first passage
    everything = S.sample_queries(flat, S.QuerySpec(mode="all"), progress=False)
    assert len(everything) == 300
    a = S.sample_queries(flat, S.QuerySpec(seed=1), progress=False)
    b = S.sample_queries(flat, S.QuerySpec(seed=1), progress=False)
    c = S.sample_queries(flat, S.QuerySpec(seed=2), progress=False)
    assert a.texts == b.texts and a.texts != c.texts
    # Order independence: sampling a subset of rows gives those rows' queries unchanged.
    part = S.sample_queries(flat, S.QuerySpec(seed=1), rows=range(25, 50), progress=False)
    assert part.texts == [t for t, r in zip(a.texts, a.rows) if r >= 25]


def test_written_once_and_reused(tmp_path):
    corpus = synthetic(docs=5, passages=3)
    spec = S.QuerySpec()
    q1, path = S.load_or_sample(corpus, spec, tmp_path, progress=False)
    assert path.is_file() and path.read_text().count("\n") == len(q1)
    mtime = path.stat().st_mtime_ns
    q2, path2 = S.load_or_sample(corpus, spec, tmp_path, progress=False)
    assert path2 == path and path.stat().st_mtime_ns == mtime
    assert (
        q2.texts == q1.texts and (q2.rows == q1.rows).all() and (q2.sentence == q1.sentence).all()
    )
    _, other = S.load_or_sample(corpus, S.QuerySpec(seed=9), tmp_path, progress=False)
    assert other != path


def test_ict_pair():
    rng = np.random.default_rng(0)
    q, doc = S.ict_pair(["a b.", "c d.", "e f."], rng)
    assert q in ("a b.", "c d.", "e f.") and q not in doc and len(doc.split()) == 4
    kept = [
        S.ict_pair(["a.", "b.", "c."], np.random.default_rng(i), remove_prob=0.0) for i in range(5)
    ]
    assert all(doc == "a. b. c." for _, doc in kept)
    assert S.ict_pair(["only one."], rng) is None
