import numpy as np

from jaxret.index.scann_index import ScannIndex, recall_at_k


def test_scann_build_save_load_recall(tmp_path):
    r = np.random.RandomState(0)
    centers = r.randn(20, 16)
    db = (centers[r.randint(0, 20, 2000)] + 0.1 * r.randn(2000, 16)).astype(np.float32)
    q = (centers[r.randint(0, 20, 50)] + 0.1 * r.randn(50, 16)).astype(np.float32)
    exact_scores = q.astype(np.float64) @ db.astype(np.float64).T
    exact = np.argsort(-exact_scores, axis=1, kind="stable")[:, :10]
    index = ScannIndex.build(db, k=10)
    scores, ids = index.search(q, 10)
    assert recall_at_k(ids, exact) > 0.8
    np.testing.assert_allclose(
        scores, np.take_along_axis(exact_scores, ids, 1), rtol=1e-4, atol=1e-4
    )
    index.save(tmp_path / "nested" / "scann")  # the folder is created first
    again = ScannIndex.load(tmp_path / "nested" / "scann")
    np.testing.assert_array_equal(again.search(q, 10)[1], ids)
    assert recall_at_k(exact, exact) == 1.0
