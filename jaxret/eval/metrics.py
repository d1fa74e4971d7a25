"""nDCG@k, Recall@k, MRR@k and MAP through pytrec_eval, with BEIR's conventions:

* a hit whose doc id equals its query id is dropped (BEIR's ignore_identical_ids);
* queries without judgements are skipped, and so are judged queries absent from the run;
  the mean is over the queries evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Run = dict[str, dict[str, float]]  # query id -> doc id -> score
Qrels = dict[str, dict[str, int]]


def drop_identical_ids(run: Run) -> Run:
    return {qid: {d: s for d, s in hits.items() if d != qid} for qid, hits in run.items()}


def truncate(run: Run, k: int) -> Run:
    """Each query's k best hits; ties go as trec_eval ranks them (higher doc id first)."""
    out = {}
    for qid, hits in run.items():
        best = sorted(hits.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]
        out[qid] = dict(best)
    return out


def evaluate(
    qrels: Qrels,
    run: Run,
    ndcg_at: Sequence[int] = (10,),
    recall_at: Sequence[int] = (100,),
    mrr_at: Sequence[int] = (10,),
    ignore_identical_ids: bool = True,
) -> dict[str, float]:
    """Mean metrics over evaluated queries: keys like `ndcg@10`, `recall@100`, `mrr@10`, `map`."""
    import pytrec_eval

    if ignore_identical_ids:
        run = drop_identical_ids(run)
    judged = {q: r for q, r in qrels.items() if q in run}
    run = {q: h for q, h in run.items() if q in judged}
    out: dict[str, float] = {"num_queries": float(len(judged))}
    if not judged:
        return out
    measures = {"map"} | {f"ndcg_cut.{k}" for k in ndcg_at} | {f"recall.{k}" for k in recall_at}
    per_query = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(run)
    for k in ndcg_at:
        out[f"ndcg@{k}"] = float(np.mean([v[f"ndcg_cut_{k}"] for v in per_query.values()]))
    for k in recall_at:
        out[f"recall@{k}"] = float(np.mean([v[f"recall_{k}"] for v in per_query.values()]))
    out["map"] = float(np.mean([v["map"] for v in per_query.values()]))
    for k in mrr_at:
        rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(truncate(run, k))
        out[f"mrr@{k}"] = float(np.mean([v["recip_rank"] for v in rr.values()]))
    return out


def run_from_arrays(
    query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray, rows: np.ndarray
) -> Run:
    """Search results ([Q, k] scores and row ids; row -1 = no hit) → a run dict."""
    run: Run = {}
    for qid, srow, irow in zip(query_ids, scores, rows):
        run[qid] = {doc_ids[i]: float(s) for s, i in zip(srow, irow) if i >= 0}
    return run
