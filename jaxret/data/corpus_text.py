"""The corpus text in the store: read by memory map, hashed once.

At the paper's size (21M Wikipedia passages, ~13 GB of text) a process that reads
`psgs_w100.tsv` into Python strings holds ~20 GB and hashes all of it before its first step,
and every process of a job does so. `jaxret prepare` instead writes the corpus once into the
store as a text table:

    store/text-<key>/
      ids.bin, titles.bin, texts.bin          UTF-8 strings back to back
      ids.offsets.npy, …                      int64 [N + 1]: string i is bin[o[i]:o[i+1]]
      id_order.npy                            int64 [N]: rows sorted by id (lookups by id)
      manifest.json                           source file identity, rows, content hash

`key` hashes the source file's identity (resolved path, size, modification time), so an
edited corpus file gets a new table and the old one is never read for it. A training process
opens the table (`stored_corpus`) instead of the file: strings are decoded when a row is
read (evaluation reads the texts of the retrieved rows only), ids are found by binary search,
and the content hash is the one recorded by prepare. The host memory of the corpus becomes
the pages the OS caches, shared by every process of a host.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxret.data.corpus_store import table_folder
from jaxret.data.readers import Corpus, DataError, find_corpus, join_corpora, read_corpus
from jaxret.data.strings import Strings

FIELDS = ("ids", "titles", "texts")


def source_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What names one version of a corpus file: its resolved path, size and mtime (of
    `path.gz` when only that exists, as the readers do)."""
    path = Path(path)
    if not path.exists() and Path(f"{path}.gz").exists():
        path = Path(f"{path}.gz")
    path = path.resolve()
    st = path.stat()
    return {"source": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class RowOf(Mapping[str, int]):
    """id → row, by binary search over the rows sorted by id (no dict of N entries)."""

    def __init__(self, ids: Strings, order: np.ndarray):
        self.ids, self.order = ids, order

    def _find(self, key: str) -> int | None:
        if not isinstance(key, str):
            return None
        sorted_ids = _SortedView(self.ids, self.order)
        j = bisect.bisect_left(sorted_ids, key)
        if j < len(self.order) and sorted_ids[j] == key:
            return int(self.order[j])
        return None

    def __getitem__(self, key: str) -> int:
        row = self._find(key)
        if row is None:
            raise KeyError(key)
        return row

    def __contains__(self, key: object) -> bool:
        return self._find(key) is not None  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)


class _SortedView(Sequence[str]):
    def __init__(self, ids: Strings, order: np.ndarray):
        self.ids, self.order = ids, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: Any) -> Any:
        return self.ids[int(self.order[j])]


class StoredCorpus(Corpus):
    """A `Corpus` read from a text table: the same fields, nothing held in Python objects."""

    def __init__(self, folder: Path):  # noqa: D107 (not the dataclass's __init__)
        self.folder = folder
        self.manifest = json.loads((folder / "manifest.json").read_text())
        fields = {}
        for name in FIELDS:
            path = folder / f"{name}.bin"
            # (an empty file cannot be mapped: all titles empty, say)
            empty = path.stat().st_size == 0
            blob = np.zeros(0, np.uint8) if empty else np.memmap(path, np.uint8, "r")
            fields[name] = Strings(blob, np.load(folder / f"{name}.offsets.npy", mmap_mode="r"))
        self.ids, self.titles, self.texts = fields["ids"], fields["titles"], fields["texts"]
        self.row_of = RowOf(self.ids, np.load(folder / "id_order.npy", mmap_mode="r"))
        self._content_hash = self.manifest["content_hash"]  # hashed once, by prepare

    def __repr__(self) -> str:
        return f"StoredCorpus({self.folder}, {len(self)} rows)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Corpus) and other.content_hash() == self.content_hash()

    __hash__ = None  # type: ignore[assignment]


def write_text_table(store: str | os.PathLike, source: str | os.PathLike, corpus: Corpus) -> Path:
    """Writes `corpus` (read from the file `source`) into `store` as a text table; returns
    its folder. Written into a private folder and renamed into place complete (a kill leaves
    no table); a table that exists already is kept."""
    identity = source_identity(source)
    folder = table_folder(store, "text", identity)
    if (folder / "manifest.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for name in FIELDS:
            strings = getattr(corpus, name)
            offsets = np.zeros(len(strings) + 1, np.int64)
            with open(tmp / f"{name}.bin", "wb") as f:
                for i, s in enumerate(strings):
                    data = s.encode()
                    f.write(data)
                    offsets[i + 1] = offsets[i] + len(data)
            np.save(tmp / f"{name}.offsets.npy", offsets)
        # UTF-8 byte order is code point order: the same order as Python's str comparison.
        order = np.array(sorted(range(len(corpus)), key=corpus.ids.__getitem__), np.int64)
        np.save(tmp / "id_order.npy", order)
        manifest = {**identity, "rows": len(corpus), "content_hash": corpus.content_hash()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "manifest.json").is_file():  # not a concurrent identical build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def stored_corpus(store: str | os.PathLike | None, source: str | os.PathLike) -> Corpus | None:
    """The text table of the corpus file `source` in `store`, or None when there is none
    for this version of the file."""
    if not store:
        return None
    folder = table_folder(store, "text", source_identity(source))
    if not (folder / "manifest.json").is_file():
        return None
    return StoredCorpus(folder)


def training_corpus(
    sources: Sequence[str | os.PathLike], store: str | os.PathLike | None, write: bool = False
) -> Corpus:
    """The corpora `sources` (data folders or corpus files) as one (`join_corpora`), each
    read from its text table in `store` when there is one; `write` (prepare) writes the
    missing tables first."""
    corpora = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            path = find_corpus(path)
        elif not path.is_file():
            raise DataError(f"{source}: no such corpus folder or file")
        corpus = stored_corpus(store, path)
        if corpus is None and write and store:
            write_text_table(store, path, read_corpus(path))
            corpus = stored_corpus(store, path)
        corpora.append(corpus if corpus is not None else read_corpus(path))
    return join_corpora(corpora)
