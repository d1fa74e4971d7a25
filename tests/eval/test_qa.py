import numpy as np
import pytest

from jaxret.eval.qa import has_answer, hits_matrix, simple_tokens, top_k_accuracy


@pytest.mark.parametrize(
    "answers,text,expected",
    [
        (["Denver Broncos"], "The Denver Broncos won.", True),
        (["denver broncos"], "THE DENVER BRONCOS", True),  # casing
        (["Broncos"], "Denver-Broncos!", True),  # punctuation is its own token
        (["Bronco"], "The Broncos", False),  # no sub-word matches
        (["Pelé"], "pele scored", False),  # NFD keeps the accent as a mark
        (["Pelé"], "Pele\u0301 scored", True),  # composed vs decomposed accent
        (["café"], "Café au lait", True),
        (["Beyoncé Knowles"], "singer beyoncé knowles-carter", True),  # multi-token
        (["New York City"], "New York's City Hall", False),  # not contiguous
        (["3.5"], "about 3.5 million", True),  # "3", ".", "5"
        (["3.5"], "about 35 million", False),
        (["U.S."], "the u.s. army", True),
        (["x", "Paris"], "in paris, france", True),  # any answer suffices
        (["$1,000"], "costs $1,000 today", True),
    ],
)
def test_has_answer_string(answers, text, expected):
    assert has_answer(answers, text) is expected


def test_simple_tokenizer():
    assert simple_tokens("Hello, World! 3.5%") == ["hello", ",", "world", "!", "3", ".", "5", "%"]


