"""Row snapshots (train/row_snapshot.py): the rows of step S, saved while later steps
overwrite them in place, piece by piece."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxret.train import row_snapshot
from jaxret.train.row_snapshot import Rows, RowSnapshot

RPS, Q, PIECES, D = 10, 3, 5, 4  # rows per device, piece rows, pieces (piece 4 empty), width


def _mesh(devices: int = 8):
    return jax.make_mesh((devices,), ("rows",), devices=jax.devices()[:devices])


def _arrays(mesh):
    n = RPS * mesh.size
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    emb = jax.device_put(np.arange(n * D, dtype=np.float32).reshape(n, D), rows)
    stale = jax.device_put(np.zeros(n, np.int32), rows)
    return {"embeddings": emb, "stale": stale}


def _updater(mesh):
    """A rolling-refresh-like in-place write: piece p of every block gets `value`."""
    spec = PartitionSpec("rows")

    def put(arrays, p, value):
        local = p * Q + jnp.arange(Q)
        write = jnp.where(local < RPS, local, RPS)
        return {
            "embeddings": arrays["embeddings"].at[write].set(value, mode="drop"),
            "stale": arrays["stale"].at[write].set(value.astype(jnp.int32), mode="drop"),
        }

    body = jax.shard_map(
        put, mesh=mesh, in_specs=(spec, PartitionSpec(), PartitionSpec()), out_specs=spec
    )
    return jax.jit(body, donate_argnums=0)


def _host(arrays):
    return {k: np.array(jax.device_get(v)) for k, v in arrays.items()}


class _CountingFile:
    """A file whose reads add their byte count to `n`."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def seek(self, *a):
        return self.f.seek(*a)

    def read(self, *a):
        out = self.f.read(*a)
        self.n.append(len(out))
        return out

    def readinto(self, buf):
        got = self.f.readinto(buf)
        self.n.append(got)
        return got


def _flip(folder, name, block, row):
    """Flips a bit of `block`'s row `row` in `name`'s file (wherever the block is in it)."""
    pos = json.loads((folder / "manifest.process_0.json").read_text())["blocks"].index(block)
    path = folder / f"{name}.process_0.bin"
    raw = bytearray(path.read_bytes())
    raw[(pos * RPS + row) * D * 4 + 1] ^= 0x40
    path.write_bytes(bytes(raw))


def test_a_restore_reads_each_byte_once_and_checks_it_as_read(tmp_path, monkeypatch):
    """`check(verify=False)` then `load` read every saved byte exactly once (at the paper's
    size a separate check first would read another 2 GB per device), and `load` names a
    flipped bit: block 5, piece 1 (rows 3–5). Fails if the CRC32s are checked before the
    load (tried: `load` calling `_sources(folder, like)`: every byte read twice), or if
    `feed` does not compare a piece's CRC32 at its end (tried: the damage not reported)."""
    mesh = _mesh()
    arrays = _arrays(mesh)
    snap = RowSnapshot(tmp_path / "rows-1", Rows(arrays, Q, PIECES, 0), PIECES)
    snap.before_step(arrays)
    snap.join()
    folder = tmp_path / "rows-1"
    assert row_snapshot.check(folder, _arrays(mesh), verify=False) == ""
    read = []
    monkeypatch.setattr(
        row_snapshot, "open", lambda *a: _CountingFile(open(*a), read), raising=False
    )
    back, why = row_snapshot.load(folder, _arrays(mesh))
    assert why == ""
    assert sum(read) == sum(f.stat().st_size for f in folder.glob("*.bin"))
    for k, v in _host(arrays).items():
        np.testing.assert_array_equal(np.asarray(back[k]), v)
    monkeypatch.undo()
    _flip(folder, "embeddings", 5, 4)
    assert row_snapshot.check(folder, _arrays(mesh), verify=False) == ""  # not read
    _, why = row_snapshot.load(folder, _arrays(mesh))
    assert why == "embeddings.process_0.bin block 5 piece 1: CRC32 differs"


