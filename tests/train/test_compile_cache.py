"""train.compile_cache: JAX's persistent compilation cache for one run, entries cut short by a
kill removed. The restart in a new process (bit-identical losses with the programs read back)
is tests/train/test_loop.py::test_sigterm_saves_a_checkpoint_from_which_resume_is_exact."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret.train import compile_cache


@pytest.fixture
def cache_everything():
    """Every program written (JAX writes only those that took ≥ 1 s to compile)."""
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def program():
    """A new jit object each call: its in-memory caches are empty, so JAX asks the disk."""
    return jax.jit(lambda x: jnp.tanh(x) @ x.T + 3.0)


X = jnp.asarray(np.linspace(-1, 1, 48, dtype=np.float32).reshape(6, 8))


def test_a_second_run_reads_the_first_runs_programs(tmp_path, cache_everything):
    """The first block compiles and writes the program into <workdir>/cc; the second reads it
    back (the same values); outside the blocks the process's setting is as before. Fails if
    `using` keeps the cache JAX opened before it (tried: no `reset_cache()` on entry → the
    program is written into the process's own folder, none in <workdir>/cc), or does not
    put the setting back."""
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    before = jax.config.jax_compilation_cache_dir
    jax_cache.set_cache_dir(str(tmp_path / "user"))  # the process's own (JAX opens it once)
    jax_cache.reset_cache()
    program()(X)
    try:
        with compile_cache.using("cc", tmp_path / "a") as first:
            want = np.asarray(program()(X))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "user")
    finally:
        jax_cache.set_cache_dir(before)
        jax_cache.reset_cache()
    assert first.written >= 1 and first.read == 0
    assert list((tmp_path / "a" / "cc").glob("*-cache"))
    with compile_cache.using(str(tmp_path / "a" / "cc"), tmp_path / "elsewhere") as second:
        got = np.asarray(program()(X))  # an absolute path: the same folder
    assert second.read >= 1 and second.written == 0
    np.testing.assert_array_equal(got, want)
    with compile_cache.using("cc", tmp_path / "b") as other:  # another folder: nothing read
        program()(X)
    assert other.read == 0 and other.written >= 1
    with compile_cache.using("", tmp_path / "c") as off:
        program()(X)
    assert off.folder is None and off.looked_up == 0
    assert not (tmp_path / "c").exists()


def test_an_entry_cut_short_by_a_kill_is_removed_and_written_again(tmp_path, cache_everything):
    """An entry cut in half (a kill while JAX wrote it) is removed when the next run opens
    the cache, so that run compiles without JAX's read error and writes the program whole;
    the run after reads it. Without the removal JAX warns and compiles at every start and
    never writes the entry again. Fails if `remove_unreadable` keeps entries (tried: the
    warning "Error reading persistent compilation cache entry" is raised, removed == 0)."""
    with compile_cache.using("cc", tmp_path):
        want = np.asarray(program()(X))
    entries = sorted((tmp_path / "cc").glob("*-cache"))
    whole = {e: e.read_bytes() for e in entries}
    for e in entries:
        e.write_bytes(whole[e][: len(whole[e]) // 2])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with compile_cache.using("cc", tmp_path) as second:
            got = np.asarray(program()(X))
    assert not [w for w in seen if "persistent compilation cache" in str(w.message)]
    assert second.removed == len(entries) and second.read == 0 and second.written >= 1
    np.testing.assert_array_equal(got, want)
    with compile_cache.using("cc", tmp_path) as third:
        program()(X)
    assert third.read >= 1 and third.removed == 0


def test_unreadable_entries_only_are_removed(tmp_path):
    """A folder with a whole zlib/zstd entry of JAX's, a cut one, and files that are not
    entries: only the cut entry goes. Fails if every "-cache" file is removed or other files
    are touched."""
    from jax._src.compilation_cache import compress_executable

    whole = compress_executable(b"x" * 5000)
    (tmp_path / "a-cache").write_bytes(whole)
    (tmp_path / "b-cache").write_bytes(whole[:7])
    (tmp_path / "c-atime").write_bytes(b"\0" * 8)
    assert compile_cache.remove_unreadable(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-cache", "c-atime"]
    assert compile_cache.remove_unreadable(tmp_path / "absent") == 0


def test_a_folder_that_cannot_be_used_is_named(tmp_path):
    """A cache path under a file (or without write permission) is one line naming the key
    and the folder, before anything runs. Fails with a raw OSError if `using` just
    creates the folder (tried)."""
    from jaxret.configlib import ConfigError

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"train.compile_cache='file/cc': .*file/cc"):
        with compile_cache.using("file/cc", tmp_path):
            pass
