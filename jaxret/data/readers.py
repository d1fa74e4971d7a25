"""Strict readers for BEIR, DPR and QA files.

Every malformed line, missing field, duplicate id, empty text or dangling qrels id is a
`DataError` naming file and line. Where a field is optional (a BEIR title, a QA id), its
absence is counted and reported once as a warning — never silently skipped.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import math
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
csv.field_size_limit(sys.maxsize)


class DataError(ValueError):
    pass


@dataclasses.dataclass
class Corpus:
    ids: list[str]
    titles: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.titles) == len(self.texts):
            raise DataError("corpus ids, titles and texts differ in length")
        self.row_of = {doc_id: i for i, doc_id in enumerate(self.ids)}

    def content_hash(self) -> str:
        """Identifies the corpus content and order (index manifests refer to it). Computed
        once per object: a corpus is never modified in place (`subset` makes a new one)."""
        cached = self.__dict__.get("_content_hash")
        if cached is not None:
            return cached
        h = hashlib.sha256()
        for row in zip(self.ids, self.titles, self.texts):
            for field in row:
                h.update(field.encode())
                h.update(b"\x00")
        self._content_hash = h.hexdigest()[:32]
        return self._content_hash

    def subset(self, rows: list[int]) -> Corpus:
        return Corpus(
            [self.ids[i] for i in rows],
            [self.titles[i] for i in rows],
            [self.texts[i] for i in rows],
        )


@dataclasses.dataclass
class Queries:
    ids: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)


Qrels = dict[str, dict[str, int]]  # query id -> doc id -> graded relevance


@dataclasses.dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]
    match_type: str = "string"  # "string" (DPR token match) or "regex" (CuratedTREC)


def _resolve(path: str | Path) -> Path:
    """`path`, or `path.gz` when only the gzipped file exists."""
    path = Path(path)
    if not path.exists() and Path(f"{path}.gz").exists():
        path = Path(f"{path}.gz")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    return path


def open_text(path: str | Path) -> io.TextIOBase:
    """Opens `path` (or `path.gz`) as UTF-8 text; a byte-order mark is dropped."""
    path = _resolve(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, decoded one line at a time so that a byte that is not
    UTF-8 is reported on its own line. A BOM at the start is dropped (a BOM'd header is a
    header)."""
    path = _resolve(path)
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    with opener(path, "rb") as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                # A truncated, corrupt or not-gzip `.gz`: name the file and how far it read.
                raise DataError(
                    f"{path}:{line_no + 1}: cannot decompress ({type(e).__name__}: {e}); the "
                    "file is truncated, damaged or not gzip"
                ) from None
            line_no += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)"
                ) from None
            if line_no == 1:
                line = line.removeprefix("\ufeff")
            yield line_no, line


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object")
        yield line_no, row


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Tab-separated rows with their first line number (quoted fields may span lines)."""
    lines = iter_lines(path)
    reader = csv.reader((line for _, line in lines), delimiter="\t")
    last = 0
    for cols in reader:
        yield last + 1, cols
        last = reader.line_num


def _field(row: dict, key: str, path: Path, line_no: int, kind: type = str) -> Any:
    if key not in row:
        raise DataError(f"{path}:{line_no}: missing field {key!r}")
    value = row[key]
    if key in ("_id", "id") and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # BEIR ids are sometimes numbers
    if not isinstance(value, kind):
        raise DataError(f"{path}:{line_no}: field {key!r} must be {kind.__name__}")
    if key in ("_id", "id"):
        _check_id(value, path, line_no)
    return value


def _check_id(value: str, path: Path, line_no: int) -> None:
    """Ids go into TREC run files (whitespace-separated columns): refuse what they cannot
    carry, here, rather than write a run that trec_eval or our own reader rejects."""
    if not value or any(c.isspace() for c in value):
        raise DataError(
            f"{path}:{line_no}: id {value!r} is empty or contains whitespace, which a TREC run "
            "file cannot carry"
        )


def _warn_counts(path: Path, counts: Counter) -> None:
    for what, n in counts.items():
        if n:
            log.warning("%s: %d row(s) %s", path, n, what)


def _empty_document(path: Path, line_no: int, doc_id: str, on_empty: str, counts: Counter) -> None:
    """Official collections hold empty documents (BEIR cranfield 471, 995): by default they
    are kept, so ids and the corpus hash stay faithful, and counted; `on_empty="error"`
    refuses them."""
    if on_empty == "error":
        raise DataError(f"{path}:{line_no}: document {doc_id!r} has empty title and text")
    if on_empty != "warn":
        raise ValueError(f"on_empty={on_empty!r}; expected 'warn' or 'error'")
    counts["are empty (no title, no text; kept)"] += 1


def read_beir_corpus(path: str | Path, on_empty: str = "warn") -> Corpus:
    """`corpus.jsonl[.gz]`: {"_id", "title"?, "text"}. A missing title counts as empty."""
    path = Path(path)
    ids, titles, texts, seen, counts = [], [], [], {}, Counter()
    for line_no, row in _jsonl(path):
        doc_id = _field(row, "_id", path, line_no)
        text = _field(row, "text", path, line_no)
        title = row.get("title")
        if title is None:
            counts["have no title"] += 1
            title = ""
        elif not isinstance(title, str):
            raise DataError(f"{path}:{line_no}: field 'title' must be str")
        if doc_id in seen:
            raise DataError(
                f"{path}:{line_no}: duplicate _id {doc_id!r} (first on line {seen[doc_id]})"
            )
        if not text.strip():
            if not title.strip():
                _empty_document(path, line_no, doc_id, on_empty, counts)
            else:
                counts["have an empty text (title only)"] += 1
        seen[doc_id] = line_no
        ids.append(doc_id)
        titles.append(title)
        texts.append(text)
    if not ids:
        raise DataError(f"{path}: no documents")
    _warn_counts(path, counts)
    return Corpus(ids, titles, texts)


def read_beir_queries(path: str | Path) -> Queries:
    path = Path(path)
    ids, texts, seen = [], [], {}
    for line_no, row in _jsonl(path):
        qid = _field(row, "_id", path, line_no)
        text = _field(row, "text", path, line_no)
        if qid in seen:
            raise DataError(f"{path}:{line_no}: duplicate _id {qid!r} (first on line {seen[qid]})")
        if not text.strip():
            raise DataError(f"{path}:{line_no}: query {qid!r} has empty text")
        seen[qid] = line_no
        ids.append(qid)
        texts.append(text)
    if not ids:
        raise DataError(f"{path}: no queries")
    return Queries(ids, texts)


def _relevance(score: str, path: Path, line_no: int) -> int:
    try:
        value = float(score)
    except ValueError:
        raise DataError(f"{path}:{line_no}: score {score!r} is not a number") from None
    if not math.isfinite(value) or value != int(value):
        raise DataError(f"{path}:{line_no}: relevance {score!r} is not an integer")
    return int(value)


def read_qrels(
    path: str | Path,
    query_ids: set[str] | None = None,
    doc_ids: set[str] | dict[str, int] | None = None,
    on_missing: str = "error",
) -> Qrels:
    """BEIR `qrels/<split>.tsv` (query-id, corpus-id, score; header optional) or TREC 4-column.

    A judgement naming a query or document that is not in `query_ids` / `doc_ids` is an error;
    with `on_missing="warn"` it is dropped and counted in one warning (BEIR's loaders keep
    going the same way).
    """
    if on_missing not in ("error", "warn"):
        raise ValueError(f"on_missing={on_missing!r}; expected 'error' or 'warn'")
    path = Path(path)
    qrels: Qrels = {}
    dropped: Counter = Counter()
    for line_no, line in iter_lines(path):
        if not line.strip():
            continue
        cols = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
        if line_no == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(cols) == 4:
            cols = [cols[0], cols[2], cols[3]]
        if len(cols) != 3:
            raise DataError(f"{path}:{line_no}: expected 3 tab-separated columns, got {len(cols)}")
        qid, did, score = (c.strip() for c in cols)
        rel = _relevance(score, path, line_no)
        missing = None
        if query_ids is not None and qid not in query_ids:
            missing = f"unknown query id {qid!r}"
            dropped["name a query missing from the queries file"] += 1
        elif doc_ids is not None and did not in doc_ids:
            missing = f"unknown corpus id {did!r}"
            dropped["name a document missing from the corpus"] += 1
        if missing is not None:
            if on_missing == "error":
                raise DataError(
                    f"{path}:{line_no}: {missing} (on_missing='warn' drops such judgements)"
                )
            continue
        if did in qrels.get(qid, {}):
            raise DataError(f"{path}:{line_no}: duplicate judgement ({qid!r}, {did!r})")
        qrels.setdefault(qid, {})[did] = rel
    _warn_counts(path, Counter({f"{k} (dropped)": v for k, v in dropped.items()}))
    if not qrels:
        why = "all were dropped" if dropped else "the file is empty or holds only its header"
        raise DataError(f"{path}: no judgements ({why})")
    return qrels


@dataclasses.dataclass
class BeirDataset:
    corpus: Corpus
    queries: Queries
    qrels: Qrels


def read_beir(folder: str | Path, split: str = "test", on_missing: str = "error") -> BeirDataset:
    folder = Path(folder)
    corpus = read_beir_corpus(folder / "corpus.jsonl")
    queries = read_beir_queries(folder / "queries.jsonl")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path, set(queries.ids), corpus.row_of, on_missing)
    return BeirDataset(corpus, queries, qrels)


CORPUS_NAMES = ("corpus.jsonl", "corpus.tsv", "psgs_w100.tsv")


def find_corpus(folder: str | Path) -> Path:
    """A data folder's corpus file: BEIR `corpus.jsonl` or a DPR `corpus.tsv` / `psgs_w100.tsv`
    (each possibly gzipped)."""
    folder = Path(folder)
    for name in CORPUS_NAMES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return folder / name
    raise DataError(f"{folder}: no corpus file (looked for {', '.join(CORPUS_NAMES)}[.gz])")


def read_training_corpus(source: str | Path) -> Corpus:
    """A corpus to train on, queries or not (C4, Wikipedia, any BEIR corpus): a data folder
    (its corpus file, `find_corpus`) or a corpus file itself."""
    path = Path(source)
    if path.is_dir():
        path = find_corpus(path)
    elif not path.is_file():
        raise DataError(f"{source}: no such corpus folder or file")
    return read_corpus(path)


def join_corpora(corpora: list[Corpus]) -> Corpus:
    """One corpus of several; ids prefixed "<i>:" when there is more than one (ids of
    different corpora may collide)."""
    if len(corpora) == 1:  # as it is (a memory-mapped corpus stays one)
        return corpora[0]
    ids, titles, texts = [], [], []
    for i, c in enumerate(corpora):
        prefix = f"{i}:" if len(corpora) > 1 else ""
        ids += [prefix + x for x in c.ids]
        titles += c.titles
        texts += c.texts
    return Corpus(ids, titles, texts)


def read_corpus(path: str | Path, on_empty: str = "warn") -> Corpus:
    """A BEIR `corpus.jsonl[.gz]` or a DPR `psgs_w100.tsv[.gz]`, by the file name."""
    path = Path(path)
    if path.name.removesuffix(".gz").endswith(".tsv"):
        return read_dpr_passages(path, on_empty)
    return read_beir_corpus(path, on_empty)


def read_dpr_passages(path: str | Path, on_empty: str = "warn") -> Corpus:
    """DPR `psgs_w100.tsv`: header `id text title`, then one passage per row."""
    path = Path(path)
    ids, titles, texts, seen, counts = [], [], [], {}, Counter()
    for line_no, cols in _csv_rows(path):
        if line_no == 1 and cols and cols[0] == "id":
            continue
        if len(cols) != 3:
            raise DataError(
                f"{path}:{line_no}: expected 3 columns (id, text, title), got {len(cols)}"
            )
        pid, text, title = cols
        _check_id(pid, path, line_no)
        if pid in seen:
            raise DataError(f"{path}:{line_no}: duplicate id {pid!r} (first on line {seen[pid]})")
        if not text.strip() and not title.strip():
            _empty_document(path, line_no, pid, on_empty, counts)
        seen[pid] = line_no
        ids.append(pid)
        texts.append(text)
        titles.append(title)
    if not ids:
        raise DataError(f"{path}: no passages")
    _warn_counts(path, counts)
    return Corpus(ids, titles, texts)


def _check_answers(answers: Any, path: Path, line_no: int) -> list[str]:
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{path}:{line_no}: answers must be a list of strings")
    if not answers or not all(a.strip() for a in answers):
        raise DataError(f"{path}:{line_no}: empty answer list or empty answer string")
    return answers


def read_dpr_qa(path: str | Path, match_type: str = "string") -> list[QAExample]:
    """DPR QA csv: `question \\t ['answer', ...]` (answers parsed with ast.literal_eval)."""
    path = Path(path)
    out = []
    for line_no, cols in _csv_rows(path):
        if not cols or not any(c.strip() for c in cols):
            continue
        if len(cols) != 2:
            raise DataError(f"{path}:{line_no}: expected 2 columns (question, answers)")
        question, raw = cols
        if not question.strip():
            raise DataError(f"{path}:{line_no}: empty question")
        try:
            answers = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(
                f"{path}:{line_no}: answers {raw[:60]!r} are not a Python list"
            ) from None
        out.append(
            QAExample(
                str(line_no - 1), question, _check_answers(answers, path, line_no), match_type
            )
        )
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def read_qa_jsonl(path: str | Path) -> list[QAExample]:
    """`{"question", "answers", "id"?, "answer_type"?: "string"|"regex"}` per line."""
    path = Path(path)
    out, seen, counts = [], {}, Counter()
    for line_no, row in _jsonl(path):
        question = _field(row, "question", path, line_no)
        if not question.strip():
            raise DataError(f"{path}:{line_no}: empty question")
        answers = _check_answers(_field(row, "answers", path, line_no, list), path, line_no)
        if "id" in row:
            qid = _field(row, "id", path, line_no)
        else:
            counts["have no id (line number used)"] += 1
            qid = str(line_no)
        if qid in seen:
            raise DataError(f"{path}:{line_no}: duplicate id {qid!r} (first on line {seen[qid]})")
        seen[qid] = line_no
        match_type = row.get("answer_type", "string")
        if match_type not in ("string", "regex"):
            raise DataError(f"{path}:{line_no}: answer_type {match_type!r} not in (string, regex)")
        out.append(QAExample(qid, question, answers, match_type))
    if not out:
        raise DataError(f"{path}: no questions")
    _warn_counts(path, counts)
    return out


def read_questions(path: str | Path) -> list[str]:
    """Training questions (ART needs nothing else): BEIR queries.jsonl, QA jsonl or DPR QA csv."""
    path = Path(path)
    name = path.name.removesuffix(".gz")
    if name.endswith((".csv", ".tsv")):
        return [ex.question for ex in read_dpr_qa(path)]
    first = next((line for _, line in iter_lines(path) if line.strip()), "")
    if '"_id"' in first:
        return read_beir_queries(path).texts
    return [ex.question for ex in read_qa_jsonl(path)]


@dataclasses.dataclass
class MinedNegatives:
    """Supervised training examples with mined hard negatives: per query, its positive and
    hard-negative passage rows."""

    query_ids: list[str]
    positives: list[list[int]]
    negatives: list[list[int]]


def read_hard_negatives(
    path: str | Path,
    query_ids: set[str],
    row_of: Any,
    ce_score_margin: float = 3.0,
    per_system: int = 5,
) -> MinedNegatives:
    """sentence-transformers' `msmarco-hard-negatives.jsonl[.gz]` as BEIR's
    train_msmarco_v3 reads it (beir-cellar/beir examples/retrieval/training/
    train_msmarco_v3.py:86-110): per line {"qid", "pos": [{"pid", "ce-score"}], "neg":
    {system: [{"pid", "ce-score"}, …]}}; a negative is kept when its cross-encoder score is at
    most (the positives' lowest − `ce_score_margin`), at most `per_system` new ones per
    system, in the file's order; a query needs a positive and a negative. Queries outside
    `query_ids` and passages outside `row_of` are skipped (counted in a warning)."""
    path = Path(path)
    out = MinedNegatives([], [], [])
    skipped = Counter()
    for line_no, row in _jsonl(path):
        try:
            out_row = _mined_row(row, query_ids, row_of, ce_score_margin, per_system, skipped)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{path}:{line_no}: expected {{'qid', 'pos': [{{'pid', 'ce-score'}}], 'neg': "
                f"{{system: [{{'pid', 'ce-score'}}]}}}} ({type(e).__name__}: {e})"
            ) from None
        if out_row is not None:
            out.query_ids.append(out_row[0])
            out.positives.append(out_row[1])
            out.negatives.append(out_row[2])
    if skipped:
        log.warning("%s: skipped %s", path, ", ".join(f"{n} {w}" for w, n in skipped.items()))
    if not out.query_ids:
        raise DataError(f"{path}: no query with a positive and a hard negative in the corpus")
    return out


def _mined_row(
    row: dict[str, Any],
    query_ids: set[str],
    row_of: Any,
    ce_score_margin: float,
    per_system: int,
    skipped: Counter,
) -> tuple[str, list[int], list[int]] | None:
    """One line of the hard-negatives file → (qid, positive rows, negative rows), or None."""
    qid = str(row["qid"])
    pos, neg = row["pos"], row["neg"]
    if not isinstance(pos, list) or not isinstance(neg, dict):
        raise TypeError("'pos' must be a list and 'neg' a dict")
    if qid not in query_ids:
        skipped["queries not in the query file"] += 1
        return None
    if not pos:
        skipped["queries without a positive"] += 1
        return None
    threshold = min(float(p["ce-score"]) for p in pos) - ce_score_margin
    negatives: list[str] = []
    for system_negatives in neg.values():
        added = 0
        for item in system_negatives:
            if float(item["ce-score"]) > threshold:
                continue
            pid = str(item["pid"])
            if pid not in negatives:
                negatives.append(pid)
                added += 1
                if added >= per_system:
                    break
    pos_rows = [row_of[str(p["pid"])] for p in pos if str(p["pid"]) in row_of]
    neg_rows = [row_of[p] for p in negatives if p in row_of]
    if len(pos_rows) < len(pos) or len(neg_rows) < len(negatives):
        skipped["queries with passages not in the corpus"] += 1
    if not pos_rows or not neg_rows:
        skipped["queries left without a positive or a negative"] += 1
        return None
    return qid, pos_rows, neg_rows
