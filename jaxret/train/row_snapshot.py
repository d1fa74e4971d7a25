"""A checkpoint of row-sharded arrays that training keeps overwriting in place (ART's
rolling index), taken without a whole copy and without a stall.

The rolling refresh overwrites one piece of every device's block per step, in a ring
(piece p = block-local rows [p·q, (p+1)·q)). The snapshot of step S must hold the rows as
they were at S, yet the next step already overwrites piece `next_piece`. A whole copy at S
costs a second index (on CPU a 512 MB memcpy in the step after the save, 2.1 × a step in
the rehearsal; on GPU/TPU the device-to-host copy of a device's whole share, 2 GB at the
paper's size, on the training thread) and its host memory. Instead each piece is copied
off the devices before the step that overwrites it, in ring order from `next_piece`:
before every step, the piece that step overwrites and `per_step` pieces in all
(`before_step`), so the copy is spread over P / per_step steps and the host holds a few
pieces at a time. A piece is read by a small program (a fresh buffer: the index itself is
never referenced from the host, so its in-place update never copies it), sent to the host
asynchronously and written by a background thread at its place in the process's file.

On disk (`<checkpoints>/rows-<step>/`): per array and process `<name>.process_<i>.bin`, the
process's blocks [blocks, rows_per_shard, ...] in block order, and last
`manifest.process_<i>.json` (shapes, blocks, a CRC32 per block and piece), written once
the data is on disk (fsync): a folder with every process's manifest is complete; one
without is a kill's leftover, never read. Global row r is block r // rows_per_shard in any
layout, so a snapshot is read into another one (another device count, other padding) row
range by row range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import queue
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)
PREFIX = "rows-"  # <checkpoints>/rows-<step>/
BACKGROUND_NICE = 10  # a CFS weight of 110 against the training threads' 1024 (nice 0)


def yield_to_training() -> None:
    """Lowers the calling thread's CPU priority (on Linux a thread has its own nice value):
    a background write (row pieces, checksums) then runs on cores training leaves idle and
    slows no step — on a CPU host XLA's threads compute the step, on GPU/TPU the training
    thread dispatches it. Only a thread that does nothing else calls it (lowering is
    one-way without privileges); elsewhere (nice is per process) it does nothing."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


@dataclasses.dataclass(frozen=True)
class Rows:
    """Row-sharded arrays (each [N_pad, ...], one sharding) of which every step overwrites
    one piece of each device's block, the pieces in a ring: `pieces` of `piece_rows`
    block-local rows (pieces past the block's end are empty), the next step's is
    `next_piece`."""

    arrays: dict[str, jax.Array]
    piece_rows: int
    pieces: int
    next_piece: int


def rows_per_shard(array: jax.Array) -> int:
    return array.sharding.shard_shape(array.shape)[0]


