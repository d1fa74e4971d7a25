import numpy as np
import pytest

from jaxret.eval import evaluate as ev
from jaxret.lexical.bm25 import BM25, BM25Config


@pytest.mark.parametrize(
    "name,ndcg,readme",
    # jaxret's recorded values (bm25s lucene, k1=1.2, b=0.75, \w+ tokens) and the data README's
    [("cranfield", 0.3434, 0.331), ("squad-dev-open", 0.8146, 0.815)],
)
def test_bm25_ndcg_consistent_with_data_readme(shared_data, name, ndcg, readme):
    data = ev.load_eval_data(shared_data / name)
    scores, rows, desc = ev.bm25_search(data, 100, progress=False)
    result = ev.compute_metrics(data, scores, rows)
    assert result["ndcg@10"] == pytest.approx(ndcg, abs=5e-4)
    assert abs(result["ndcg@10"] - readme) < 0.02
    assert desc["k1"] == 1.2 and desc["b"] == 0.75 and "token_pattern" in desc


def test_pair_scores_equal_retrieval_scores(shared_data):
    data = ev.load_eval_data(shared_data / "adi")
    bm25 = BM25(data.corpus, BM25Config(), show_progress=False)
    scores, rows = bm25.retrieve(data.query_texts[:5], 10)
    pairs = bm25.score_pairs(data.query_texts[:5], np.where(rows >= 0, rows, 0))
    np.testing.assert_allclose(pairs[rows >= 0], scores[rows >= 0], rtol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
