"""Tokenized corpus store: tokenize once, memory-map forever.

A store is a folder with one sub-folder ("table") per tokenization — the retriever's
passage tokens, the T5 teacher's passage tokens — each holding `.npy` arrays [N, L]
(uint16 when the vocabulary fits, else int32) and a `manifest.json` recording the tokenizer
fingerprint, max length, row count and corpus content hash. A table's folder name carries a
hash of all of that, so a table is written once, never modified, and a different setting
gets its own folder (`build=False` refuses instead of tokenizing).

A build tokenizes fixed shards of `shard_rows` rows, each written atomically into
`.<table>.shards/` beside the table: a killed build resumes with the shards it finished, any
number of worker processes (`jaxret prepare --workers N`) writes the same bytes, and the
table is assembled and renamed into place only when every shard exists. A multi-process
training run never tokenizes while another process waits for it in a device collective:
it refuses a missing table and names `jaxret prepare` (or, for methods that allow it, each
process builds its own copy without waiting for any other).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxret.data.readers import Corpus
from jaxret.data.tokenization import Truncation
from jaxret.errors import RunError

# (titles, texts, truncation counter) → arrays [n, L]
TokenizeFn = Callable[[list[str], list[str], Truncation], dict[str, np.ndarray]]


class StoreMismatchError(ValueError):
    pass


class StoreMissingError(StoreMismatchError):
    """A multi-process run found no token table: it must be prepared before the job."""


SHARD_ROWS = 65536  # rows per build shard: 321 shards for the 21M-passage Wikipedia split


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Name + vocabulary size + a hash of the vocabulary: changes whenever token ids would."""
    import hashlib

    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return f"{getattr(tokenizer, 'name_or_path', '')}|{len(vocab)}|{h}"


class TokenTable:
    """Read-only memory-mapped arrays of one tokenization."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.arrays = {
            k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in self.manifest["keys"]
        }

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    def truncation(self, what: str) -> Truncation:
        """What tokenizing the corpus cut (recorded in the manifest when the table was built)."""
        t = Truncation(what, self.max_length)
        recorded = self.manifest.get("truncation") or {}
        t.rows, t.cut, t.longest = (int(recorded.get(k, 0)) for k in ("rows", "cut", "longest"))
        return t

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) as int32; rows past the end are zero (padding)."""
        n = len(self)
        out = {}
        for k, arr in self.arrays.items():
            block = np.zeros((stop - start, arr.shape[1]), np.int32)
            real = max(0, min(stop, n) - start)
            if real:
                block[:real] = arr[start : start + real]
            out[k] = block
        return out

    def take(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(arr[np.asarray(row_ids)], np.int32) for k, arr in self.arrays.items()}


def table_folder(store: str | os.PathLike, name: str, expected: dict[str, Any]) -> Path:
    """`store/<name>-<key>`: one immutable folder per (corpus, tokenization); a different
    setting gets a different folder, so a table is never replaced under a reader."""
    key = hashlib.sha256(json.dumps(expected, sort_keys=True, default=str).encode()).hexdigest()
    return Path(store) / f"{name}-{key[:16]}"


