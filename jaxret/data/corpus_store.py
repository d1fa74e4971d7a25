"""Tokenized corpus store: tokenize once, memory-map forever.

A store is a folder with one sub-folder ("table") per tokenization — the retriever's
passage tokens, the T5 teacher's passage tokens — each holding `.npy` arrays [N, L]
(uint16 when the vocabulary fits, else int32) and a `manifest.json` recording the tokenizer
fingerprint, max length, row count and corpus content hash. A table's folder name carries a
hash of all of that, so a table is written once, never modified, and a different setting
gets its own folder (`build=False` refuses instead of tokenizing).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxret.data.readers import Corpus
from jaxret.data.tokenization import Truncation

# (titles, texts, truncation counter) → arrays [n, L]
TokenizeFn = Callable[[list[str], list[str], Truncation], dict[str, np.ndarray]]


class StoreMismatchError(ValueError):
    pass


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
    batch_size: int = 2048,
    build: bool = True,
) -> TokenTable:
    """Opens the table `name` of `corpus` in `store`, tokenizing the corpus first if needed.

    `fingerprint` must describe everything that changes the token ids (tokenizer fingerprint,
    max length, passage format or verbalizer); its `vocab_size` decides the storage dtype.
    `tokenize` counts what it cuts in the `Truncation` it is given; the count is kept in the
    manifest (`TokenTable.truncation`). In a multi-process run, process 0 builds while the
    others wait; a process that then still finds no table (no shared filesystem) builds its
    own copy.
    """
    store = Path(store)
    expected = {"corpus_hash": corpus.content_hash(), "rows": len(corpus), **fingerprint}
    folder = table_folder(store, name, expected)
    if not (folder / "manifest.json").is_file() and not build:
        raise StoreMismatchError(_mismatch(store, name, expected))
    multi = jax.process_count() > 1
    if not multi or jax.process_index() == 0:
        if not (folder / "manifest.json").is_file():
            _build(folder, corpus, tokenize, expected, batch_size)
    if multi:
        multihost_utils.sync_global_devices(f"jaxret-table-{folder.name}")
        if not (folder / "manifest.json").is_file():
            _build(folder, corpus, tokenize, expected, batch_size)
    return TokenTable(folder)


def _build(
    folder: Path, corpus: Corpus, tokenize: TokenizeFn, manifest: dict, batch_size: int
) -> None:
    """Writes the table into a private temporary folder (host, pid and a random suffix in its
    name), the manifest last, then renames it into place. The rename is atomic and fails if
    another builder got there first (its table is identical): a table that opens is always
    complete, and a killed build leaves only a temporary folder that nothing opens."""
    _remove_dead_builds(folder)
    suffix = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = folder.with_name(f".{folder.name}.tmp-{suffix}")
    tmp.mkdir(parents=True)
    try:
        _write(tmp, folder.name, corpus, tokenize, manifest, batch_size)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(
    tmp: Path, name: str, corpus: Corpus, tokenize: TokenizeFn, manifest: dict, batch_size: int
) -> None:
    n = len(corpus)
    arrays: dict[str, np.ndarray] = {}
    trunc = Truncation(name, int(manifest.get("max_length", 0)))
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=f"tokenizing {name}", unit="batch", disable=n <= batch_size):
        e = min(s + batch_size, n)
        part = tokenize(corpus.titles[s:e], corpus.texts[s:e], trunc)
        if not arrays:
            # Half the bytes when every id fits (BERT's 30k and T5's 32k vocabularies do).
            small = int(manifest.get("vocab_size", 2**31)) <= 2**16
            for k, v in part.items():
                dtype = np.uint16 if small else np.int32
                arrays[k] = np.lib.format.open_memmap(
                    tmp / f"{k}.npy", mode="w+", dtype=dtype, shape=(n, v.shape[1])
                )
        for k, v in part.items():
            if arrays[k].dtype == np.uint16 and int(v.max()) >= 2**16:
                raise OverflowError(f"token id {int(v.max())} does not fit uint16")
            arrays[k][s:e] = v
    for arr in arrays.values():
        arr.flush()
    max_length = next(iter(arrays.values())).shape[1]
    manifest = {
        **manifest,
        "keys": sorted(arrays),
        "max_length": max_length,
        "truncation": trunc.as_dict(),
    }
    # The manifest is written last: a folder with a manifest is complete.
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