@pytest.mark.parametrize(
    "pattern,text,expected",
    [
        (r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t", "Mount McKinley is 20,320 feet tall", True),
        (r"\bparis\b", "PARIS is big", True),  # case-insensitive
        (r"^second", "first line\nsecond line", True),  # multiline
        (r"lions?", "tigers only", False),
        (r"(unclosed", "anything", False),  # an invalid pattern never matches
    ],
)
def test_has_answer_regex(pattern, text, expected):
    assert has_answer([pattern], text, "regex") is expected


def test_hits_and_top_k_accuracy():
    texts = ["the cat sat", "a dog ran", "cats and dogs", "paris 1889"]
    rows = np.array([[1, 0, 2], [2, 1, -1], [3, 1, 0]])
    hits = hits_matrix(
        [["cat"], ["elephant"], [r"18\d\d"]], ["string", "string", "regex"], rows, texts
    )
    np.testing.assert_array_equal(
        hits, [[False, True, False], [False, False, False], [True, False, False]]
    )
    acc = top_k_accuracy(hits, (1, 2, 3))
    assert acc == {
        "top1": pytest.approx(1 / 3),
        "top2": pytest.approx(2 / 3),
        "top3": pytest.approx(2 / 3),
    }
    # hits_matrix agrees with has_answer pair by pair
    for i, ans in enumerate([["cat"], ["elephant"]]):
        for j, r in enumerate(rows[i]):
            assert hits[i, j] == (r >= 0 and has_answer(ans, texts[r]))
    with pytest.raises(ValueError, match="fuzzy"):
        has_answer(["a"], "a", "fuzzy")


def _qa_case(n_passages=300, n_questions=40, k=12, seed=0):
    """Passages of words, each question's answer taken from one passage (so hits exist),
    string and regex answers mixed, some rows -1 (fewer than k found)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.choice(words, 30)) + f" é{i}." for i in range(n_passages)]
    rows = rng.integers(0, n_passages, (n_questions, k))
    rows[::7, -3:] = -1
    answers, types = [], []
    for i in range(n_questions):
        tokens = texts[rows[i, i % k]].split()
        start = int(rng.integers(0, len(tokens) - 2))
        answers.append([" ".join(tokens[start : start + 2]), "never there"])
        types.append("regex" if i % 5 == 0 else "string")
    return answers, types, rows, texts


def test_answer_workers_match_as_the_calling_thread(tmp_path):
    """`AnswerMatcher(2)` (spawned workers, questions split between them) returns what
    `hits_matrix` returns in the calling thread, for a corpus held as strings (the
    retrieved texts sent) and for the store's memory-mapped text table (sent as the files it
    maps: a pickle of a few hundred bytes, whatever the corpus size). Fails if the rows sent
    with the retrieved texts are not renumbered (`_portable`), if a chunk's questions are
    misaligned with its rows, if `Strings` pickles its bytes (the size check), or if
    unpickling it imports JAX (`Strings` back in `corpus_text`, which does)."""
    import pickle
    import subprocess
    import sys

    from jaxret.data.corpus_text import stored_corpus, write_text_table
    from jaxret.data.readers import read_corpus
    from jaxret.eval.qa import AnswerMatcher

    answers, types, rows, texts = _qa_case()
    expected = hits_matrix(answers, types, rows, texts)
    assert 0.05 < expected.mean() < 0.9  # hits and misses both
    source = tmp_path / "corpus.jsonl"
    source.write_text(
        "".join(f'{{"_id": "d{i}", "title": "", "text": "{t}"}}\n' for i, t in enumerate(texts))
    )
    write_text_table(tmp_path / "store", source, read_corpus(source))
    stored = stored_corpus(tmp_path / "store", source).texts
    assert len(pickle.dumps(stored)) < 1000 < len(pickle.dumps(list(texts)))
    assert list(pickle.loads(pickle.dumps(stored))) == texts
    # A worker maps the table without importing JAX (seconds and ~100 MB per worker).
    code = (
        "import pickle, sys; s = pickle.loads(sys.stdin.buffer.read()); "
        "print(len(s), 'jax' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(stored), capture_output=True
    )
    assert out.stdout.split() == [b"300", b"False"], out.stderr.decode()[-2000:]
    matcher = AnswerMatcher(2)
    try:
        for corpus in (texts, stored):
            matching = matcher.submit(answers, types, rows, corpus)
            np.testing.assert_array_equal(matching.result(), expected)
            assert matching.done()
        assert len(matcher._pool._processes) == 2  # the matching ran in the workers
    finally:
        matcher.close()
    np.testing.assert_array_equal(
        AnswerMatcher(0).submit(answers, types, rows, texts).result(), expected
    )


def test_answer_workers_setting():
    """-1 (auto): none on CPU devices (their cores are the devices'), at least one and at
    most 8 elsewhere; a given count is kept; anything else is refused. Fails if auto
    starts workers on CPU devices."""
    from jaxret.eval.qa import workers_for

    assert workers_for(-1, "cpu") == 0
    assert 1 <= workers_for(-1, "gpu") <= 8
    assert workers_for(3, "cpu") == 3
    with pytest.raises(ValueError, match="answer_workers=-2"):
        workers_for(-2, "tpu")


def test_remembered_hits_match_each_pair_once():
    """Three rankings of the same questions (reordered, overlapping, with -1 rows):
    `RememberedHits.matrix` equals `hits_matrix` for each, and matches only pairs it has not
    seen (the count is the distinct (question, row) pairs). Fails if a remembered pair is
    matched again (the count) or is returned from another question's memory (the values)."""
    from jaxret.eval.qa import RememberedHits

    answers, types, rows, texts = _qa_case()
    rng = np.random.default_rng(1)
    rankings = [rows, rows[:, ::-1].copy(), np.where(rng.random(rows.shape) < 0.5, rows, 7)]
    remembered = RememberedHits(answers, types, texts)
    for ranking in rankings:
        np.testing.assert_array_equal(
            remembered.matrix(ranking), hits_matrix(answers, types, ranking, texts)
        )
    distinct = sum(
        len({int(r) for k in rankings for r in k[i] if r >= 0}) for i in range(len(rows))
    )
    assert remembered.matched == distinct < sum(int((k >= 0).sum()) for k in rankings)


def test_hits_matrix_keeps_a_bounded_number_of_passages():
    """2,000 distinct 100-word passages: with `cache=128` the matching's peak Python memory
    is under a fifth of keeping them all (~19 KB each), and the hits are the same. Fails if
    the tokenized passages are never let go (NQ dev's 0.9M would hold ~16 GB)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    vocab = [f"{a}{b}" for a in ("ka", "to", "mi") for b in range(2000)]
    texts = [" ".join(rng.choice(vocab, 100)) for _ in range(2000)]
    rows = rng.permutation(2000).reshape(20, 100)
    answers = [[" ".join(texts[rows[i, 5]].split()[3:5])] for i in range(20)]
    peaks, hits = [], []
    for cache in (10**9, 128):
        tracemalloc.start()
        hits.append(hits_matrix(answers, ["string"] * 20, rows, texts, cache=cache))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    np.testing.assert_array_equal(hits[0], hits[1])
    assert hits[1][:, 5].all()
    assert peaks[1] < peaks[0] / 5, peaks


def test_a_lost_answer_worker_is_replaced_by_the_calling_thread(caplog):
    """A worker killed (the OOM killer, a stray signal) breaks the pool: what was sent to it
    is matched in the calling thread, with a warning, and the hits are the same. Fails if
    `BrokenProcessPool` reaches the evaluation (the run would stop)."""
    import os
    import signal
    import time

    from jaxret.eval.qa import AnswerMatcher

    answers, types, rows, texts = _qa_case(n_questions=10)
    expected = hits_matrix(answers, types, rows, texts)
    matcher = AnswerMatcher(1)
    try:
        matcher.submit(answers, types, rows, texts).result()  # the worker is up
        pids = list(matcher._pool._processes)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while any(p.is_alive() for p in matcher._pool._processes.values()):
            assert time.time() < deadline
            time.sleep(0.05)
        with caplog.at_level("WARNING"):
            hits = matcher.submit(answers, types, rows, texts).result()
    finally:
        matcher.close()
    np.testing.assert_array_equal(hits, expected)
    assert "matched here instead" in caplog.text


def test_answer_workers_outlive_a_sigterm(caplog):
    """SLURM's SIGTERM reaches every process of the job step, the workers too: they keep
    matching (the SIGTERM'd run still finishes its last evaluation before saving). Fails
    if the workers take SIGTERM's default action (the pool breaks: a warning, and the
    matching falls back to the training thread)."""
    import os
    import signal
    import time

    from jaxret.eval.qa import AnswerMatcher

    answers, types, rows, texts = _qa_case(n_questions=10)
    matcher = AnswerMatcher(1)
    try:
        matcher.submit(answers, types, rows, texts).result()  # the worker is up
        (process,) = matcher._pool._processes.values()
        os.kill(process.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert process.is_alive()
        with caplog.at_level("WARNING"):
            hits = matcher.submit(answers, types, rows, texts).result()
    finally:
        matcher.close()
    np.testing.assert_array_equal(hits, hits_matrix(answers, types, rows, texts))
    assert "instead" not in caplog.text
