import gzip
import json

import pytest

from jaxret.data import readers as R


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_beir_corpus_good_gz_and_warnings(tmp_path, caplog):
    rows = [
        {"_id": "a", "title": "T", "text": "x"},
        {"_id": 7, "text": "y"},
        {"_id": "c", "title": "", "text": ""},
    ]
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(jsonl(rows))
    corpus = R.read_beir_corpus(tmp_path / "corpus.jsonl")  # finds the .gz
    assert corpus.ids == ["a", "7", "c"] and corpus.titles == ["T", "", ""]
    assert "1 row(s) have no title" in caplog.text and "1 row(s) are empty" in caplog.text
    with pytest.raises(R.DataError, match=r"corpus.jsonl.gz:3: document 'c' has empty"):
        R.read_beir_corpus(path, on_empty="error")


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"_id": "a", "text": "x"}\n{not json\n', r":2: malformed JSON"),
        ('{"_id": "a"}\n', r":1: missing field 'text'"),
        ('{"text": "x"}\n', r":1: missing field '_id'"),
        (
            '{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n',
            r":2: duplicate _id 'a' \(first on line 1\)",
        ),
        ('{"_id": "a", "text": 3}\n', r":1: field 'text' must be str"),
        ("[1, 2]\n", r":1: expected a JSON object"),
        ("", "no documents"),
    ],
)
def test_beir_corpus_errors(tmp_path, content, match):
    with pytest.raises(R.DataError, match=match):
        R.read_beir_corpus(write(tmp_path / "corpus.jsonl", content))


def test_queries_errors(tmp_path):
    with pytest.raises(R.DataError, match=r"queries.jsonl:2: query 'q2' has empty text"):
        R.read_beir_queries(
            write(
                tmp_path / "queries.jsonl",
                jsonl([{"_id": "q1", "text": "a"}, {"_id": "q2", "text": " "}]),
            )
        )
    with pytest.raises(R.DataError, match=r":2: duplicate _id 'q1'"):
        R.read_beir_queries(write(tmp_path / "q2.jsonl", jsonl([{"_id": "q1", "text": "a"}] * 2)))


def test_qrels(tmp_path):
    good = write(
        tmp_path / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\ta\t2\nq1\tb\t0\n"
    )
    assert R.read_qrels(good, {"q1"}, {"a", "b"}) == {"q1": {"a": 2, "b": 0}}
    trec = write(tmp_path / "trec.txt", "q1 0 a 1\n")
    assert R.read_qrels(trec) == {"q1": {"a": 1}}
    cases = [
        ("q1\tzz\t1\n", r"t.tsv:1: unknown corpus id 'zz'"),
        ("qx\ta\t1\n", r"t.tsv:1: unknown query id 'qx'"),
        ("q1\ta\n", r"t.tsv:1: expected 3"),
        ("q1\ta\thigh\n", r"t.tsv:1: score 'high'"),
        ("q1\ta\t1\nq1\ta\t1\n", r"t.tsv:2: duplicate judgement"),
    ]
    for content, match in cases:
        with pytest.raises(R.DataError, match=match):
            R.read_qrels(write(tmp_path / "t.tsv", content), {"q1"}, {"a"})


