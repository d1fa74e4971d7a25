"""The corpus text table (`jaxret prepare`): the same corpus as the file, read by memory map."""

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from jaxret.data import corpus_text
from jaxret.data.corpus_text import StoredCorpus, stored_corpus, write_text_table
from jaxret.data.readers import read_corpus

ROOT = Path(__file__).resolve().parents[2]


def _write_beir(path: Path, docs: list[tuple[str, str, str]]) -> Path:
    with open(path, "w") as f:
        for i, title, text in docs:
            f.write(json.dumps({"_id": i, "title": title, "text": text}) + "\n")
    return path


def test_stored_corpus_reads_back_the_file_exactly(tmp_path):
    """Every id, title and text of the table equals the reader's (unicode, empty titles, ids
    out of order, an id that is a prefix of another); lookups by id agree with a dict.
    Fails if an offset is off by one, or if id_order is not sorted by id (bisect misses)."""
    docs = [
        ("z9", "", "last"),
        ("10", "Ünïcode", "naïve café — 東京"),
        ("1", "Title", ""),
        ("b", "b", "x" * 1000),
        ("1a", "", "prefix"),
    ] + [(f"d{i:03d}", f"t{i}", f"text {i}") for i in (7, 3, 99, 0)]
    source = _write_beir(tmp_path / "corpus.jsonl", docs)
    read = read_corpus(source)
    folder = write_text_table(tmp_path / "store", source, read)
    stored = stored_corpus(tmp_path / "store", source)
    assert isinstance(stored, StoredCorpus) and stored.folder == folder
    assert len(stored) == len(read)
    assert list(stored.ids) == read.ids
    assert [stored.titles[i] for i in range(len(read))] == read.titles
    assert list(stored.texts) == read.texts
    assert stored.texts[1:4] == read.texts[1:4] and stored.ids[-1] == read.ids[-1]
    for doc_id, row in read.row_of.items():
        assert doc_id in stored.row_of and stored.row_of[doc_id] == row
    for missing in ("", "2", "1b", "zz", "d1", 5):
        assert missing not in stored.row_of
    assert stored.content_hash() == read.content_hash()
    assert stored.subset([2, 0]).texts == read.subset([2, 0]).texts
    with pytest.raises(IndexError):
        stored.texts[len(read)]


def test_stored_corpus_is_not_hashed_or_held_in_memory(tmp_path, monkeypatch):
    """Opening the table and asking its content hash hashes nothing (prepare recorded it) and
    allocates almost nothing in Python, whatever the corpus size: the text stays in the
    memory-mapped file. Fails if StoredCorpus materializes its strings (lists of 20,000
    texts: MBs of allocations) or hashes the corpus again."""
    docs = [(str(i), f"title {i}", f"passage number {i} " + "word " * 40) for i in range(20000)]
    source = _write_beir(tmp_path / "corpus.jsonl", docs)
    read = read_corpus(source)
    write_text_table(tmp_path / "store", source, read)
    expected = read.content_hash()

    hashed = []
    real_sha256 = hashlib.sha256

    class CountingSha256:  # counts the bytes hashed (table keys hash a few hundred)
        def __init__(self, data=b""):
            self.h = real_sha256(data)
            hashed.append(len(data))

        def update(self, data):
            hashed.append(len(data))
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", CountingSha256)
    tracemalloc.start()
    stored = stored_corpus(tmp_path / "store", source)
    assert stored.content_hash() == expected
    assert stored.texts[12345] == read.texts[12345] and stored.row_of["19999"] == 19999
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(hashed) < 10_000, sum(hashed)
    text_bytes = sum(len(t) for t in read.texts)
    assert text_bytes > 4_000_000
    assert peak < 200_000, peak  # < 5 % of the text


def test_an_edited_corpus_file_is_not_read_from_an_old_table(tmp_path):
    """A table belongs to one version of its file (path, size, mtime): after an edit the
    store has no table for the file, and the new one is written beside the old. Fails if
    the table key ignores the file's size or mtime."""
    source = _write_beir(tmp_path / "corpus.jsonl", [("a", "", "one"), ("b", "", "two")])
    write_text_table(tmp_path / "store", source, read_corpus(source))
    assert stored_corpus(tmp_path / "store", source) is not None
    _write_beir(source, [("a", "", "one"), ("b", "", "three")])
    os.utime(source, ns=(1, 1))
    assert stored_corpus(tmp_path / "store", source) is None
    write_text_table(tmp_path / "store", source, read_corpus(source))
    assert list(stored_corpus(tmp_path / "store", source).texts) == ["one", "three"]
    assert len(list((tmp_path / "store").glob("text-*"))) == 2


def test_a_killed_write_leaves_no_table(tmp_path, monkeypatch):
    """The table appears whole or not at all: a write that dies half-way (here while
    saving id_order) leaves no table and no temporary folder. Fails if the files are
    written into the final folder directly."""
    source = _write_beir(tmp_path / "corpus.jsonl", [("a", "", "one"), ("b", "", "two")])

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_text.np, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        write_text_table(tmp_path / "store", source, read_corpus(source))
    assert stored_corpus(tmp_path / "store", source) is None
    assert list((tmp_path / "store").iterdir()) == []


def test_prepare_writes_the_text_table_that_training_reads(tiny_bert, tmp_path, monkeypatch):
    """`jaxret prepare` writes the corpus text table; ART's data loading then reads the
    corpus from it and never from the corpus file. Fails if prepare skips the table or
    load_art_data ignores the store."""
    from jaxret.configlib import load_config
    from jaxret.methods.art import runner as art
    from jaxret.methods.art.data import load_art_data
    from jaxret.train.setup import store_folder

    cfg = load_config(
        "configs/art.py:tiny", [("model.name", str(tiny_bert)), ("data.max_docs", "0")]
    )
    art.prepare(cfg, tmp_path, workers=1)
    assert len(list((tmp_path / "store").glob("text-*/manifest.json"))) == 1

    def no_reading(*a, **k):
        raise AssertionError("the corpus file was read")

    monkeypatch.setattr("jaxret.eval.evaluate.read_corpus", no_reading)
    data = load_art_data(cfg.data, store_folder(cfg, tmp_path))
    assert isinstance(data.corpus, StoredCorpus)
    assert data.dev.corpus is data.corpus