def blocks_of(array: jax.Array) -> list[int]:
    """The blocks (global row // rows_per_shard) this process's devices hold, sorted."""
    rps = rows_per_shard(array)
    return sorted({(s.index[0].start or 0) // rps for s in array.addressable_shards})


@functools.lru_cache(maxsize=8)
def _piece_reader(mesh: Any, spec: PartitionSpec, q: int) -> Any:
    """jit(arrays, start) → rows [start, start + q) of every device's block of each array
    ([devices · q, ...], row-sharded; the start is clamped so that q rows fit)."""

    def read(arrays: dict, start: jax.Array) -> dict:
        return {k: jax.lax.dynamic_slice_in_dim(v, start, q, axis=0) for k, v in arrays.items()}

    return jax.jit(
        jax.shard_map(
            read, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec, check_vma=False
        )
    )


def compile_reader(rows: Rows) -> None:
    """Compiles (and runs once) the piece reader of `rows`: at the first checkpoint it
    would compile between two steps (0.09 s in the rehearsal)."""
    first = next(iter(rows.arrays.values()))
    q = min(rows.piece_rows, rows_per_shard(first))
    reader = _piece_reader(first.sharding.mesh, PartitionSpec(first.sharding.spec[0]), q)
    jax.block_until_ready(reader(rows.arrays, np.int32(0)))


def _name(array_name: str, process: int) -> str:
    return f"{array_name}.process_{process}.bin"


def _manifest(process: int) -> str:
    return f"manifest.process_{process}.json"


class RowSnapshot:
    """Writes `rows` as they are now into `folder` while the owner keeps overwriting them:
    call `before_step` with the current arrays before every step, `finish` to copy the
    rest at once; `join` waits for the files (`complete` after it)."""

    def __init__(self, folder: Path, rows: Rows, per_step: int):
        first = next(iter(rows.arrays.values()))
        if not isinstance(first.sharding, NamedSharding):
            raise TypeError(f"row snapshot: rows need a NamedSharding, got {first.sharding}")
        self.folder, self.rows = Path(folder), rows
        self.rps = rows_per_shard(first)
        self.q = min(rows.piece_rows, self.rps)
        self.per_step = max(1, per_step)
        self.order = [(rows.next_piece + i) % rows.pieces for i in range(rows.pieces)]
        self.dispatched = 0  # pieces of `order` whose read is dispatched
        self.steps = 0  # steps seen since the snapshot was taken
        self.me = jax.process_index()
        self.blocks = blocks_of(first)
        sharding = first.sharding
        self.reader = _piece_reader(sharding.mesh, PartitionSpec(sharding.spec[0]), self.q)
        self.crc: dict[str, list[list[int]]] = {
            k: [[0] * rows.pieces for _ in self.blocks] for k in rows.arrays
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / _manifest(self.me)).unlink(missing_ok=True)  # an older one's: first
        self.files: dict[str, int] = {}
        for k, v in rows.arrays.items():
            fd = os.open(self.folder / _name(k, self.me), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            os.ftruncate(fd, len(self.blocks) * self.rps * self._row_bytes(v))
            self.files[k] = fd
        # Bounded: a disk slower than the reads holds the training thread back instead of
        # piling up piece buffers on the devices.
        self.queue: queue.Queue = queue.Queue(maxsize=4 * self.per_step + 4)
        self.error: BaseException | None = None
        self.closed = False  # the end (None) is queued
        self.stop = threading.Event()
        self.writer = threading.Thread(target=self._write_all, daemon=True, name="row-snapshot")
        self.writer.start()

    @staticmethod
    def _row_bytes(v: jax.Array) -> int:
        return int(np.prod(v.shape[1:], dtype=np.int64)) * v.dtype.itemsize

    @property
    def all_dispatched(self) -> bool:
        return self.dispatched == len(self.order)

    def before_step(self, arrays: dict[str, jax.Array]) -> None:
        """Before a step that overwrites the next piece of the ring: that piece, and up to
        `per_step` pieces in all, are read now (dispatched ahead of the step, so the step's
        in-place write waits for the reads)."""
        self.steps += 1
        upto = max(self.steps, self.dispatched + self.per_step)
        self._dispatch(arrays, min(len(self.order), upto))

    def finish(self, arrays: dict[str, jax.Array]) -> None:
        """Reads every piece not read yet (no step may run in between)."""
        self._dispatch(arrays, len(self.order))

    def _dispatch(self, arrays: dict[str, jax.Array], upto: int) -> None:
        self._raise()
        while self.dispatched < upto:
            piece = self.order[self.dispatched]
            self.dispatched += 1
            start = piece * self.q
            if start >= self.rps:  # past the block's end: empty
                continue
            out = self.reader(arrays, np.int32(start))
            for v in out.values():
                v.copy_to_host_async()
            self._put((piece, start, out))
        if self.all_dispatched and not self.closed:
            self.closed = True
            self._put(None)

    def _put(self, item: Any) -> None:
        """Queues for the writer; a writer that failed is raised here, not waited for."""
        while True:
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                self._raise()
                if not self.writer.is_alive():
                    raise RuntimeError("row snapshot: the writer thread stopped") from None

    def _write_all(self) -> None:
        yield_to_training()
        try:
            while True:
                item = self.queue.get()
                if self.stop.is_set():  # abandoned: no manifest, ever
                    return
                if item is None:
                    break
                self._write(*item)
            for fd in self.files.values():
                os.fsync(fd)
                os.close(fd)
            self.files = {}
            self._write_manifest()
        except BaseException as e:  # re-raised on the training thread
            self.error = e

    def _write(self, piece: int, start: int, out: dict[str, jax.Array]) -> None:
        """Rows [start, start + n) of each block: the read began at min(start, rps − q)
        (clamped); rows before `start` belong to an earlier piece, maybe overwritten since."""
        n = min(self.q, self.rps - start)
        skip = start - min(start, self.rps - self.q)
        for k, v in out.items():
            row_bytes = self._row_bytes(v)
            seen = set()
            for shard in v.addressable_shards:
                block = (shard.index[0].start or 0) // self.q
                if block in seen:  # a replica of a block already written
                    continue
                seen.add(block)
                data = np.ascontiguousarray(np.asarray(shard.data)[skip : skip + n])
                pos = self.blocks.index(block)
                raw = memoryview(data.reshape(-1).view(np.uint8))  # any dtype (bf16 too)
                os.pwrite(self.files[k], raw, (pos * self.rps + start) * row_bytes)
                self.crc[k][pos][piece] = zlib.crc32(raw)

    def _write_manifest(self) -> None:
        manifest = {
            "rows_per_shard": self.rps,
            "piece_rows": self.q,
            "pieces": self.rows.pieces,
            "process": self.me,
            "processes": jax.process_count(),
            "blocks": self.blocks,
            "arrays": {
                k: {
                    "dtype": str(v.dtype),
                    "shape": list(v.shape),
                    "crc32": self.crc[k],
                }
                for k, v in self.rows.arrays.items()
            },
        }
        tmp = self.folder / (_manifest(self.me) + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / _manifest(self.me))

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        """Waits for the files (every piece dispatched) and re-raises a write error."""
        assert self.all_dispatched, "join before every piece was read: call finish"
        self.writer.join()
        self._raise()

    def abandon(self) -> None:
        """Stops writing (the folder stays incomplete: never read, removed later)."""
        self.stop.set()
        self.dispatched, self.closed = len(self.order), True
        while self.writer.is_alive():  # wake it (it stops at its next item), never block
            try:
                self.queue.put_nowait(None)
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.queue.get_nowait()
            self.writer.join(timeout=0.1)
        for fd in self.files.values():
            os.close(fd)
        self.files = {}


def _manifests(folder: Path) -> list[dict] | None:
    """Every process's manifest (process 0's names the count), or None if one is missing."""
    first = folder / _manifest(0)
    if not first.is_file():
        return None
    processes = json.loads(first.read_text())["processes"]
    paths = [folder / _manifest(p) for p in range(processes)]
    return [json.loads(p.read_text()) for p in paths] if all(p.is_file() for p in paths) else None


def complete(folder: Path) -> bool:
    """Whether every process's manifest is in `folder`."""
    return _manifests(folder) is not None


def snapshot_steps(directory: Path) -> dict[int, Path]:
    """{step: folder} of the row snapshots under `directory` (complete or not)."""
    out = {}
    for p in directory.glob(f"{PREFIX}*"):
        tail = p.name[len(PREFIX) :]
        if p.is_dir() and tail.isdigit():
            out[int(tail)] = p
    return out


def _old_blocks(new_blocks: list[int], new_rps: int, old_rps: int, old_rows: int) -> list[int]:
    """The saved blocks (of `old_rps` rows, `old_rows` rows in all) that hold any row of the
    new blocks (of `new_rps` rows): global row r is block r // rps in either layout."""
    need = set()
    for nb in new_blocks:
        lo, hi = nb * new_rps, min((nb + 1) * new_rps, old_rows)
        need.update(range(lo // old_rps, -(-hi // old_rps)))
    return sorted(need)


def _bad_piece(
    path: Path, pos: int, rps: int, row_bytes: int, q: int, crcs: list[int], first: int = 0
) -> int | None:
    """The first piece from `first` on of the block at `pos` of `path` whose bytes differ
    from its CRC32, or None: each of those pieces is read once."""
    with open(path, "rb") as f:
        for piece in range(first, len(crcs)):
            lo, hi = piece * q, min((piece + 1) * q, rps)
            f.seek((pos * rps + lo) * row_bytes)
            if zlib.crc32(f.read((hi - lo) * row_bytes)) != crcs[piece]:
                return piece
    return None


@dataclasses.dataclass
class _Source:
    """One saved block: where it is, and its pieces' CRC32s, checked as `load` reads it."""

    path: Path
    pos: int  # the block's position in its file
    rps: int  # its rows
    row_bytes: int
    q: int  # rows per piece
    crcs: list[int]  # one per piece that holds rows of the block
    hashed: int = 0  # rows [0, hashed) fed in order (a piece's CRC compared at its end)
    crc: int = 0  # of the piece being fed, up to `hashed`
    bad: int | None = None

    @property
    def offset(self) -> int:
        return self.pos * self.rps * self.row_bytes

    def feed(self, row: int, data: memoryview) -> None:
        """The bytes of the block's rows from `row` on, as read: rows at the front of the
        ones hashed so far extend the CRC; others (a read into another layout, out of
        order) are left for `first_bad`, which reads them from the file."""
        end = row + len(data) // self.row_bytes
        if not row <= self.hashed < end:
            return
        while self.hashed < end and self.hashed // self.q < len(self.crcs):
            piece = self.hashed // self.q
            piece_end = min((piece + 1) * self.q, self.rps)
            upto = min(piece_end, end)
            lo, hi = (self.hashed - row) * self.row_bytes, (upto - row) * self.row_bytes
            self.crc = zlib.crc32(data[lo:hi], self.crc)
            self.hashed = upto
            if upto == piece_end:
                if self.crc != self.crcs[piece] and self.bad is None:
                    self.bad = piece
                self.crc = 0

    def first_bad(self) -> int | None:
        """The first damaged piece: of those fed, or of the rest read from the file (rows
        the load skipped: padding past the saved rows, or fed out of order)."""
        if self.bad is not None:
            return self.bad
        first = len(self.crcs) if self.hashed >= self.rps else self.hashed // self.q  # unfed
        return _bad_piece(self.path, self.pos, self.rps, self.row_bytes, self.q, self.crcs, first)


def _sources(
    folder: Path, like: dict[str, jax.Array], verify: bool = True
) -> tuple[dict | None, str]:
    """({name: (saved rows per device, saved rows, {saved block: _Source})} for the saved
    blocks that hold this process's rows of `like`, "") when `folder` holds a complete
    snapshot of arrays of `like`'s row width and dtype whose bytes match their CRC32s (read
    piece by piece; `verify=False`: not read — `load` checks them as it reads), else (None,
    why not). The saved layout (rows per device, padding) may differ from `like`'s: a
    resume on another device count reads each row from wherever it was saved."""
    manifests = _manifests(folder)
    if manifests is None:
        return None, "incomplete (a save cut short)"
    where: dict[int, tuple[int, int]] = {}  # block → (process, position in its file)
    for process, m in enumerate(manifests):
        for pos, block in enumerate(m["blocks"]):
            where[block] = (process, pos)
    m0 = manifests[0]
    out: dict[str, tuple[int, int, dict[int, _Source]]] = {}
    for k, v in like.items():
        saved = m0["arrays"].get(k)
        if (
            saved is None
            or saved["shape"][1:] != list(v.shape[1:])
            or saved["dtype"] != str(v.dtype)
        ):
            return None, f"{k}: saved as {saved and (saved['shape'], saved['dtype'])}"
        old_rps, old_rows = m0["rows_per_shard"], saved["shape"][0]
        row_bytes = RowSnapshot._row_bytes(v)
        q, pieces = m0["piece_rows"], min(m0["pieces"], math.ceil(old_rps / m0["piece_rows"]))
        sources: dict[int, _Source] = {}
        for block in _old_blocks(blocks_of(v), rows_per_shard(v), old_rps, old_rows):
            if block not in where:
                return None, f"block {block} is in no process's file"
            process, pos = where[block]
            path = folder / _name(k, process)
            if not path.is_file() or path.stat().st_size < (pos + 1) * old_rps * row_bytes:
                return None, f"{path.name} is missing or truncated"
            crcs = manifests[process]["arrays"][k]["crc32"][pos][:pieces]
            source = _Source(path, pos, old_rps, row_bytes, q, crcs)
            bad = source.first_bad() if verify else None
            if bad is not None:
                return None, f"{path.name} block {block} piece {bad}: CRC32 differs"
            sources[block] = source
        out[k] = (old_rps, old_rows, sources)
    return out, ""


def check(folder: Path, like: dict[str, jax.Array], verify: bool = True) -> str:
    """ "" when `load` can restore `like` from `folder`, else why not (see `_sources`;
    `verify=False`: the bytes are not read, `load` checks them as it reads them)."""
    return _sources(folder, like, verify)[1]


@functools.lru_cache(maxsize=8)
def _chunk_writer(mesh: Any, spec: PartitionSpec) -> Any:
    """jit(target, chunk, start) → target with every device's block rows [start, start + c)
    set to its rows of `chunk` [devices · c, ...]; the target is donated (written in place)."""

    def put(target: jax.Array, chunk: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(target, chunk, start, axis=0)

    body = jax.shard_map(
        put, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=spec, check_vma=False
    )
    return jax.jit(body, donate_argnums=0)


def load(
    folder: Path, like: dict[str, jax.Array], chunk_bytes: int = 32 << 20
) -> tuple[dict[str, jax.Array], str]:
    """(the snapshot's arrays, "") — written into `like`'s buffers in chunks of
    ~`chunk_bytes` per device: the host holds one chunk, never a second copy of the index
    (`like`, e.g. the run's empty donor index, is donated: use the returned arrays). Each
    byte is read once, its piece's CRC32 checked as it is read (at the paper's size a
    check before the load would read another 2 GB per device); a damaged piece is named in
    the second item, and the arrays are then not the snapshot's (`like` is consumed all
    the same). Call after `check(verify=False)` returned "", on every process: the writes
    are programs over all devices, so a process that finds damage reads on to the end."""
    sources, why = _sources(folder, like, verify=False)
    if sources is None:
        raise ValueError(f"{folder}: {why}")
    out = {}
    for k, target in like.items():
        rps, row_bytes = rows_per_shard(target), RowSnapshot._row_bytes(target)
        old_rps, old_rows, saved = sources[k]
        if old_rps != rps:
            log.warning(
                "%s: %s saved with %d rows per device, read into %d", folder, k, old_rps, rps
            )
        c = min(rps, max(1, chunk_bytes // max(1, row_bytes)))
        sharding = target.sharding
        writer = _chunk_writer(sharding.mesh, PartitionSpec(sharding.spec[0]))
        local = [(s.device, (s.index[0].start or 0) // rps) for s in target.addressable_shards]
        chunk_shape = (c * len(sharding.mesh.devices.flat),) + target.shape[1:]
        for start in range(0, rps, c):
            start = min(start, rps - c)  # the last chunk ends at the block's end
            pieces = []
            for device, block in local:
                # Global rows [g, g + c) of the block; rows past the saved ones stay zero
                # (padding of a layout with more rows than the saved one).
                host = np.zeros((c,) + target.shape[1:], jnp.dtype(target.dtype))
                raw = host.reshape(-1).view(np.uint8)
                g = block * rps + start
                row = g
                while row < min(g + c, old_rows):
                    old = row // old_rps
                    n = min((old + 1) * old_rps, g + c, old_rows) - row
                    assert n > 0, (row, old, old_rps)  # each pass reads on: never a hang
                    source = saved[old]
                    with open(source.path, "rb") as f:
                        f.seek(source.offset + (row - old * old_rps) * row_bytes)
                        at = (row - g) * row_bytes
                        data = memoryview(raw[at : at + n * row_bytes])
                        f.readinto(data)
                    source.feed(row - old * old_rps, data)
                    row += n
                pieces.append(jax.device_put(host, device))
            chunk = jax.make_array_from_single_device_arrays(chunk_shape, sharding, pieces)
            target = writer(target, chunk, np.int32(start))
        out[k] = target
    for _, _, saved in sources.values():
        for block, source in sorted(saved.items()):
            bad = source.first_bad()
            if bad is not None:
                return out, f"{source.path.name} block {block} piece {bad}: CRC32 differs"
    return out, ""


def pieces_per_step(pieces: int, steps: int) -> int:
    """Pieces to read per step so that a snapshot of `pieces` is off the devices in `steps`."""
    return max(1, math.ceil(pieces / max(1, steps)))