def test_read_beir_folder(tmp_path):
    write(tmp_path / "corpus.jsonl", jsonl([{"_id": "d1", "title": "", "text": "x"}]))
    write(
        tmp_path / "queries.jsonl", jsonl([{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}])
    )
    write(tmp_path / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    ds = R.read_beir(tmp_path)
    assert ds.qrels == {"q1": {"d1": 1}} and len(ds.queries) == 2


def test_dpr_passages(tmp_path):
    good = write(tmp_path / "psgs.tsv", 'id\ttext\ttitle\n1\t"quoted ""text"""\tT1\n2\tplain\tT2\n')
    c = R.read_dpr_passages(good)
    assert c.ids == ["1", "2"] and c.texts[0] == 'quoted "text"' and c.titles == ["T1", "T2"]
    with pytest.raises(R.DataError, match=r"psgs.tsv:3: expected 3 columns"):
        R.read_dpr_passages(write(tmp_path / "psgs.tsv", "id\ttext\ttitle\n1\ta\tb\n2\tonly\n"))
    with pytest.raises(R.DataError, match=r":3: duplicate id '1'"):
        R.read_dpr_passages(write(tmp_path / "psgs.tsv", "id\ttext\ttitle\n1\ta\tb\n1\tc\td\n"))
    with pytest.raises(R.DataError, match=r":2: document '1' has empty"):
        R.read_dpr_passages(
            write(tmp_path / "psgs.tsv", "id\ttext\ttitle\n1\t \t\n"), on_empty="error"
        )


def test_dpr_qa_uses_literal_eval_only(tmp_path):
    good = write(tmp_path / "qa.csv", "who is it?\t['Bob', \"O'Neil\"]\n")
    assert R.read_dpr_qa(good)[0].answers == ["Bob", "O'Neil"]
    evil = write(tmp_path / "evil.csv", "q?\t__import__('os').system('echo pwned')\n")
    with pytest.raises(R.DataError, match=r"evil.csv:1: answers .* not a Python list"):
        R.read_dpr_qa(evil)
    with pytest.raises(R.DataError, match=r":1: answers must be a list of strings"):
        R.read_dpr_qa(write(tmp_path / "n.csv", "q?\t[1, 2]\n"))
    with pytest.raises(R.DataError, match=r":1: empty answer"):
        R.read_dpr_qa(write(tmp_path / "e.csv", "q?\t[]\n"))
    with pytest.raises(R.DataError, match=r":1: expected 2 columns"):
        R.read_dpr_qa(write(tmp_path / "c.csv", "q?\n"))


def test_qa_jsonl(tmp_path, caplog):
    rows = [
        {"question": "q?", "answers": ["a"]},
        {"id": "x", "question": "r?", "answers": ["\\d+"], "answer_type": "regex"},
    ]
    out = R.read_qa_jsonl(write(tmp_path / "qa.jsonl", jsonl(rows)))
    assert [e.id for e in out] == ["1", "x"] and out[1].match_type == "regex"
    assert "1 row(s) have no id" in caplog.text
    bad = [
        ([{"question": "q", "answers": "a"}], r":1: field 'answers' must be list"),
        ([{"answers": ["a"]}], r":1: missing field 'question'"),
        ([{"question": "", "answers": ["a"]}], r":1: empty question"),
        ([{"id": "1", "question": "q", "answers": ["a"]}] * 2, r":2: duplicate id '1'"),
        ([{"question": "q", "answers": ["a"], "answer_type": "fuzzy"}], r":1: answer_type 'fuzzy'"),
    ]
    for rows, match in bad:
        with pytest.raises(R.DataError, match=match):
            R.read_qa_jsonl(write(tmp_path / "bad.jsonl", jsonl(rows)))


def test_read_questions_all_formats(tmp_path):
    beir = write(tmp_path / "queries.jsonl", jsonl([{"_id": "1", "text": "a?"}]))
    qa = write(tmp_path / "qa.jsonl", jsonl([{"question": "b?", "answers": ["x"]}]))
    dpr = write(tmp_path / "qa.csv", "c?\t['x']\n")
    assert [R.read_questions(p) for p in (beir, qa, dpr)] == [["a?"], ["b?"], ["c?"]]


def test_bom_header_and_utf8_errors_name_the_line(tmp_path):
    bom = write(tmp_path / "qrels.tsv", "\ufeffquery-id\tcorpus-id\tscore\nq1\ta\t1\n")
    bom.write_bytes(bom.read_text().encode("utf-8"))  # the BOM as bytes EF BB BF
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert R.read_qrels(bom) == {"q1": {"a": 1}}  # a BOM'd header is a header
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(
        "\ufeff".encode() + b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "caf\xe9"}\n'
    )
    with pytest.raises(R.DataError, match=r"corpus.jsonl:2: not valid UTF-8"):
        R.read_beir_corpus(corpus)
    gz = tmp_path / "q.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        for i in range(3):
            f.write(b'{"_id": "%d", "text": "ok"}\n' % i)
        f.write(b'{"_id": "4", "text": "\xff"}\n')
    with pytest.raises(R.DataError, match=r"q.jsonl.gz:4: not valid UTF-8"):
        R.read_beir_queries(gz)
    dpr = tmp_path / "psgs.tsv"
    dpr.write_bytes(b"id\ttext\ttitle\n1\tfine\tT\n2\tbad \xc3\x28\tT\n")
    with pytest.raises(R.DataError, match=r"psgs.tsv:3: not valid UTF-8"):
        R.read_dpr_passages(dpr)


@pytest.mark.parametrize("score", ["1.5", "inf", "-inf", "nan", "1e400"])
def test_non_integer_relevance_is_an_error(tmp_path, score):
    path = write(tmp_path / "t.tsv", f"q1\ta\t1\nq1\tb\t{score}\n")
    with pytest.raises(R.DataError, match=r"t.tsv:2: relevance .* is not an integer"):
        R.read_qrels(path)
    assert R.read_qrels(write(tmp_path / "ok.tsv", "q1\ta\t2.0\nq1\tb\t-1\n")) == {
        "q1": {"a": 2, "b": -1}
    }


