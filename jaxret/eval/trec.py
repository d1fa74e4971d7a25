"""TREC run files: `qid Q0 docid rank score tag`, one hit a line."""

from __future__ import annotations

import os
from pathlib import Path

from jaxret.data.readers import DataError

Run = dict[str, dict[str, float]]


def write_run(path: str | os.PathLike, run: Run, tag: str = "jaxret") -> None:
    """A TREC run file, written whole under a temporary name and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            for qid, hits in run.items():
                ranked = sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))
                for rank, (doc, score) in enumerate(ranked, 1):
                    if not doc or not qid or any(c.isspace() for c in f"{qid}{doc}"):
                        raise ValueError(f"ids {qid!r} / {doc!r} cannot be written to a TREC run")
                    f.write(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_run(path: str | os.PathLike) -> Run:
    run: Run = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.split()
            if len(cols) != 6:
                raise DataError(f"{path}:{line_no}: expected 6 columns (qid Q0 doc rank score tag)")
            qid, _, doc, _, score, _ = cols
            try:
                run.setdefault(qid, {})[doc] = float(score)
            except ValueError:
                raise DataError(f"{path}:{line_no}: score {score!r} is not a number") from None
    return run
