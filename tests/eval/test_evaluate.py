"""BEIR's identical-id rule: a corpus holding the queries (Quora, ArguAna) must not return a
query's own document, and still returns k hits."""

import json

import numpy as np

from jaxret import cli
from jaxret.eval import evaluate as ev
from jaxret.eval.trec import read_run
from jaxret.lexical.bm25 import BM25


def test_drop_self_hits_keeps_k():
    rows = np.array([[3, 0, 1, 2], [0, 1, 2, 3], [2, -1, -1, -1]])
    scores = np.array([[9.0, 8, 7, 6], [5, 4, 3, 2], [1, 0, 0, 0]])
    s, r = ev.drop_self_hits(["d0", "x", "d2"], ["d0", "d1", "d2", "d3"], scores, rows, 3)
    np.testing.assert_array_equal(r, [[3, 1, 2], [0, 1, 2], [-1, -1, -1]])
    np.testing.assert_array_equal(s[0], [9, 7, 6])
    assert np.isneginf(s[2]).all()


def _quora_like(data_dir, tmp_path):
    """adi's documents; the queries are documents 1..12 themselves (same ids, their text)."""
    src = ev.load_eval_data(data_dir / "adi")
    c = src.corpus
    folder = tmp_path / "quora"
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i, t, x in zip(c.ids, c.titles, c.texts):
            f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    qids = c.ids[:12]
    with open(folder / "queries.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"_id": qids[i], "text": f"{c.titles[i]} {c.texts[i]}"}) + "\n")
    # Each query's "duplicate" is the next document.
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"{qids[i]}\t{c.ids[i + 1]}\t1\n" for i in range(12))
    )
    return folder, c, qids


def test_bm25_and_dense_eval_return_k_hits_without_the_query_itself(
    data_dir, tmp_path, tiny_bert, capsys
):
    folder, corpus, qids = _quora_like(data_dir, tmp_path)
    bm25 = BM25(corpus, show_progress=False)
    ref_scores, ref_rows = bm25.retrieve(
        [f"{corpus.titles[i]} {corpus.texts[i]}" for i in range(12)], 6
    )
    assert all(corpus.ids[r[0]] == q for q, r in zip(qids, ref_rows))  # own doc ranks first
    for extra in (
        ["--retriever", "bm25"],
        ["--model", str(tiny_bert), "--store", str(tmp_path / "s")],
    ):
        run_file = tmp_path / "run.txt"
        code = cli.main(
            [
                "eval",
                "--data",
                str(folder),
                "--k",
                "5",
                "--run-out",
                str(run_file),
                "--json",
                *extra,
            ]
        )
        assert code == 0
        capsys.readouterr()
        run = read_run(run_file)
        assert set(run) == set(qids)
        for q, hits in run.items():
            assert len(hits) == 5 and q not in hits, (extra, q)
        if extra[1] == "bm25":
            for i, q in enumerate(qids):  # exactly BM25's top 6 minus the query's own document
                expected = [corpus.ids[r] for r in ref_rows[i] if corpus.ids[r] != q][:5]
                assert sorted(run[q]) == sorted(expected)
