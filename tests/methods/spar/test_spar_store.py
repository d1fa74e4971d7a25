"""SPAR's store: `jaxret prepare` writes the corpus text and the BM25 labels, so that no
training process reads the corpus into RAM or builds a BM25 index at start."""

import bm25s
import numpy as np

from jaxret.configlib import load_config
from jaxret.data import corpus_text
from jaxret.data.corpus_text import StoredCorpus
from jaxret.data.readers import read_corpus
from jaxret.methods.spar import runner as spar


def test_a_prepared_run_maps_the_corpus_and_builds_no_bm25_index(
    tiny_bert, data_dir, tmp_path, monkeypatch
):
    """After `prepare`, the run's corpus is the store's memory-mapped table (the same rows
    as the file) and it starts without indexing the corpus for BM25; its labels are the
    prepared ones. The index is built when something needs it: the final BM25 overlap (the
    end of the run). Fails if SparRun builds BM25 at start again (as it did in every
    process of a multi-process job) or reads the corpus file instead of the table."""
    cfg = load_config(
        "configs/spar.py:tiny",
        [("model.name", str(tiny_bert)), ("data.store", str(tmp_path / "store"))],
    )
    prepared = spar.prepare(cfg, tmp_path / "w", 1)

    builds = []
    real_index = bm25s.BM25.index
    monkeypatch.setattr(
        bm25s.BM25, "index", lambda *a, **k: builds.append(1) or real_index(*a, **k)
    )

    def no_read(*a, **k):
        raise AssertionError("the run read the corpus file")

    monkeypatch.setattr(corpus_text, "read_corpus", no_read)
    run = spar.SparRun(cfg, tmp_path / "run")
    assert builds == []
    assert isinstance(run.corpus, StoredCorpus)
    (source,) = (data_dir / "adi").glob("corpus.jsonl*")
    file_corpus = read_corpus(source)
    assert list(run.corpus.ids) == file_corpus.ids and run.corpus.texts[7] == file_corpus.texts[7]
    np.testing.assert_array_equal(run.labels.positives, prepared["labels"].positives)

    summary = run.finish(run.state)
    assert builds == [1] and 0 <= summary["test_after"]["rbo_bm25"] <= 1
