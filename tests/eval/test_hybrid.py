"""SPAR's concatenation, μ tuning, the normalized hybrid, and LEDR against brute force."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxret.eval import evaluate as ev
from jaxret.eval import hybrid
from jaxret.index.sharded import ShardedIndex
from jaxret.lexical.bm25 import BM25


def test_concatenated_score_is_base_plus_mu_lambda():
    r = np.random.RandomState(0)
    q_b, q_l = r.randn(7, 16), r.randn(7, 8)  # different dimensions
    p_b, p_l = r.randn(300, 16), r.randn(300, 8)
    for mu in (0.1, 0.7, 3.3333):
        q = hybrid.combine_queries(q_b, q_l, mu, "concat")
        p = hybrid.combine_passages(p_b, p_l, "concat")
        expected = q_b @ p_b.T + mu * (q_l @ p_l.T)
        np.testing.assert_allclose(
            q.astype(np.float64) @ p.astype(np.float64).T, expected, rtol=1e-5, atol=1e-5
        )
        # One search of the concatenated index = brute force of base + μ·Λ (float64 ranking).
        index = ShardedIndex.from_embeddings(p, dtype=jnp.float32, chunk_rows=64)
        scores, rows = index.search(q, 10)
        ref = np.argsort(-expected, axis=1, kind="stable")[:, :10]
        gaps = -np.diff(np.take_along_axis(expected, ref, 1), axis=1)
        clear = np.concatenate([gaps > 1e-4, np.ones((7, 1), bool)], 1) & np.concatenate(
            [np.ones((7, 1), bool), gaps > 1e-4], 1
        )
        np.testing.assert_array_equal(np.asarray(rows)[clear], ref[clear])
        np.testing.assert_allclose(
            np.asarray(scores), np.take_along_axis(expected, np.asarray(rows), 1), atol=1e-4
        )
    with pytest.raises(ValueError, match="equal dimensions"):
        hybrid.combine_queries(q_b, q_l, 0.5, "sum")
    s = hybrid.combine_queries(q_b, q_b, 0.5, "sum")
    np.testing.assert_allclose(s, 1.5 * q_b, rtol=1e-6)


def test_mu_grid_and_tuning_metric_are_dpr_scales():
    """The grid and the QA metric as written in dpr-scale spar/spar_weight_tuning.py:132-135
    (copied here from that file); MS MARCO tunes MRR@10, other BEIR sets nDCG@10; a chosen
    metric wins. Fails on the earlier grid (1.1111, 1.4286, …) or metric rule."""
    dpr_scale = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.43, 1.67, 2, 2.5]
    dpr_scale += [3.33, 5.0, 10.0]
    assert list(hybrid.MU_GRID) == dpr_scale
    assert hybrid.scaled_grid(0.01)[:3] == (0.001, 0.002, 0.003)
    assert hybrid.scaled_grid(0.01)[-1] == 0.1
    qa = ev.EvalData("nq", None, [], [], None, answers=[])
    marco = ev.EvalData("msmarco", None, [], [], {}, None)
    beir = ev.EvalData("scifact", None, [], [], {}, None)
    assert [hybrid.tuning_metric(d) for d in (qa, marco, beir)] == ["top100", "mrr@10", "ndcg@10"]
    assert hybrid.tuning_metric(qa, "mrr@10") == "mrr@10"
    with pytest.raises(ValueError, match="tuning metric 'p@5'"):
        hybrid.tuning_metric(beir, "p@5")


def test_mu_tuning_picks_the_best_grid_value():
    r = np.random.RandomState(1)
    table = {mu: float(r.rand()) for mu in hybrid.MU_GRID}
    calls = []

    def evaluate_at(mu):
        calls.append(mu)
        return {"ndcg@10": table[mu]}

    best, scores = hybrid.tune_weight(evaluate_at, "ndcg@10")
    brute = None
    for mu in hybrid.MU_GRID:  # brute force: the first maximum in ascending order
        if brute is None or table[mu] > table[brute] or (table[mu] == table[brute] and mu < brute):
            brute = mu
    assert best == brute and sorted(calls) == sorted(hybrid.MU_GRID) and scores == table


def _spar_setup(data_dir, tiny_bert):
    """Cranfield (60 queries, 300 documents) split into dev / test, a mean-pooled base and a
    [CLS] normalized Λ (both tiny BERTs), the mesh."""
    from jaxret.data.tokenization import load_tokenizer
    from jaxret.models import dual_encoder as de
    from jaxret.parallel import make_mesh

    data = ev.subsample(ev.load_eval_data(data_dir / "cranfield"), 60, 300)
    dev, test = ev.hash_split(data, 0.5)
    enc, params, tok = de.from_pretrained(tiny_bert, de.EncoderSpec(pooling="mean"))
    enc2, params2, tok2 = de.from_pretrained(
        tiny_bert, de.EncoderSpec(pooling="cls", normalize=True)
    )
    base, lex = (enc, params, load_tokenizer(tok)), (enc2, params2, load_tokenizer(tok2))
    return dev, test, base, lex, make_mesh()


def test_spar_tuning_on_a_real_dev_split(data_dir, tiny_bert, tmp_path):
    """End to end on cranfield: the tuned μ is the one whose dev nDCG@10 is the best, and the
    test retrieval uses it."""
    dev, test, base, lex, mesh = _spar_setup(data_dir, tiny_bert)
    grid = (0.1, 1.0, 10.0)
    scores, rows, info = hybrid.spar_retrieval(
        base, lex, test, dev, mesh, None, "concat", 100, 32, tmp_path, grid
    )
    assert info["tuned_on"] == "ndcg@10" and set(info["dev"]) == {"0.1", "1.0", "10.0"}
    assert info["mu"] == max(grid, key=lambda m: (info["dev"][str(m)], -m))
    fixed = hybrid.spar_retrieval(
        base, lex, test, None, mesh, info["mu"], "concat", 100, 32, tmp_path
    )
    np.testing.assert_array_equal(fixed[1], rows)


def test_ledr_equals_brute_force(data_dir):
    data = ev.load_eval_data(data_dir / "adi")
    r = np.random.RandomState(0)
    emb = r.randn(len(data.corpus), 16)
    q = r.randn(len(data.query_ids), 16)
    bm25 = BM25(data.corpus, show_progress=False)
    for depth in (5, 1000):
        scores, rows = hybrid.ledr(q, lambda rows: emb[rows], bm25, data, depth=depth, k=30)
        # Brute force over the whole corpus: cos × BM25, BM25 zero beyond the top `depth`.
        everything = np.arange(len(data.corpus))[None]
        cos = hybrid.unit(q) @ hybrid.unit(emb).T
        for i, text in enumerate(data.query_texts):
            bm = bm25.score_pairs([text], everything)[0].astype(np.float64)
            top = np.argsort(-bm, kind="stable")[: min(depth, len(bm))]
            cut = np.zeros_like(bm)
            cut[top] = bm[top]
            full = cos[i] * cut
            candidates = np.array([d != data.query_ids[i] for d in data.corpus.ids])  # BEIR
            order = np.lexsort((np.arange(len(full)), -full))
            order = order[candidates[order]][:30]
            np.testing.assert_allclose(scores[i], full[order], atol=1e-5)
            nonzero = full[order] != 0
            np.testing.assert_array_equal(rows[i][nonzero], order[nonzero])  # zeros may tie
            assert ((full[rows[i]] == 0) == ~nonzero).all()
            if depth == 5:
                assert (full[rows[i]] != 0).sum() <= 5


def test_normalized_hybrid_fusion():
    dense = (np.array([[0.9, 0.5, 0.1]]), np.array([[1, 2, 3]]))
    sparse = (np.array([[10.0, 4.0, 2.0]]), np.array([[3, 4, -1]]))
    s, r = hybrid.fuse_normalized(dense, sparse, 1.0, 3)
    # dense norm: 1 → 1, 2 → 0.5, 3 → 0; BM25 norm: 3 → 1, 4 → 0: 1:1, 3:1, 2:0.5, 4:0
    np.testing.assert_array_equal(r, [[1, 3, 2]])
    np.testing.assert_allclose(s, [[1.0, 1.0, 0.5]])


def test_spar_plus_bm25_composes_spar_and_bm25(data_dir, tiny_bert, tmp_path):
    """SPAR + BM25 (the paper's Table 8) on cranfield: with BM25's weight 0 the ranking is
    SPAR's alone (`spar_retrieval`, same μ); with a weight of 1e6 it is BM25's (the top 10
    carry BM25's top-10 scores, tie-tolerant); 'auto' picks the best dev weight. Fails if
    the fused dense list is not SPAR's (e.g. the base model's alone) or the weight is
    ignored."""
    from jaxret.lexical.bm25 import BM25

    dev, test, base, lex, mesh = _spar_setup(data_dir, tiny_bert)
    run = lambda weight, dev_set=None: hybrid.spar_bm25_retrieval(
        base, lex, test, dev_set, mesh, 2.0, weight, "concat", 10, 100, 32, tmp_path
    )
    spar = hybrid.spar_retrieval(base, lex, test, None, mesh, 2.0, "concat", 10, 32, tmp_path)
    alone = run(0.0)
    np.testing.assert_array_equal(alone[1][:, :9], spar[1][:, :9])  # (10th: SPAR's min → 0)
    assert alone[2]["mu"] == 2.0 and alone[2]["weight"] == 0.0

    bm25 = BM25(test.corpus, show_progress=False)
    bm_scores, bm_rows = bm25.retrieve(test.query_texts, 10)
    lexical = run(1e6)
    checked = 0
    for i in range(len(test.query_ids)):
        if (bm_rows[i] < 0).any():
            continue
        score_of = dict(
            zip(
                bm25.retrieve([test.query_texts[i]], 300)[1][0].tolist(),
                bm25.retrieve([test.query_texts[i]], 300)[0][0].tolist(),
            )
        )
        got = sorted((score_of.get(int(r), 0.0) for r in lexical[1][i]), reverse=True)
        np.testing.assert_allclose(got, bm_scores[i], rtol=1e-5)
        checked += 1
    assert checked > 20

    tuned = run(None, dev)
    assert tuned[2]["weight"] == max(hybrid.MU_GRID, key=lambda w: (tuned[2]["dev"][str(w)], -w))
