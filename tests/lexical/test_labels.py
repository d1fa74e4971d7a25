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