@pytest.mark.parametrize("per_step", [1, 2])
def test_snapshot_holds_the_rows_of_its_step_while_steps_overwrite_them(tmp_path, per_step):
    """A snapshot taken with the next piece = 3 (the ring 3, 4, 0, 1, 2; piece 3 is one row,
    piece 4 empty), then 5 steps that each overwrite the next piece of every block in place
    (`before_step` first): read back, it equals a host copy taken at the snapshot's step,
    although every row changed since; with 1 piece per step it is read over the 5 steps.
    Fails if a piece is read after the step that overwrites it (tried: the ring starting one
    piece late), or if rows a clamped read took from an earlier piece are written (tried:
    without `skip`)."""
    mesh = _mesh()
    update = _updater(mesh)
    arrays = _arrays(mesh)
    arrays = update(arrays, np.int32(0), np.float32(-1.0))  # some history before the save
    at_save = _host(arrays)
    snap = RowSnapshot(tmp_path / "rows-7", Rows(arrays, Q, PIECES, 3), per_step)
    dispatched = []
    for j in range(PIECES):
        snap.before_step(arrays)
        dispatched.append(snap.dispatched)
        arrays = update(arrays, np.int32((3 + j) % PIECES), np.float32(-100 - j))
    snap.join()
    if per_step == 1:
        assert dispatched == [1, 2, 3, 4, 5]
    now = _host(arrays)
    assert (now["embeddings"] != at_save["embeddings"]).all()  # every row rewritten since
    assert row_snapshot.check(tmp_path / "rows-7", _arrays(mesh)) == ""
    back, why = row_snapshot.load(tmp_path / "rows-7", _arrays(mesh))
    assert why == ""
    for k in at_save:
        np.testing.assert_array_equal(np.asarray(back[k]), at_save[k])
        assert back[k].sharding.is_equivalent_to(arrays[k].sharding, arrays[k].ndim)


def test_the_step_after_a_snapshot_updates_the_index_in_place(tmp_path):
    """The pieces are read into their own buffers, so the next in-place update finds the
    index unreferenced and reuses its memory (the same buffer address). Fails if the save
    takes a whole view of the index (tried: an `np.asarray` of every block held by the
    snapshot: the update then copies the index first, the 2.1 × step of docs/scaling.md)."""
    mesh = _mesh()
    update = _updater(mesh)
    arrays = update(_arrays(mesh), np.int32(0), np.float32(1.0))
    address = [s.data.unsafe_buffer_pointer() for s in arrays["embeddings"].addressable_shards]
    snap = RowSnapshot(tmp_path / "rows-1", Rows(arrays, Q, PIECES, 1), 1)
    snap.before_step(arrays)
    arrays = update(arrays, np.int32(1), np.float32(2.0))
    after = [s.data.unsafe_buffer_pointer() for s in arrays["embeddings"].addressable_shards]
    assert after == address
    snap.finish(arrays)
    snap.join()


def _saved(tmp_path, mesh):
    arrays = _arrays(mesh)
    snap = RowSnapshot(tmp_path / "rows-2", Rows(arrays, Q, PIECES, 0), PIECES)
    snap.finish(arrays)
    snap.join()
    return tmp_path / "rows-2"


def _zeros(devices: int, rows: int, width: int = D) -> dict:
    """Empty arrays like `_arrays`' in another layout: `rows` rows over `devices` devices."""
    sharding = NamedSharding(_mesh(devices), PartitionSpec("rows"))
    return {
        "embeddings": jax.device_put(jnp.zeros((rows, width), jnp.float32), sharding),
        "stale": jax.device_put(jnp.zeros(rows, jnp.int32), sharding),
    }