def test_qrels_missing_documents_warn_and_drop(tmp_path, caplog):
    path = write(
        tmp_path / "t.tsv", "query-id\tcorpus-id\tscore\nq1\ta\t1\nq1\tgone\t1\nq9\ta\t1\n"
    )
    with pytest.raises(R.DataError, match=r"t.tsv:3: unknown corpus id 'gone'"):
        R.read_qrels(path, {"q1", "q9"}, {"a"})
    kept = R.read_qrels(path, {"q1"}, {"a"}, on_missing="warn")
    assert kept == {"q1": {"a": 1}}
    assert "1 row(s) name a document missing from the corpus (dropped)" in caplog.text
    assert "1 row(s) name a query missing from the queries file (dropped)" in caplog.text
    with pytest.raises(ValueError, match="on_missing"):
        R.read_qrels(path, on_missing="skip")
    # The same option through a BEIR folder.
    write(tmp_path / "beir" / "corpus.jsonl", jsonl([{"_id": "a", "title": "", "text": "x"}]))
    write(tmp_path / "beir" / "queries.jsonl", jsonl([{"_id": "q1", "text": "y"}]))
    write(tmp_path / "beir" / "qrels" / "test.tsv", "q1\ta\t1\nq1\tgone\t2\n")
    with pytest.raises(R.DataError, match="unknown corpus id"):
        R.read_beir(tmp_path / "beir")
    assert R.read_beir(tmp_path / "beir", on_missing="warn").qrels == {"q1": {"a": 1}}


def test_find_corpus_prefers_beir_then_dpr(tmp_path):
    with pytest.raises(R.DataError, match="no corpus file"):
        R.find_corpus(tmp_path)
    write(tmp_path / "psgs_w100.tsv", "id\ttext\ttitle\n1\ta\tb\n")
    assert R.find_corpus(tmp_path).name == "psgs_w100.tsv"
    assert R.read_corpus(R.find_corpus(tmp_path)).ids == ["1"]
    write(tmp_path / "corpus.jsonl", jsonl([{"_id": "x", "text": "y"}]))
    assert R.find_corpus(tmp_path).name == "corpus.jsonl"


def test_hard_negatives_are_filtered_as_train_msmarco_v3(tmp_path, caplog):
    """sentence-transformers' mined negatives read as BEIR's train_msmarco_v3: a negative
    scoring above (lowest positive CE score − 3) is dropped, at most 5 new ones per system in
    file order (a pid seen in an earlier system is not counted again), unknown queries and
    passages skipped, a query left without a negative dropped; expected lists written by
    hand. Fails if the margin is applied to the highest positive, the cap counts repeats,
    or the order changes. A malformed line is one error naming file:line."""
    import gzip
    import json

    from jaxret.data.readers import DataError, read_hard_negatives

    neg = lambda *pairs: [{"pid": p, "ce-score": s} for p, s in pairs]
    lines = [
        {  # lowest positive 5.0 → negatives must score ≤ 2.0
            "qid": 1,
            "pos": [{"pid": 10, "ce-score": 9.0}, {"pid": 11, "ce-score": 5.0}],
            "neg": {
                "bm25": neg((20, 2.5), (21, 2.0), (22, -1), (23, 0), (24, 1), (25, 1), (26, 1)),
                "dense": neg((21, 0.0), (27, 0.0), (99, 0.0)),
            },
        },
        {"qid": 2, "pos": [{"pid": 12, "ce-score": 1.0}], "neg": {"bm25": neg((20, 0.0))}},
        {"qid": 3, "pos": [{"pid": 13, "ce-score": 8.0}], "neg": {"bm25": neg((20, 9.0))}},
        {"qid": 77, "pos": [{"pid": 10, "ce-score": 8.0}], "neg": {"bm25": neg((20, 0.0))}},
    ]
    path = tmp_path / "hard.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    row_of = {str(p): i for i, p in enumerate([10, 11, 12, 13, 20, 21, 22, 23, 24, 25, 26, 27])}
    mined = read_hard_negatives(path, {"1", "2", "3"}, row_of)
    assert mined.query_ids == ["1"]  # 2: 20 scores 0.0 > 1.0 − 3; 3: no negative below 5.0
    assert mined.positives == [[row_of["10"], row_of["11"]]]
    # bm25: 21, 22, 23, 24, 25 (five; 20 too high, 26 over the cap); dense: 27 (21 again and
    # 99 outside the corpus do not count)
    assert mined.negatives == [[row_of[p] for p in ("21", "22", "23", "24", "25", "27")]]
    assert "1 queries not in the query file" in caplog.text
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"qid": 2, "pos": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected"):
        read_hard_negatives(bad, {"1", "2"}, row_of)
