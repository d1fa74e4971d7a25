import numpy as np

from jaxret.eval import evaluate as ev
from jaxret.lexical.bm25 import BM25
from jaxret.lexical.labels import LabelSpec, bm25_labels, cached_labels, split_hits


def test_split_hits_top_positives_bottom_negatives():
    spec = LabelSpec(top_k=8, positives=3, negatives=2)
    rows = np.array(
        [[9, 8, 7, 6, 5, 4, 3, 2], [1, 2, 3, 4, -1, -1, -1, -1], [5, -1, -1, -1, -1, -1, -1, -1]]
    )
    labels = split_hits(rows, spec)
    np.testing.assert_array_equal(labels.positives, [[9, 8, 7], [1, 2, 3], [5, -1, -1]])
    np.testing.assert_array_equal(labels.negatives, [[3, 2], [4, -1], [-1, -1]])
    assert labels.valid().all()


def test_bm25_labels_are_bm25s_ranking_and_cached(data_dir, tmp_path):
    data = ev.load_eval_data(data_dir / "adi")
    bm25 = BM25(data.corpus, show_progress=False)
    spec = LabelSpec(top_k=20, positives=5, negatives=3, batch_size=7)
    labels = bm25_labels(bm25, data.query_texts, spec, progress=False)
    _, rows = bm25.retrieve(data.query_texts, 20)
    np.testing.assert_array_equal(labels.positives, np.where(rows[:, :5] >= 0, rows[:, :5], -1))
    for i, row in enumerate(rows):
        hits = row[row >= 0]
        tail = hits[5:][-3:]
        np.testing.assert_array_equal(labels.negatives[i][: len(tail)], tail)
    cached = cached_labels(
        tmp_path, bm25, data.corpus.content_hash(), data.query_texts, spec, progress=False
    )
    np.testing.assert_array_equal(cached.positives, labels.positives)
    (path,) = tmp_path.glob("labels-*.npz")
    mtime = path.stat().st_mtime_ns
    cached_labels(
        tmp_path, bm25, data.corpus.content_hash(), data.query_texts, spec, progress=False
    )
    assert path.stat().st_mtime_ns == mtime  # reused


def test_labels_by_several_workers_equal_one_and_multi_process_runs_refuse(
    data_dir, tmp_path, monkeypatch
):
    """`jaxret prepare --workers 3` labels the queries in 3 forked processes with the same
    result as one; a multi-process training run refuses missing labels (naming the command)
    and reads prepared ones. Fails if the parts are joined out of order, or if a
    multi-process run labels (and waits in a collective) instead of refusing."""
    import jax
    import pytest

    from jaxret.data.corpus_store import StoreMissingError

    data = ev.load_eval_data(data_dir / "adi")
    bm25 = BM25(data.corpus, show_progress=False)
    spec = LabelSpec(top_k=20, positives=5, negatives=3, batch_size=7)
    one = bm25_labels(bm25, data.query_texts, spec, progress=False)
    h = data.corpus.content_hash()
    three = cached_labels(tmp_path, bm25, h, data.query_texts, spec, False, workers=3)
    np.testing.assert_array_equal(three.positives, one.positives)
    np.testing.assert_array_equal(three.negatives, one.negatives)
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.glob("labels-*.npz")).name]

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    other = LabelSpec(top_k=10, positives=2, negatives=2, batch_size=7)
    with pytest.raises(StoreMissingError, match="jaxret prepare --config=X"):
        cached_labels(
            tmp_path,
            bm25,
            h,
            data.query_texts,
            other,
            False,
            prepare_hint="jaxret prepare --config=X",
        )
    again = cached_labels(tmp_path, bm25, h, data.query_texts, spec, False)  # prepared: read
    np.testing.assert_array_equal(again.positives, one.positives)