def _blocks_in_file_order(folder, order):
    """Rewrites a one-process snapshot as if its file held the blocks in `order` (as a
    process of several holds blocks whose neighbours live in other files)."""
    path = folder / "manifest.process_0.json"
    m = json.loads(path.read_text())
    for k, a in m["arrays"].items():
        data = folder / f"{k}.process_0.bin"
        raw = data.read_bytes()
        size = len(raw) // len(m["blocks"])
        data.write_bytes(b"".join(raw[b * size : (b + 1) * size] for b in order))
        a["crc32"] = [a["crc32"][b] for b in order]
    m["blocks"] = [m["blocks"][b] for b in order]
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("devices,rows", [(4, 80), (3, 81), (6, 72), (1, 80)])
def test_a_snapshot_is_read_into_another_layout(tmp_path, devices, rows):
    """Saved over 8 devices × 10 rows (the file's blocks in the order 1, 0, 3, 2, …), read
    into `devices` devices × rows/devices (a resume on another device count: the padding
    differs, 81 rows pad one more, 72 rows have 8 fewer padding rows): every row of the new
    layout that the saved one has equals the saved row, the rest are zero. Fails if a row is
    read from the block of the old layout's position in the new one (tried: `old = row //
    rps`, the new rows per device) or if a chunk that spans two saved blocks reads on in the
    first block's file (tried: n without the block's end). A flipped bit in a saved block
    this layout reads out of the saved order (3 devices: the block is split) is named too;
    fails if the pieces not fed in order are not read back from the file (tried:
    `first_bad` returning only the fed pieces' result)."""
    folder = _saved(tmp_path, _mesh())
    _blocks_in_file_order(folder, [1, 0, 3, 2, 5, 4, 7, 6])
    saved = _host(_arrays(_mesh()))
    like = _zeros(devices, rows)
    assert row_snapshot.check(folder, like) == ""
    loaded, why = row_snapshot.load(folder, like, chunk_bytes=7 * D * 4)  # chunks of 7 rows
    assert why == ""
    back = _host(loaded)
    n = min(rows, 80)
    for k in saved:
        np.testing.assert_array_equal(back[k][:n], saved[k][:n])
        assert not back[k][n:].any()
    _flip(folder, "embeddings", 2, 8)  # global row 28: piece 2 of saved block 2
    _, why = row_snapshot.load(folder, _zeros(devices, rows), chunk_bytes=7 * D * 4)
    assert why == "embeddings.process_0.bin block 2 piece 2: CRC32 differs"


def test_a_snapshot_is_not_used_when_incomplete_damaged_or_of_another_width(tmp_path):
    """None with the reason: no manifest (a kill before the end), a flipped byte (CRC32 of
    its piece), another row width, another dtype. Fails if `read` skips the CRC check or
    the width check (tried: no CRC comparison)."""
    folder = _saved(tmp_path, _mesh())
    assert row_snapshot.check(folder, _arrays(_mesh())) == ""
    assert "embeddings" in row_snapshot.check(folder, _zeros(8, 80, width=D + 1))
    other = dict(_arrays(_mesh()), stale=_arrays(_mesh())["stale"].astype(jnp.float32))
    assert "stale" in row_snapshot.check(folder, other)
    # a flipped byte in block 5, piece 1 (rows 3–5)
    data = folder / "embeddings.process_0.bin"
    raw = bytearray(data.read_bytes())
    raw[(5 * RPS + 4) * D * 4 + 1] ^= 0x40
    data.write_bytes(bytes(raw))
    assert row_snapshot.check(folder, _arrays(_mesh())).endswith("block 5 piece 1: CRC32 differs")
    (folder / "manifest.process_0.json").unlink()
    assert row_snapshot.check(folder, _arrays(_mesh())) == "incomplete (a save cut short)"


def test_manifest_names_the_processes_and_blocks(tmp_path):
    """The manifest is written last and lists this process's blocks (all 8 here); a folder
    with a manifest naming 2 processes but holding one is incomplete. Fails if `complete`
    accepts any one manifest."""
    folder = _saved(tmp_path, _mesh())
    manifest = json.loads((folder / "manifest.process_0.json").read_text())
    assert manifest["blocks"] == list(range(8)) and manifest["processes"] == 1
    assert row_snapshot.complete(folder)
    manifest["processes"] = 2
    (folder / "manifest.process_0.json").write_text(json.dumps(manifest))
    assert not row_snapshot.complete(folder)