def _mismatch(store: Path, name: str, expected: dict[str, Any]) -> str:
    """What the newest other table of this name was built for, compared with `expected`."""
    others = sorted(store.glob(f"{name}-*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not others:
        return f"no token table {name!r} in {store}"
    manifest = json.loads(others[-1].read_text())
    stale = {k: (manifest.get(k), v) for k, v in expected.items() if manifest.get(k) != v}
    detail = "; ".join(f"{k}: stored {a!r}, wanted {b!r}" for k, (a, b) in stale.items())
    return f"token table {others[-1].parent} does not match: {detail}"


def open_table(
    store: str | os.PathLike,
    name: str,
    corpus: Corpus,
    tokenize: TokenizeFn,
    fingerprint: dict[str, Any],
    build: bool = True,
    multi_process: str = "each",
    workers: int = 1,
    shard_rows: int = SHARD_ROWS,
    prepare_hint: str = "",
) -> TokenTable:
    """Opens the table `name` of `corpus` in `store`, tokenizing the corpus first if needed.

    `fingerprint` must describe everything that changes the token ids (tokenizer fingerprint,
    max length, passage format or verbalizer); its `vocab_size` decides the storage dtype.
    `tokenize` counts what it cuts in the `Truncation` it is given; the count is kept in the
    manifest (`TokenTable.truncation`). A single process builds a missing table inline
    (`workers` processes). In a multi-process run no process ever waits for another's build:
    `multi_process="refuse"` raises StoreMissingError naming `prepare_hint` (the command that
    builds it before the job); "each" lets every process build (or finish) its own copy.
    """
    store = Path(store)
    expected = {"corpus_hash": corpus.content_hash(), "rows": len(corpus), **fingerprint}
    folder = table_folder(store, name, expected)
    if (folder / "manifest.json").is_file():
        return TokenTable(folder)
    if not build:
        raise StoreMismatchError(_mismatch(store, name, expected))
    # (distributed first: asking jax.process_count() would start a backend, and `prepare`
    # forks its workers with none running)
    multi = jax.distributed.is_initialized() and jax.process_count() > 1
    if multi and multi_process == "refuse":
        raise StoreMissingError(
            f"token table {name!r} of this corpus is not in {store} (or is incomplete): a "
            "multi-process run does not tokenize, since the other processes would wait for it "
            "in a device collective. Build it before the job"
            + (f": {prepare_hint}" if prepare_hint else " with `jaxret prepare`")
        )
    build_table(folder, corpus, tokenize, expected, workers, shard_rows)
    return TokenTable(folder)


def build_table(
    folder: Path,
    corpus: Corpus,
    tokenize: TokenizeFn,
    manifest: dict[str, Any],
    workers: int = 1,
    shard_rows: int = SHARD_ROWS,
    progress: bool = True,
) -> Path:
    """Tokenizes `corpus` into the table `folder` (see the module docstring): shards first
    (kept across kills), then the arrays in a private temporary folder, the manifest last,
    then an atomic rename (which fails harmlessly if another builder got there first: its
    table is identical)."""
    if (folder / "manifest.json").is_file():
        return folder
    n = len(corpus)
    if n == 0:
        raise ValueError(f"{folder.name}: the corpus is empty")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be ≥ 1, got {shard_rows}")
    shards = folder.with_name(f".{folder.name}.shards")
    count = -(-n // shard_rows)
    try:
        shards.mkdir(parents=True, exist_ok=True)
        todo = [i for i in range(count) if not _shard_path(shards, i).is_file()]
        if todo:
            _tokenize_shards(
                shards, todo, count, corpus, tokenize, manifest, shard_rows, workers, progress
            )
        _remove_dead_builds(folder)
        suffix = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = folder.with_name(f".{folder.name}.tmp-{suffix}")
        tmp.mkdir(parents=True)
        try:
            _assemble(tmp, shards, count, n, folder.name, manifest)
            os.rename(tmp, folder)  # atomic; fails if another builder got there first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        # Another builder (a process of this job, or a concurrent `prepare`) finished the
        # same table first: its table is identical. Shards this builder wrote while the
        # other removed the folder (or re-created it) are spent too.
        if (folder / "manifest.json").is_file():
            shutil.rmtree(shards, ignore_errors=True)
            return folder
        raise
    shutil.rmtree(shards, ignore_errors=True)  # the table is complete: shards are spent
    return folder


def _shard_path(shards: Path, i: int) -> Path:
    return shards / f"{i:06d}.npz"


def _tokenize_shard(
    shards: Path, i: int, corpus: Corpus, tokenize: TokenizeFn, manifest: dict, shard_rows: int
) -> None:
    """Tokenizes rows [i·shard_rows, …) into shard file i (written whole, then renamed)."""
    s, e = i * shard_rows, min((i + 1) * shard_rows, len(corpus))
    trunc = Truncation("shard", int(manifest.get("max_length", 0)))
    part: dict[str, np.ndarray] = {}
    for b in range(s, e, 2048):  # tokenizer batches
        got = tokenize(
            corpus.titles[b : min(b + 2048, e)], corpus.texts[b : min(b + 2048, e)], trunc
        )
        for k, v in got.items():
            part.setdefault(k, []).append(v)
    arrays = {k: np.concatenate(v) for k, v in part.items()}
    # Half the bytes when every id fits (BERT's 30k and T5's 32k vocabularies do).
    small = int(manifest.get("vocab_size", 2**31)) <= 2**16
    for k, v in arrays.items():
        if small and len(v) and int(v.max()) >= 2**16:
            raise OverflowError(f"token id {int(v.max())} does not fit uint16")
        arrays[k] = v.astype(np.uint16 if small else np.int32)
    counts = np.array([trunc.rows, trunc.cut, trunc.longest], np.int64)
    path = _shard_path(shards, i)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, __truncation__=counts, **arrays)
    os.replace(tmp, path)


def _tokenize_shards(
    shards: Path,
    todo: list[int],
    count: int,
    corpus: Corpus,
    tokenize: TokenizeFn,
    manifest: dict,
    shard_rows: int,
    workers: int,
    progress: bool,
) -> None:
    """Shards `todo` in this process (workers=1) or in `workers` forked processes that take
    the next shard from a shared counter; a progress bar of passages and passages/s."""
    rows = lambda i: min((i + 1) * shard_rows, len(corpus)) - i * shard_rows
    total = sum(rows(i) for i in todo)
    bar = tqdm(
        total=total,
        desc=f"tokenizing {shards.name[1:-7]}",
        unit="psg",
        unit_scale=True,
        disable=not progress or total <= 2048,
    )
    t0 = time.perf_counter()
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        for i in todo:
            _tokenize_shard(shards, i, corpus, tokenize, manifest, shard_rows)
            bar.update(rows(i))
    else:
        # fork: the workers inherit the corpus and the tokenizer (neither is pickled).
        ctx = multiprocessing.get_context("fork")
        next_shard = ctx.Value("i", 0)

        def work() -> None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            while True:
                with next_shard.get_lock():
                    k = next_shard.value
                    next_shard.value += 1
                if k >= len(todo):
                    return
                _tokenize_shard(shards, todo[k], corpus, tokenize, manifest, shard_rows)

        procs = [ctx.Process(target=work, daemon=True) for _ in range(workers)]
        for p in procs:
            p.start()
        done: set[int] = set()
        try:
            while any(p.is_alive() for p in procs):
                time.sleep(0.2)
                finished = {i for i in todo if i not in done and _shard_path(shards, i).is_file()}
                bar.update(sum(rows(i) for i in finished))
                done |= finished
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        missing = [i for i in todo if not _shard_path(shards, i).is_file()]
        if failed or missing:
            raise RunError(
                f"tokenizing {shards}: {len(failed)} worker(s) failed (exit codes {failed}); "
                f"{len(missing)} of {count} shards missing. Finished shards are kept: run again "
                "to resume."
            )
        bar.update(total - bar.n)
    bar.close()
    if progress and total > 2048:
        tqdm.write(
            f"tokenized {total} passages in {time.perf_counter() - t0:.1f}s "
            f"({total / max(time.perf_counter() - t0, 1e-9):.0f} passages/s, "
            f"{workers} worker(s))"
        )


def _assemble(tmp: Path, shards: Path, count: int, n: int, name: str, manifest: dict) -> None:
    """The table's arrays [n, L] from the shards in order, then its manifest (written last: a
    folder with a manifest is complete)."""
    arrays: dict[str, np.ndarray] = {}
    trunc = Truncation(name, int(manifest.get("max_length", 0)))
    start = 0
    for i in range(count):
        with np.load(_shard_path(shards, i)) as shard:
            rows, cut, longest = (int(x) for x in shard["__truncation__"])
            trunc.rows, trunc.cut = trunc.rows + rows, trunc.cut + cut
            trunc.longest = max(trunc.longest, longest)
            keys = [k for k in shard.files if k != "__truncation__"]
            for k in keys:
                v = shard[k]
                if k not in arrays:
                    arrays[k] = np.lib.format.open_memmap(
                        tmp / f"{k}.npy", mode="w+", dtype=v.dtype, shape=(n, v.shape[1])
                    )
                arrays[k][start : start + len(v)] = v
            start += len(shard[keys[0]])
    if start != n:
        raise RunError(f"{shards}: the shards hold {start} rows, the corpus {n}")
    for arr in arrays.values():
        arr.flush()
    max_length = next(iter(arrays.values())).shape[1]
    manifest = {
        **manifest,
        "keys": sorted(arrays),
        "max_length": max_length,
        "truncation": trunc.as_dict(),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _remove_dead_builds(folder: Path) -> list[Path]:
    """Deletes the temporary folders that killed builds of `folder` left on this host: their
    name holds the builder's host and pid, and a pid that no longer runs will never rename
    its folder. Builds of other hosts (a shared filesystem) are left alone: their liveness
    cannot be seen from here."""
    host = socket.gethostname()
    removed = []
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        owner = tmp.name[len(f".{folder.name}.tmp-") :]  # "{host}-{pid}-{random}"
        owner_host, _, pid = owner.rpartition("-")[0].rpartition("-")
        if owner_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed
