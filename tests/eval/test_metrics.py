import numpy as np
import pytest
import pytrec_eval

from jaxret.data.readers import DataError
from jaxret.eval import metrics
from jaxret.eval.rbo import rbo
from jaxret.eval.trec import read_run, write_run


def random_problem(seed):
    r = np.random.RandomState(seed)
    docs = [f"d{i}" for i in range(60)]
    qrels = {
        f"q{i}": {d: int(r.randint(0, 3)) for d in r.choice(docs, 8, replace=False)}
        for i in range(12)
    }
    run = {}
    for i in range(15):  # q12..q14 are unjudged
        qid = f"q{i}"
        hits = {d: float(s) for d, s in zip(r.choice(docs, 40, replace=False), r.rand(40))}
        hits[qid] = 99.0  # a doc whose id equals the query id: BEIR drops it
        run[qid] = hits
    del run["q3"]  # a judged query missing from the run
    return qrels, run


def direct(qrels, run, measure, key):
    ev = pytrec_eval.RelevanceEvaluator(qrels, {measure})
    per_query = ev.evaluate(run)
    return float(np.mean([v[key] for v in per_query.values()])), len(per_query)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_direct_pytrec_eval(seed):
    qrels, run = random_problem(seed)
    ours = metrics.evaluate(qrels, run, ndcg_at=(10, 3), recall_at=(100, 5), mrr_at=(10,))
    clean = {q: {d: s for d, s in h.items() if d != q} for q, h in run.items() if q in qrels}
    for key, measure, name in [
        ("ndcg@10", "ndcg_cut.10", "ndcg_cut_10"),
        ("ndcg@3", "ndcg_cut.3", "ndcg_cut_3"),
        ("recall@100", "recall.100", "recall_100"),
        ("recall@5", "recall.5", "recall_5"),
        ("map", "map", "map"),
    ]:
        value, n = direct(qrels, clean, measure, name)
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert ours["num_queries"] == n == 11  # q3 missing from run, q12-14 unjudged
    top10 = {q: dict(sorted(h.items(), key=lambda kv: -kv[1])[:10]) for q, h in clean.items()}
    assert ours["mrr@10"] == pytest.approx(direct(qrels, top10, "recip_rank", "recip_rank")[0])
    # Keeping the identical id changes the result: the convention matters.
    kept = metrics.evaluate(qrels, run, ignore_identical_ids=False)
    assert kept["ndcg@10"] != ours["ndcg@10"]


def test_run_from_arrays_skips_missing_hits():
    run = metrics.run_from_arrays(
        ["q"], ["a", "b", "c"], np.array([[3.0, 2.0, 0.0]]), np.array([[2, 0, -1]])
    )
    assert run == {"q": {"c": 3.0, "a": 2.0}}


def test_rbo_hand_computed():
    assert rbo(list("abc"), list("abc")) == pytest.approx(1.0)
    assert rbo(list("abc"), list("xyz")) == pytest.approx(0.0)
    # d=1: 1·.9, d=2: .5·.81, d=3: 1·.729 → (1/9)·2.034 + .729
    assert rbo(list("abc"), list("acb")) == pytest.approx(2.034 / 9 + 0.729)
    # 1 2 3 4 vs 2 1 4 3: A = 0, 1, 2/3, 1 → (1/9)(.81 + .486 + .6561) + .6561
    assert rbo([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx((0.81 + 0.486 + 0.6561) / 9 + 0.6561)
    assert rbo(list("ab"), list("ba"), p=0.5) == pytest.approx(1.0 * 0.25 + 1.0 * (0 + 0.25))
    with pytest.raises(ValueError):
        rbo(["a"], ["a"], p=1.0)


def test_trec_run_round_trip(tmp_path):
    run = {"q1": {"d1": 2.5, "d2": 1.0}, "q2": {"d3": 0.5}}
    write_run(tmp_path / "run.txt", run, tag="t")
    lines = (tmp_path / "run.txt").read_text().splitlines()
    assert lines[0] == "q1 Q0 d1 1 2.500000 t"
    assert read_run(tmp_path / "run.txt") == run
    (tmp_path / "bad.txt").write_text("q1 Q0 d1 1 x t\n")
    with pytest.raises(DataError, match="bad.txt:1: score"):
        read_run(tmp_path / "bad.txt")
