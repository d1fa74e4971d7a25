"""Tokenized corpus store: tokenize once, memory-map forever.

A store is a folder with one sub-folder ("table") per tokenization — the retriever's
passage tokens, the T5 teacher's passage tokens — each holding `.npy` arrays [N, L]
(uint16 when the vocabulary fits, else int32) and a `manifest.json` recording the tokenizer
fingerprint, max length, row count and corpus content hash. Opening a table whose manifest
does not match what the caller expects re-tokenizes (or, with `build=False`, refuses).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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


def open_table(
    store: str | os.PathLike,
    name: str,
    corpus: Corpus,
    tokenize: TokenizeFn,
    fingerprint: dict[str, Any],
    batch_size: int = 2048,
    build: bool = True,
) -> TokenTable:
    """Opens `store/name`, tokenizing `corpus` first if absent or built for something else.

    `fingerprint` must describe everything that changes the token ids (tokenizer fingerprint,
    max length, passage format or verbalizer); its `vocab_size` decides the storage dtype.
    `tokenize` counts what it cuts in the `Truncation` it is given; the count is kept in the
    manifest (`TokenTable.truncation`).
    """
    folder = Path(store) / name
    expected = {"corpus_hash": corpus.content_hash(), "rows": len(corpus), **fingerprint}
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        stale = {k: (manifest.get(k), v) for k, v in expected.items() if manifest.get(k) != v}
        if not stale:
            return TokenTable(folder)
        if not build:
            detail = "; ".join(f"{k}: stored {a!r}, wanted {b!r}" for k, (a, b) in stale.items())
            raise StoreMismatchError(f"token table {folder} does not match: {detail}")
    elif not build:
        raise StoreMismatchError(f"no token table at {folder}")
    _build(folder, corpus, tokenize, expected, batch_size)
    return TokenTable(folder)


def _build(
    folder: Path, corpus: Corpus, tokenize: TokenizeFn, manifest: dict, batch_size: int
) -> None:
    # Several processes of one run may build the same table at once: each writes its own
    # temporary folder and the first rename wins.
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = len(corpus)
    arrays: dict[str, np.ndarray] = {}
    trunc = Truncation(folder.name, int(manifest.get("max_length", 0)))
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=f"tokenizing {folder.name}", unit="batch", disable=n <= batch_size):
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
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    stale = folder.with_name(f"{folder.name}.stale{os.getpid()}")
    if folder.exists():
        try:
            folder.rename(stale)
        except OSError:
            pass
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first; its table is identical
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)
