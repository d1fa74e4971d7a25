"""LaPraDoR's store: `jaxret prepare` writes the corpus text and the sentences per passage,
so that no training process reads the corpus into RAM or splits it at start."""

import shutil
import types

import numpy as np
import pytest

from jaxret.configlib import load_config
from jaxret.data import corpus_store
from jaxret.data import sentences as sent
from jaxret.data.corpus_text import StoredCorpus
from jaxret.data.readers import read_corpus
from jaxret.methods.lapradoor import runner as lap


def test_prepare_stores_the_corpus_and_its_sentence_counts(
    tiny_bert, data_dir, tmp_path, monkeypatch
):
    """The stored count of every passage is the splitter's, counted here passage by passage;
    1 and 2 workers write the same bytes; a run in the prepared workdir memory-maps the
    corpus and splits no more passages at start than its first batch holds (ICT pairs of
    the example batch), and its ICT rows are the passages with ≥ 2 sentences. A
    multi-process run without the store refuses at once, naming `jaxret prepare`. Fails if
    the runner counts sentences over the corpus itself again (82 splits at start), or reads
    the corpus file instead of the table, or if the multi-process run builds the table, or
    if the ICT rows are an array in RAM instead of the store's memory-mapped list."""
    (source,) = (data_dir / "adi").glob("corpus.jsonl*")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(source, bare / source.name)

    def cfg(store):
        overrides = [
            ("model.name", str(tiny_bert)),
            ("data.dir", str(bare)),
            ("data.eval_dir", ""),
            ("data.store", str(store)),
        ]
        return load_config("configs/lapradoor.py:tiny", overrides)

    one = lap.prepare(cfg(tmp_path / "s1"), tmp_path / "w", 1, shard_rows=20)["sentences"]
    two = lap.prepare(cfg(tmp_path / "s2"), tmp_path / "w", 2, shard_rows=20)["sentences"]
    assert (one.folder / "sentences.npy").read_bytes() == (
        two.folder / "sentences.npy"
    ).read_bytes()
    corpus = read_corpus(source)
    split = sent.splitter("sentencex", "en")
    expected = [len(split(t)) for t in corpus.texts]
    assert one.arrays["sentences"][:, 0].tolist() == expected
    assert 0 < sum(n >= 2 for n in expected) < len(expected)  # both kinds occur

    splits = []
    real_splitter = sent.splitter
    monkeypatch.setattr(
        sent,
        "splitter",
        lambda *a: (lambda f: lambda text: splits.append(1) or f(text))(real_splitter(*a)),
    )
    run = lap.LapradoorRun(cfg(tmp_path / "s1"), tmp_path / "run")
    assert isinstance(run.corpus, StoredCorpus) and len(run.corpus) == len(expected)
    assert 0 < len(splits) <= run.cfg.train.batch_size
    np.testing.assert_array_equal(run.eligible, np.flatnonzero(np.array(expected) >= 2))
    assert isinstance(run.eligible, np.memmap) and run.eligible.dtype == np.int32
    assert (one.folder / "rows_with_2_sentences.npy").is_file()  # written by prepare

    two_processes = types.SimpleNamespace(
        distributed=types.SimpleNamespace(is_initialized=lambda: True), process_count=lambda: 2
    )
    monkeypatch.setattr(corpus_store, "jax", two_processes)
    with pytest.raises(corpus_store.StoreMissingError, match="jaxret prepare --config="):
        lap.LapradoorRun(cfg(tmp_path / "s3"), tmp_path / "run3")
    assert not list((tmp_path / "s3").glob("sentences-*"))
