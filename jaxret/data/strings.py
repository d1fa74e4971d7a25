"""Strings stored back to back in one UTF-8 blob, decoded when read: the store's text table
(`corpus_text`) as a Sequence[str]. numpy only, so that a worker process that unpickles one
(answer matching, `eval.qa`) maps the files without importing JAX."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np


class Strings(Sequence[str]):
    """String i = blob[offsets[i] : offsets[i + 1]] as UTF-8, decoded when read."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __reduce__(self) -> tuple:
        # Sent to a worker process (answer matching) as the files it maps, not their bytes.
        blob, offsets = self.blob, self.offsets
        if _mapped(blob) and _mapped(offsets):
            return (_open_strings, (blob.filename, offsets.filename))
        return (Strings, (np.asarray(blob), np.asarray(offsets)))

    def _one(self, i: int) -> str:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.blob[a:b].tobytes().decode()

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._one(j) for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        return self._one(i)

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self), 65536):  # one read per block of rows
            stop = min(start + 65536, len(self))
            a = int(self.offsets[start])
            block = self.blob[a : int(self.offsets[stop])].tobytes()
            cuts = self.offsets[start : stop + 1] - a
            for x, y in zip(cuts[:-1], cuts[1:]):
                yield block[x:y].decode()


def _mapped(a: np.ndarray) -> bool:
    return isinstance(a, np.memmap) and a.filename is not None


def _open_strings(blob: str, offsets: str) -> Strings:
    return Strings(np.memmap(blob, np.uint8, "r"), np.load(offsets, mmap_mode="r"))
