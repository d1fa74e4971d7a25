"""Sentences of a corpus as training queries (SPAR's Λ queries, LaPraDoR's and QGen's ICT).

Splitting uses an installable, maintained segmenter: `sentencex` (Wikimedia, ~300 languages,
the default) or `moses` (the `sentence-splitter` package: Koehn & Schroeder's heuristic
splitter, which SPAR's `prep_wiki_exp.py` used).

Sampling follows SPAR (dpr-scale `prep_wiki_exp.py`): passage i of a document (consecutive
passages sharing a title, 0-based) gives max(1, round(n_sentences / (base · (i + 1))))
distinct sentences (base 1.2): a pseudo-exponential preference for a document's first
passages, and at least one sentence from every passage that has one. Without document
structure every passage counts as a document's first ("uniform"). `all` takes every
sentence (SPAR on MS MARCO). Each passage's choice uses its own seeded generator: the result
depends on the seed and the corpus only, not on the order or process that computes it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from jaxret.data.corpus_store import SHARD_ROWS, TokenTable, open_table
from jaxret.data.readers import Corpus, DataError

Splitter = Literal["sentencex", "moses"]
Mode = Literal["auto", "pseudo_exponential", "uniform", "all"]


@functools.lru_cache(maxsize=4)
def splitter(name: Splitter = "sentencex", language: str = "en") -> Callable[[str], list[str]]:
    """text → non-empty, stripped sentences."""
    if name == "sentencex":
        import sentencex

        seg = lambda text: sentencex.segment(language, text)
    elif name == "moses":
        from sentence_splitter import SentenceSplitter

        seg = SentenceSplitter(language=language).split
    else:
        raise ValueError(f"sentence splitter {name!r}; expected 'sentencex' or 'moses'")
    return lambda text: [s.strip() for s in seg(text) if s.strip()]


def sentence_table(
    store: str | os.PathLike,
    corpus: Corpus,
    splitter_name: Splitter,
    workers: int = 1,
    shard_rows: int = SHARD_ROWS,
    multi_process: str = "each",
    prepare_hint: str = "",
) -> TokenTable:
    """Sentences per passage (`.arrays["sentences"]` [N, 1], capped at 65,535), kept in
    `store` as a one-column table:
    split once for the corpus, by `jaxret prepare` (`workers` processes, resumable, the same
    bytes for any count) or by the first run that needs it; `open_table`'s rules for a
    multi-process run (`multi_process`, `prepare_hint`). Splitting a C4- or Wikipedia-sized
    corpus takes hours on one core: no training process should repeat it at start."""
    split = splitter(splitter_name, "en")

    def count(titles: list[str], texts: list[str], trunc: Any) -> dict[str, np.ndarray]:
        n = np.array([len(split(t)) for t in texts], np.int64)
        return {"sentences": np.minimum(n, 2**16 - 1)[:, None]}

    fingerprint = {"splitter": splitter_name, "language": "en", "vocab_size": 2**16}
    return open_table(
        store,
        "sentences",
        corpus,
        count,
        fingerprint,
        multi_process=multi_process,
        workers=workers,
        shard_rows=shard_rows,
        prepare_hint=prepare_hint,
    )


def rows_with_sentences(table: TokenTable, at_least: int = 2) -> np.ndarray:
    """The rows of a `sentence_table` with ≥ `at_least` sentences (ICT's passages), ascending,
    memory-mapped from `<table>/rows_with_<at_least>_sentences.npy`: computed once (the
    first caller, or `jaxret prepare`) in chunks, int32 where the rows fit, written whole
    under a private name and renamed. At C4's ~365M passages it would be a 2.9 GB int64
    array in every training process otherwise."""
    path = table.folder / f"rows_with_{at_least}_sentences.npy"
    if not path.is_file():
        counts = table.arrays["sentences"]
        n = len(counts)
        dtype = np.int32 if n < 2**31 else np.int64
        step = 1 << 24
        parts = [
            (np.flatnonzero(counts[s : s + step, 0] >= at_least) + s).astype(dtype)
            for s in range(0, n, step)
        ]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy")
        np.save(tmp, np.concatenate(parts) if parts else np.zeros(0, dtype))
        os.replace(tmp, path)
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # no such row: an empty array cannot be mapped
        return np.load(path)


def documents(corpus: Corpus) -> list[int]:
    """Position of each passage within its document: runs of consecutive passages that share
    a non-empty title form a document (DPR's 100-word Wikipedia passages)."""
    position = []
    for i, title in enumerate(corpus.titles):
        same = i > 0 and title and title == corpus.titles[i - 1]
        position.append(position[-1] + 1 if same else 0)
    return position


def has_document_structure(corpus: Corpus) -> bool:
    return any(p > 0 for p in documents(corpus))


def sentences_per_passage(n_sentences: int, position: int, base: float) -> int:
    return max(1, round(n_sentences / (base * (position + 1))))


@dataclasses.dataclass(frozen=True)
class QuerySpec:
    mode: Mode = "auto"
    base: float = 1.2
    splitter: Splitter = "sentencex"
    language: str = "en"
    min_chars: int = 1  # shorter "sentences" (stray punctuation) are not queries
    seed: int = 0


@dataclasses.dataclass
class SentenceQueries:
    """Queries drawn from corpus sentences: text, source passage row, sentence index."""

    texts: list[str]
    rows: np.ndarray  # [Q] int64: the passage each sentence came from
    sentence: np.ndarray  # [Q] int32: its index in that passage

    def __len__(self) -> int:
        return len(self.texts)


def sample_passage(
    sents: Sequence[str], position: int, row: int, spec: QuerySpec, mode: str
) -> list[int]:
    """Indices of the sentences of one passage that become queries."""
    if not sents:
        return []
    if mode == "all":
        return list(range(len(sents)))
    if mode == "uniform":
        position = 0
    n = min(len(sents), sentences_per_passage(len(sents), position, spec.base))
    rng = np.random.default_rng([spec.seed, row])
    return sorted(rng.choice(len(sents), size=n, replace=False).tolist())


def sample_queries(
    corpus: Corpus, spec: QuerySpec, rows: Sequence[int] | None = None, progress: bool = True
) -> SentenceQueries:
    """Queries from the passages `rows` (default: all), in row order."""
    mode = spec.mode
    if mode == "auto":
        mode = "pseudo_exponential" if has_document_structure(corpus) else "uniform"
    if mode not in ("pseudo_exponential", "uniform", "all"):
        raise ValueError(
            f"query mode {spec.mode!r}; expected auto, pseudo_exponential, uniform, all"
        )
    split = splitter(spec.splitter, spec.language)
    position = documents(corpus)
    rows = range(len(corpus)) if rows is None else rows
    texts, src, idx = [], [], []
    for r in tqdm(rows, desc="sampling sentences", unit="psg", disable=not progress):
        sents = [s for s in split(corpus.texts[r]) if len(s) >= spec.min_chars]
        for j in sample_passage(sents, position[r], r, spec, mode):
            texts.append(sents[j])
            src.append(r)
            idx.append(j)
    if not texts:
        raise DataError("the corpus gave no sentences to use as queries")
    return SentenceQueries(texts, np.asarray(src, np.int64), np.asarray(idx, np.int32))


def cache_key(corpus: Corpus, spec: QuerySpec) -> str:
    payload = json.dumps(
        {"corpus": corpus.content_hash(), **dataclasses.asdict(spec)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _write_jsonl(path: Path, queries: SentenceQueries, corpus: Corpus) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for text, r, j in zip(queries.texts, queries.rows, queries.sentence):
            doc = corpus.ids[int(r)]
            f.write(json.dumps({"_id": f"{doc}#s{int(j)}", "text": text, "passage": doc}) + "\n")
    os.replace(tmp, path)


def load_or_sample(
    corpus: Corpus, spec: QuerySpec, folder: str | os.PathLike, progress: bool = True
) -> tuple[SentenceQueries, Path]:
    """Samples once and keeps the result as `folder/sentences-<key>.jsonl` (BEIR queries
    format: `_id` = "<passage id>#s<sentence index>", plus the source `passage`); later runs
    with the same corpus and spec read that file."""
    path = Path(folder) / f"sentences-{cache_key(corpus, spec)}.jsonl"
    if path.is_file():
        texts, src, idx = [], [], []
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                doc, _, sent = row["_id"].rpartition("#s")
                texts.append(row["text"])
                src.append(corpus.row_of[doc])
                idx.append(int(sent))
        return SentenceQueries(texts, np.asarray(src, np.int64), np.asarray(idx, np.int32)), path
    queries = sample_queries(corpus, spec, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(path, queries, corpus)
    return queries, path


def ict_pair(
    sents: Sequence[str], rng: np.random.Generator, remove_prob: float = 1.0
) -> tuple[str, str] | None:
    """Inverse Cloze Task (Lee et al.): a random sentence is the query; the passage without it
    (with probability `remove_prob`, else the whole passage) is the document. None when the
    passage has fewer than two sentences."""
    if len(sents) < 2:
        return None
    k = int(rng.integers(len(sents)))
    keep = rng.random() >= remove_prob
    doc = " ".join(s for i, s in enumerate(sents) if keep or i != k)
    return sents[k], doc


def ict_pairs(
    split: Callable[[str], list[str]],
    texts: Sequence[str],
    rows: Sequence[int],
    key: Sequence[int],
    remove_prob: float = 1.0,
) -> tuple[list[str], list[str]]:
    """(queries, documents): an ICT pair of each passage `texts[row]` (two sentences or more),
    each drawn with a generator seeded by (key, row), so a batch is a function of its key."""
    queries, docs = [], []
    for row in rows:
        rng = np.random.default_rng([*key, int(row)])
        pair = ict_pair(split(texts[row]), rng, remove_prob)
        if pair is None:
            raise ValueError(f"passage row {row} has fewer than two sentences: no ICT pair")
        queries.append(pair[0])
        docs.append(pair[1])
    return queries, docs


def describe(queries: SentenceQueries, corpus: Corpus) -> dict[str, Any]:
    per = np.bincount(queries.rows, minlength=len(corpus))
    return {
        "queries": len(queries),
        "passages": len(corpus),
        "passages_without_query": int((per == 0).sum()),
        "mean_per_passage": float(per.mean()),
    }