def test_an_abandoned_snapshot_never_gets_a_manifest(tmp_path):
    """A run that stops on an error mid-snapshot abandons it (`Manager.wait`): the writer
    stops without a manifest, so the folder is never read. Fails if the writer finishes
    the files and writes its manifest after the stop (tried: no stop check)."""
    mesh = _mesh()
    arrays = _arrays(mesh)
    snap = RowSnapshot(tmp_path / "rows-3", Rows(arrays, Q, PIECES, 0), 1)
    snap.before_step(arrays)  # 1 of 5 pieces read
    snap.abandon()
    assert not snap.writer.is_alive()
    assert not row_snapshot.complete(tmp_path / "rows-3")
    assert not list((tmp_path / "rows-3").glob("manifest*"))


def test_a_failed_write_is_raised_on_the_training_thread(tmp_path, monkeypatch):
    """A write that fails (a full disk) is raised on the training thread (`before_step`,
    `finish`, `join`): never a silent incomplete snapshot, never a training thread blocked
    on a queue nobody reads (a queue of 8, 10 pieces queued by one `finish`). Fails if
    `_put` waits without checking the writer (tried: plain `queue.put`: the thread hangs,
    the assert after 30 s fails)."""
    import errno
    import threading

    mesh = _mesh()
    arrays = _arrays(mesh)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(row_snapshot.os, "pwrite", full)
    snap = RowSnapshot(tmp_path / "rows-4", Rows(arrays, 1, 10, 0), 1)
    raised = []

    def steps():
        try:
            snap.finish(arrays)  # 10 pieces queued in one call
            snap.join()
        except OSError as e:
            raised.append(e)

    worker = threading.Thread(target=steps, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive() and raised and raised[0].errno == errno.ENOSPC
    assert not row_snapshot.complete(tmp_path / "rows-4")


def test_load_writes_into_the_donor_in_chunks(tmp_path):
    """`load` fills the template's own buffers (the run's empty donor index: the same
    addresses, no second index in memory) in chunks of 3 rows per device (the last one
    clamped to end at the block's end, rows 7–9), and the rows are the saved ones. Fails
    if the last chunk is read from its unclamped start (tried: rows 9–11 are read and
    written at 7–9)."""
    mesh = _mesh()
    saved = _arrays(mesh)
    expect = _host(saved)
    folder = tmp_path / "rows-5"
    snap = RowSnapshot(folder, Rows(saved, Q, PIECES, 0), PIECES)
    snap.finish(saved)
    snap.join()
    donor = {k: jnp.zeros_like(v) for k, v in _arrays(mesh).items()}
    address = [s.data.unsafe_buffer_pointer() for s in donor["embeddings"].addressable_shards]
    back, why = row_snapshot.load(folder, donor, chunk_bytes=3 * D * 4)
    assert why == ""
    after = [s.data.unsafe_buffer_pointer() for s in back["embeddings"].addressable_shards]
    assert after == address
    for k in expect:
        np.testing.assert_array_equal(np.asarray(back[k]), expect[k])


def test_the_writer_thread_runs_at_a_lower_cpu_priority(tmp_path, monkeypatch):
    """The writer copies, checksums and writes pieces at nice `BACKGROUND_NICE` (its own
    thread's value, read from inside `_write`) while the calling thread keeps its priority:
    on a CPU host the step's threads get the cores first. Fails if the writer does not
    lower its priority (tried: the `yield_to_training()` call removed), or if it lowers the
    whole process's."""
    import os
    import threading

    seen = []
    real = RowSnapshot._write

    def write(self, *a):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(self, *a)

    monkeypatch.setattr(RowSnapshot, "_write", write)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    arrays = _arrays(_mesh())
    snap = RowSnapshot(tmp_path / "rows-5", Rows(arrays, Q, PIECES, 0), PIECES)
    snap.finish(arrays)
    snap.join()
    assert row_snapshot.complete(tmp_path / "rows-5")
    assert seen == [max(mine, row_snapshot.BACKGROUND_NICE)] * (PIECES - 1)  # piece 4 empty
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
