"""Checkpoint saves that do not hold the training thread: what waits for the write (the
checksums, the `best` link) runs in the background and is joined by the next save or `wait`."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxret.models.dual_encoder import read_best_params
from jaxret.train import checkpoint
from jaxret.train.checkpoint import Manager


def _in_a_thread(fn, timeout=60.0):
    """Runs fn(); → whether it returned within `timeout` seconds."""
    done = threading.Event()
    threading.Thread(target=lambda: (fn(), done.set()), daemon=True).start()
    return done.wait(timeout)


def test_save_returns_before_the_step_is_sealed(tmp_path, monkeypatch):
    """`save` returns while the checksums of its files are still being computed (at the
    paper's size a rolling index share is GBs of CRC32); the next save or `wait` seals it.
    Fails if `save` seals on the training thread (it then blocks on the held checksum)."""
    release = threading.Event()
    real = checkpoint.file_checksums

    def held(*a, **k):
        assert release.wait(120)
        return real(*a, **k)

    monkeypatch.setattr(checkpoint, "file_checksums", held)
    mgr = Manager(tmp_path / "ckpt", keep=2)
    state = {"w": jnp.arange(8.0)}
    assert _in_a_thread(lambda: mgr.save(1, state, None, {}), timeout=60)
    assert not mgr.sealed(1)
    release.set()
    mgr.wait()
    assert mgr.sealed(1)
    restored, aux, meta = mgr.restore(1, state, None)
    np.testing.assert_array_equal(restored["w"], np.arange(8.0))
    assert aux is None and meta["step"] == 1


def test_rows_are_kept_beside_the_newest_complete_step_only(tmp_path, caplog):
    """Row state (ART's rolling index) saved with steps 1 and 2, each over 2 steps
    (`rows_save_steps=2`: 3 of its 5 pieces per step): `rows-1/` stays while `rows-2/` is
    being written (nothing good is removed before its replacement is complete), and goes
    once it is; step 2's rows restore bit for bit, step 1's are gone (None, said). Fails if
    older rows are dropped before the newer are complete (tried: `drop_older_rows` without
    the `complete` check)."""
    from jaxret.train import row_snapshot
    from jaxret.train.row_snapshot import Rows

    mesh = jax.make_mesh((8,), ("rows",))
    rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    emb = np.arange(80 * 4, dtype=np.float32).reshape(80, 4)
    arrays = {"embeddings": jax.device_put(emb, rows_sharding)}
    mgr = Manager(tmp_path / "ckpt", keep=3, rows_save_steps=2)
    state = {"w": jnp.arange(8.0)}
    ckpts = tmp_path / "ckpt"
    mgr.save(1, state, None, {}, Rows(arrays, 3, 5, 0))
    mgr.before_step(Rows(arrays, 3, 5, 1))
    mgr.before_step(Rows(arrays, 3, 5, 2))  # every piece read
    mgr._rows.writer.join()  # the background write ends
    mgr.before_step(Rows(arrays, 3, 5, 3))  # finds it done
    assert mgr._rows is None
    assert row_snapshot.complete(ckpts / "rows-1")
    mgr.save(2, state, None, {}, Rows(arrays, 3, 5, 1))
    mgr.before_step(Rows(arrays, 3, 5, 2))  # 3 of 5 pieces of rows-2 read
    assert not row_snapshot.complete(ckpts / "rows-2")
    mgr.seal()  # step 2's Orbax save is committed: only its rows are still being written
    assert mgr.drop_older_rows() == []
    assert sorted(row_snapshot.snapshot_steps(ckpts)) == [1, 2]
    mgr.before_step(Rows(arrays, 3, 5, 3))
    mgr.wait()
    assert sorted(row_snapshot.snapshot_steps(ckpts)) == [2]
    back = mgr.restore_rows(2, Rows(arrays, 3, 5, 0))
    np.testing.assert_array_equal(np.asarray(back["embeddings"]), emb)
    assert mgr.restore_rows(1, Rows(arrays, 3, 5, 0)) is None
    assert "checkpoint 1: its row state is not used (none)" in caplog.text


def test_save_best_links_when_the_write_is_complete(tmp_path, monkeypatch):
    """`save_best` returns once the parameters are off the devices; `best` keeps pointing at
    the previous complete folder until the new one is written, then is swapped. Fails if
    save_best waits for the write on the training thread (blocks on the held write) or
    links before the write is complete."""
    mgr = Manager(tmp_path / "run" / "checkpoints", keep=2)
    mgr.save_best({"w": jnp.zeros(4)}, {"step": 1, "value": 0.1, "metric": "m"})
    mgr.wait()
    best = tmp_path / "run" / "best"
    assert best.resolve().name == "best-1"

    release = threading.Event()
    real = ocp.StandardCheckpointer.wait_until_finished

    def held(self):  # (save also waits for a previous save: only the linking thread is held)
        if threading.current_thread().name == "best":
            assert release.wait(120)
        return real(self)

    monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", held)
    params = {"w": jnp.ones(4)}
    assert _in_a_thread(
        lambda: mgr.save_best(params, {"step": 2, "value": 0.2, "metric": "m"}), timeout=60
    )
    assert best.resolve().name == "best-1"  # the complete previous one, until the write ends
    release.set()
    mgr.wait()
    assert best.resolve().name == "best-2" and not (tmp_path / "run" / "best-1").exists()
    got = read_best_params(best, {"w": np.zeros(4, np.float32)})
    np.testing.assert_array_equal(got["w"], np.ones(4))


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path, monkeypatch):
    """An error of the background sealing is not lost: the next `wait` raises it. Fails if
    the background thread swallows it."""
    mgr = Manager(tmp_path / "ckpt", keep=2)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "file_checksums", broken)
    mgr.save(1, {"w": jnp.zeros(2)}, None, {})
    with pytest.raises(OSError, match="disk full"):
        mgr.wait()


def test_a_killed_best_write_is_cleared_when_the_run_restarts(tmp_path):
    """A SIGKILL during `save_best` leaves `best-<step>/` half-written (never linked) and
    maybe a `.best-<hex>` link; the next Manager removes them and keeps what `best` points
    at. Fails without the `clear_unlinked_best` call in Manager.__init__."""
    import os

    root = tmp_path / "run"
    (root / "best-2" / "params").mkdir(parents=True)
    (root / "best-2" / "best.json").write_text("{}")
    os.symlink("best-2", root / "best")
    (root / "best-1" / "params").mkdir(parents=True)  # a previous one not yet removed
    (root / "best-3" / "params").mkdir(parents=True)  # the killed write
    os.symlink("best-3", root / ".best-0a1b2c")  # its link, never renamed into place
    Manager(root / "checkpoints")
    assert sorted(p.name for p in root.iterdir()) == ["best", "best-2", "checkpoints"]
    assert (root / "best").resolve() == (root / "best-2").resolve()
    assert (root / "best" / "best.json").is_file()


def test_a_row_snapshot_never_removes_another_process_files(tmp_path):
    """Every process starts the same step's row snapshot in one shared folder, at its own
    pace: a process that finds the folder already there (another process's files in it)
    writes its own files beside them and removes nothing. On the first 2-process rehearsal
    the process that came second removed the folder, and the resume failed on the missing
    `embeddings.process_1.bin`. Fails if `_start_rows` clears an existing folder (tried)."""
    from jaxret.train.row_snapshot import Rows

    mesh = jax.make_mesh((8,), ("rows",))
    rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    arrays = {"embeddings": jax.device_put(np.ones((80, 4), np.float32), rows_sharding)}
    folder = tmp_path / "ckpt" / "rows-1"
    folder.mkdir(parents=True)
    (folder / "embeddings.process_1.bin").write_bytes(b"process 1's rows")
    mgr = Manager(tmp_path / "ckpt", keep=2)
    mgr.save(1, {"w": jnp.arange(2.0)}, None, {}, Rows(arrays, 5, 2, 0), rows_at_once=True)
    mgr.wait()
    assert (folder / "embeddings.process_1.bin").read_bytes() == b"process 1's rows"
    assert (folder / "manifest.process_0.json").is_file()


def test_background_work_runs_at_a_lower_cpu_priority():
    """The checkpoint's background work (the seal's checksums of every file, the best
    link) runs at nice `BACKGROUND_NICE` on its own thread; the caller's priority is
    unchanged. Fails if `_Background` does not call `yield_to_training` (tried)."""
    import os

    from jaxret.train import row_snapshot

    tid = lambda: threading.get_native_id()
    mine = os.getpriority(os.PRIO_PROCESS, tid())
    seen = []
    checkpoint._Background(
        "seal", lambda: seen.append(os.getpriority(os.PRIO_PROCESS, tid()))
    ).join()
    assert seen == [max(mine, row_snapshot.BACKGROUND_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, tid()) == mine
