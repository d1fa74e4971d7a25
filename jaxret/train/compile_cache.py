"""A persistent XLA compilation cache for a run's restarts (`train.compile_cache`).

A restart after a preemption compiles every program again before its first step: with the
cache a one-process rehearsal resumes in 12.0 s instead of 17.3 s (docs/scaling.md), and a
step with a large teacher compiles for longer than the tiny rehearsal's. JAX
can keep compiled executables on disk (its persistent compilation cache); `using` points it at
a folder for the length of one training run and puts the process's previous setting back
after, so that nothing leaks into the next run of the same process.

Where: a folder every process of the job reads. JAX writes entries from process 0 only (to
spare shared filesystems concurrent writers), so a folder local to each host would speed up
host 0 alone and the others would still compile while it waits for them; the run's workdir
(shared: its checkpoints are there) is the natural place, hence a relative path is taken
inside it. The other processes read process 0's entries where the key is the same in every
process: on GPU JAX strips the device assignment from it for that purpose, and a TPU
slice's topology is the pod's (jax/_src/cache_key.py, jax 0.10.2). On CPU the key holds
each process's own topology, so in a multi-process CPU job (the rehearsal) only process 0
reads its programs back and the others compile at every start (measured, docs/scaling.md).
Kills: JAX writes an entry in place. One cut short by a kill fails to decompress at every
later start; JAX then warns and compiles, but never writes it again (an entry that exists
is kept). `using` removes entries that do not decompress before the run compiles anything
(every process at its start, before the distributed start that precedes any compilation of
the job; it reads the folder once: the rehearsal's 76 programs are 1.1 MB).
Trust: an entry is code the process runs: the folder must not be writable by others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from jaxret.configlib import ConfigError

log = logging.getLogger(__name__)

ENTRY_SUFFIX = "-cache"  # JAX's file cache: <key>-cache (and <key>-atime with eviction on)


@dataclasses.dataclass
class CacheUse:
    """What a run did with the cache: programs looked up, read from it, written to it
    (process 0, those that took ≥ `jax_persistent_cache_min_compile_time_secs` to
    compile), and entries removed at the start as unreadable."""

    folder: str | None = None
    looked_up: int = 0
    read: int = 0
    written: int = 0
    removed: int = 0

    def counts(self) -> dict[str, float]:
        """The counts as a metrics row ("compile_cache_read", …)."""
        return {
            f"compile_cache_{k}": float(getattr(self, k))
            for k in ("looked_up", "read", "written", "removed")
        }


def _decompress():
    """JAX's own reader of an entry's bytes (zstd or zlib, as JAX wrote it), or None when
    this JAX has no such function: then nothing is removed (JAX's read still falls back
    to compiling)."""
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:  # pragma: no cover - another JAX layout
        return None
    return decompress_executable


def remove_unreadable(folder: Path) -> int:
    """Removes the entries of `folder` that do not decompress (cut short by a kill while
    JAX wrote them); → how many. Another process removing the same entry is harmless."""
    decompress = _decompress()
    if decompress is None or not folder.is_dir():
        return 0
    removed = 0
    for entry in sorted(folder.glob(f"*{ENTRY_SUFFIX}")):
        try:
            decompress(entry.read_bytes())
            continue
        except FileNotFoundError:
            continue
        except Exception as e:  # any decoder error: the bytes are not a whole entry
            why = f"{type(e).__name__}: {e}"
        try:
            entry.unlink()
            removed += 1
            log.warning("compile cache: removed %s, which does not decompress (%s)", entry, why)
        except FileNotFoundError:
            pass
    return removed


def cache_folder(setting: str, workdir: Path) -> Path | None:
    """`train.compile_cache` as a folder: "" → None (off); a relative path is inside the
    workdir."""
    if not setting:
        return None
    folder = Path(setting).expanduser()
    return folder if folder.is_absolute() else Path(workdir) / folder


@contextlib.contextmanager
def using(setting: str, workdir: Path) -> Iterator[CacheUse]:
    """JAX's persistent compilation cache in `cache_folder(setting, workdir)` inside the
    block (off when the setting is ""); the previous cache folder of the process after it.
    The yielded CacheUse counts the block's lookups, reads and writes."""
    folder = cache_folder(setting, workdir)
    use = CacheUse(None if folder is None else str(folder))
    if folder is None:
        yield use
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError as e:
        writable, why = False, f"{type(e).__name__}: {e.strerror or e}"
    else:
        why = "not writable"
    if not writable:
        raise ConfigError(
            f"train.compile_cache={setting!r}: {folder} cannot be used ({why}); give a "
            "writable folder, or --config.train.compile_cache= to compile at every start"
        )
    use.removed = remove_unreadable(folder)
    previous = jax.config.jax_compilation_cache_dir

    def count(event: str, **kw) -> None:
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            use.looked_up += 1
        elif event == "/jax/compilation_cache/cache_hits":
            use.read += 1
        elif event == "/jax/compilation_cache/cache_misses":  # JAX's name for a write
            use.written += 1

    compilation_cache.set_cache_dir(str(folder))
    compilation_cache.reset_cache()  # JAX opens its cache once per process: open this one
    jax.monitoring.register_event_listener(count)
    try:
        yield use
    finally:
        jax.monitoring.unregister_event_listener(count)
        compilation_cache.set_cache_dir(previous)
        compilation_cache.reset_cache()
        log.info(
            "compile cache %s: %d programs read of %d, %d written",
            folder,
            use.read,
            use.looked_up,
            use.written,
        )
