"""QGen's retriever store: `jaxret prepare` writes the corpus text and the passage (qrels
pairs) or sentence (ICT pairs) tables, so that no retriever process tokenizes at start."""

import types
from pathlib import Path

import pytest

from jaxret.configlib import load_config
from jaxret.data import corpus_store, corpus_text
from jaxret.data.corpus_text import StoredCorpus
from jaxret.methods.qgen import retriever
from jaxret.methods.qgen import runner as qgen

ADI = Path(__file__).resolve().parents[3] / "data" / "adi"


def config(tiny_bert, store, *extra):
    overrides = [
        ("model.name", str(tiny_bert)),
        ("qgen.stage", "retriever"),
        ("data.train_dir", str(ADI)),
        ("data.train_split", "test"),
        ("data.store", str(store)),
        *extra,
    ]
    return load_config("configs/qgen.py:tiny", overrides)


@pytest.mark.parametrize("pairs", ["qrels", "ict"])
def test_a_prepared_retriever_maps_the_corpus_and_tokenizes_nothing(
    tiny_bert, tmp_path, monkeypatch, pairs
):
    """After `prepare`, the retriever stage opens the store's text table (it reads no corpus
    file) and its token or sentence table (it builds none); without the store, a
    multi-process retriever refuses at once, naming `jaxret prepare`, and builds nothing.
    Fails if the retriever reads the corpus file or tokenizes again (the previous behaviour:
    every process of a job tokenized the corpus), or if prepare builds the wrong table."""
    cfg = config(tiny_bert, tmp_path / "store", ("qgen.pairs", pairs))
    built = qgen.prepare(cfg, tmp_path / "w", 2, shard_rows=40)
    assert set(built) == ({"passages"} if pairs == "qrels" else {"sentences"})

    def no(*a, **k):
        raise AssertionError("the retriever read or tokenized the corpus at start")

    monkeypatch.setattr(corpus_text, "read_corpus", no)
    monkeypatch.setattr(corpus_store, "build_table", no)
    run = retriever.RetrieverRun(cfg, tmp_path / "run")
    assert isinstance(run.corpus, StoredCorpus) and len(run.corpus) == 82
    if pairs == "ict":
        assert (built["sentences"].folder / "rows_with_2_sentences.npy").is_file()

    monkeypatch.undo()  # the store below is empty: the corpus file is read, then refused
    two_processes = types.SimpleNamespace(
        distributed=types.SimpleNamespace(is_initialized=lambda: True), process_count=lambda: 2
    )
    monkeypatch.setattr(corpus_store, "jax", two_processes)
    with pytest.raises(corpus_store.StoreMissingError, match="jaxret prepare --config="):
        retriever.RetrieverRun(
            config(tiny_bert, tmp_path / "s2", ("qgen.pairs", pairs)), tmp_path / "r2"
        )


def test_prepare_for_adapt_builds_the_retrievers_tables(tiny_bert, tmp_path):
    """For adapt, prepare tokenizes `data.dir`'s corpus into the store the chain's retriever
    uses (WORKDIR/retriever/store without data.store); the generator stage has nothing to
    prepare and returns without an error (launch scripts prepare before every job). Fails
    if adapt's tables land in WORKDIR/store (the retriever, run in WORKDIR/retriever, would
    not find them)."""
    cfg = config(tiny_bert, "", ("qgen.stage", "adapt"), ("data.dir", str(ADI)))
    built = qgen.prepare(cfg, tmp_path / "w", 1)
    assert built["passages"].folder.parent == tmp_path / "w" / "retriever" / "store"
    generator = config(tiny_bert, "", ("qgen.stage", "generator"))
    assert qgen.prepare(generator, tmp_path / "g", 1) == {}  # the launch scripts go on
    assert not (tmp_path / "g").exists()
