"""Rolling refresh on 8 devices: a cycle re-encodes every row exactly once, each row equals the
encoding by the parameters of the step that refreshed it, and staleness is what it says."""

import re

import jax
import numpy as np
import pytest

from jaxret.data.tokenization import load_tokenizer, tokenize_passages
from jaxret.eval.evaluate import load_eval_data
from jaxret.index.encode import empty_index, refresh_index
from jaxret.index.gather import device_table
from jaxret.index.mips import RowLayout, stored_values
from jaxret.index.rolling import (
    empty_staleness,
    rolling_refresher,
    slice_plan,
    slice_rows,
    staleness,
)
from jaxret.models import dual_encoder as de
from jaxret.parallel import make_mesh
from jaxret.parallel.compiled import program

N = 61  # not a multiple of 8 devices · anything: padding rows and a short last slice


@pytest.fixture(scope="module")
def setup(tiny_bert, data_dir):
    corpus = load_eval_data(data_dir / "adi").corpus
    spec = de.EncoderSpec(shared=True, pooling="cls", max_passage_length=24)
    encoder, params, tok_folder = de.from_pretrained(tiny_bert, spec)
    tokens = tokenize_passages(
        load_tokenizer(tok_folder), corpus.titles[:N], corpus.texts[:N], 24, "join"
    )["input_ids"]
    mesh = make_mesh()
    layout = RowLayout.for_mesh(N, mesh, 4)
    pad = np.pad(tokens, ((0, layout.padded_rows - N), (0, 0)))
    tables = {"input_ids": device_table(lambda s, e: pad[s:e], layout, mesh)}
    return encoder, params, mesh, layout, tables


def fresh(encoder, params, layout, mesh, tables, dtype="float32"):
    index = empty_index(layout, mesh, encoder.dim, dtype)
    return refresh_index(encoder, params, tables, index, 4).rows()


def perturbed(params, step):
    r = np.random.RandomState(step)
    return jax.tree.map(lambda x: x + 0.05 * r.randn(*np.shape(x)).astype(np.float32), params)


@pytest.mark.parametrize("refresh_every", [1, 3, 5])
def test_frozen_cycle_equals_fresh_encoding_and_encodes_each_row_once(setup, refresh_every):
    encoder, params, mesh, layout, tables = setup
    assert layout.rows_per_shard == 8 and layout.padded_rows == 64
    fn = rolling_refresher(encoder, mesh, layout, refresh_every, 2)
    emb = empty_index(layout, mesh, encoder.dim, "float32").embeddings  # zeros: never refreshed
    stale = empty_staleness(layout, mesh)
    encoded = 0.0
    for done in range(1, refresh_every + 1):
        emb, stale, stats = fn(params, tables, emb, stale, done)
        encoded += float(stats["encoded"])
    assert encoded == N  # the corpus, once: no padding row or row of another slice counted
    want = fresh(encoder, params, layout, mesh, tables)
    np.testing.assert_allclose(np.asarray(emb)[:N], want, atol=2e-5)
    s = slice_rows(layout, refresh_every, 2)
    expected = np.minimum(np.arange(8) // s + 1, refresh_every)  # the step of each block row
    np.testing.assert_array_equal(np.asarray(stale).reshape(8, 8), np.tile(expected, (8, 1)))


def test_changing_parameters_each_row_from_the_step_that_refreshed_it(setup):
    encoder, params, mesh, layout, tables = setup
    refresh_every = 3
    fn = rolling_refresher(encoder, mesh, layout, refresh_every, 1)  # 3 slices of 3 rows
    emb = empty_index(layout, mesh, encoder.dim, "float32").embeddings
    stale = empty_staleness(layout, mesh)
    by_step = {}
    for done in range(1, 6):  # more than a cycle: rows of steps 1 and 2 overwritten by 4 and 5
        by_step[done] = perturbed(params, done)
        emb, stale, stats = fn(by_step[done], tables, emb, stale, done)
        ages = done - np.asarray(stale)[:N]  # padded slices: the cycle's last may be empty
        assert float(stats["staleness_max"]) == ages.max() <= refresh_every - 1
        assert float(stats["staleness_mean"]) == pytest.approx(ages.mean())
    stale_host = np.asarray(stale)
    assert set(stale_host[:N]) == {3, 4, 5}
    rows = np.asarray(emb)
    for step in (3, 4, 5):
        mine = np.flatnonzero(stale_host[:N] == step)
        want = fresh(encoder, by_step[step], layout, mesh, tables)[mine]
        np.testing.assert_allclose(rows[mine], want, atol=2e-5)
    # The record agrees with its summary: ages 0, 1, 2 at step 5.
    ages = 5 - stale_host[:N]
    assert staleness(stale, layout, 5) == {
        "staleness_max": 2.0,
        "staleness_mean": pytest.approx(ages.mean()),
    }


def test_bf16_index(setup):
    """The rolling refresh of a bf16 index stores bf16 values (as their bits on CPU)."""
    encoder, params, mesh, layout, tables = setup
    fn = rolling_refresher(encoder, mesh, layout, 2, 4)
    emb = empty_index(layout, mesh, encoder.dim, "bfloat16").embeddings
    stale = empty_staleness(layout, mesh)
    for done in (1, 2):
        emb, stale, _ = fn(params, tables, emb, stale, done)
    assert emb.dtype == np.uint16  # on CPU: the bf16 values' bits (mips.BF16_BITS)
    got = np.asarray(stored_values(np.asarray(emb)), np.float32)[:N]
    want = fresh(encoder, params, layout, mesh, tables, "bfloat16")
    np.testing.assert_array_equal(got, np.asarray(want, np.float32))
    # The values, not their bits read as numbers (fails if the refresh writes the rows with
    # `astype(emb.dtype)`): the fp32 encoding rounded to bf16.
    exact = fresh(encoder, params, layout, mesh, tables, "float32")
    np.testing.assert_allclose(got, exact, rtol=1e-2, atol=1e-2)


def test_no_cross_device_traffic_beyond_the_encoder(setup):
    """The compiled refresh: no collective moves token or index rows (only the scalar
    statistics are reduced), and each device encodes its slice only."""
    encoder, params, mesh, layout, tables = setup
    fn = rolling_refresher(encoder, mesh, layout, 2, 4)
    emb = empty_index(layout, mesh, encoder.dim, "float32").embeddings
    stale = empty_staleness(layout, mesh)
    hlo = fn.lower(params, tables, emb, stale, 1).compile().as_text()
    for op in ("all-gather", "all-to-all", "collective-permute"):
        assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, op
    # all-reduces are scalars (the statistics): s32[] or (s32[], s32[])
    reduces = [x for x in hlo.splitlines() if " all-reduce(" in x or " all-reduce-start(" in x]
    assert reduces
    for line in reduces:
        shapes = re.findall(r"[a-z]+\d*\[[\d,]*\]", re.split(r" all-reduce(?:-start)?\(", line)[0])
        assert shapes and all(x.endswith("[]") for x in shapes), line


# ART's NQ run: 21,015,324 passages on 16 devices in 32768-row chunks, refresh every 500 steps.
PAPER = RowLayout(21_015_324, 16, 1_343_488, 32768)


def test_slice_plan_at_the_papers_size_is_full_batches():
    """The paper's slice is 2687 rows per device (a prime). Before issue 19 the encoder chunk
    was the largest divisor of the slice ≤ device_batch: 1 row, 2687 calls per step. Fails
    if the chunk goes back to dividing the unpadded slice."""
    need = -(-PAPER.rows_per_shard // 500)
    assert need == 2687
    s, chunk = slice_plan(PAPER, 500, 256)
    assert s % chunk == 0 and s // chunk == 11  # ⌈2687 / 256⌉ calls, each of ~245 rows
    assert need <= s < need + s // chunk  # padding below one row per call
    assert slice_plan(PAPER, 500, 4096) == (2687, 2687)  # one call when the batch allows


def test_compiled_refresh_at_paper_rows_per_device(tiny_bert):
    """The rolling refresh compiled for 1.34M rows per device (abstract shapes, 8 devices):
    its encoder loop runs ⌈2687 / 256⌉ = 11 times and each device's matmul FLOPs are those
    of s ≈ 2687 rows, not of its block. Fails with a one-row chunk (trip count 2687)."""
    spec = de.EncoderSpec(shared=True, pooling="cls", max_passage_length=16)
    encoder, params, _ = de.from_pretrained(tiny_bert, spec)
    mesh = make_mesh()
    layout = RowLayout(PAPER.rows_per_shard * 8, 8, PAPER.rows_per_shard, 32768)
    s, chunk = slice_plan(layout, 500, 256)
    fn = rolling_refresher(encoder, mesh, layout, 500, 256)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "model")))
    table = jax.ShapeDtypeStruct((layout.padded_rows, 16), np.uint16, sharding=rows)
    emb = jax.ShapeDtypeStruct((layout.padded_rows, encoder.dim), np.float32, sharding=rows)
    stale = jax.ShapeDtypeStruct((layout.padded_rows,), np.int32, sharding=rows)
    compiled = fn.lower(params, {"input_ids": table}, emb, stale, 1).compile()
    hlo = compiled.as_text()
    assert '"known_trip_count":{"n":"11"}' in hlo and s // chunk == 11  # ⌈2687 / 256⌉
    # Per-device FLOPs of the refresh = s rows through the encoder (one jitted batch of
    # `chunk` rows on one device is the reference).
    one = jax.jit(lambda p, t: encoder.embed(p, "passage", t))
    batch = {
        k: jax.ShapeDtypeStruct((chunk, 16), np.int32)
        for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    per_chunk = program(one.lower(params, batch).compile()).dot_flops()
    assert program(compiled).dot_flops() == pytest.approx(per_chunk * (s // chunk), rel=1e-6)


def test_staleness_mean_does_not_overflow(setup):
    """Ages summed over many rows exceed int32 (21M rows × 500 steps ≈ 1e10): the mean at
    step 2**28 of rows all from step 0 is 2**28. Fails with an int32 sum."""
    _, _, mesh, layout, _ = setup
    stale = empty_staleness(layout, mesh)
    assert staleness(stale, layout, 2**28) == {
        "staleness_max": float(2**28),
        "staleness_mean": float(2**28),
    }


def test_at_most_two_slices_are_in_flight(setup, monkeypatch):
    """A whole-corpus encoding in slices (`refresh_in_slices`, 8 slices here) waits for slice
    k − 1 after dispatching slice k: never more than two in flight, so `check()` between
    slices runs while work remains, and a CPU with several devices cannot fill XLA's
    in-flight queue, where the slices' all-reduce deadlocked (2M rows on 2 devices,
    docs/scaling.md). The index equals one encoded without slices. Mutation: no wait in
    the loop → slice 1 is still unwaited when slice 3 is dispatched, fails."""
    from jaxret.index import rolling

    encoder, params, mesh, layout, tables = setup
    events: list[tuple[str, int]] = []
    real = rolling.rolling_refresher

    def counting(*args):
        fn = real(*args)

        def dispatch(p, t, emb, stale, done):
            events.append(("dispatch", int(done)))
            emb, stale, stats = fn(p, t, emb, stale, done)
            return emb, stale, {**stats, "_slice": int(done)}

        return dispatch

    real_wait = jax.block_until_ready

    def wait(x):
        if isinstance(x, dict) and "_slice" in x:
            events.append(("wait", x["_slice"]))
            x = {k: v for k, v in x.items() if k != "_slice"}
        return real_wait(x)

    monkeypatch.setattr(rolling, "rolling_refresher", counting)
    monkeypatch.setattr(jax, "block_until_ready", wait)
    checks = []
    index = rolling.refresh_in_slices(
        encoder,
        params,
        tables,
        empty_index(layout, mesh, encoder.dim, "float32"),
        1,
        check=lambda: checks.append(len(events)),
        calls_per_slice=1,
    )
    dispatched = [k for e, k in events if e == "dispatch"]
    assert dispatched == list(range(1, 9))
    for k in range(3, 9):  # before slice k is dispatched, slice k − 2 has been waited for
        before = events[: events.index(("dispatch", k))]
        assert ("wait", k - 2) in before, (k, events)
    assert len(checks) == 7
    np.testing.assert_allclose(
        index.rows(), fresh(encoder, params, layout, mesh, tables), rtol=1e-5, atol=1e-6
    )


_IN_FLIGHT_SCRIPT = """
import sys
import jax, numpy as np
from jax.sharding import Mesh
from jaxret.index.encode import empty_index
from jaxret.index.mips import RowLayout, row_sharding
from jaxret.index.rolling import refresh_in_slices
from jaxret.models import dual_encoder as de
mesh = Mesh(np.array(jax.devices()), ("data",))
encoder, params, _ = de.from_pretrained(sys.argv[1], de.EncoderSpec(max_passage_length=16))
layout = RowLayout.for_mesh(20000, mesh, 32768)
ids = np.random.default_rng(0).integers(1, 1000, (layout.padded_rows, 16)).astype(np.int32)
tables = {"input_ids": jax.device_put(ids, row_sharding(mesh))}
index = empty_index(layout, mesh, encoder.dim, "float32")
index = refresh_in_slices(encoder, params, tables, index, 8, calls_per_slice=1)
index.embeddings.block_until_ready()
print("encoded", flush=True)
"""


def test_slices_on_two_cpu_devices_in_one_process_do_not_deadlock(tiny_bert):
    """1,250 small slices on 2 CPU devices in one process (a laptop's default layout), in a
    subprocess with XLA's collective timeout cut to 10 s (~10 s when it passes). Dispatched
    back to back (the code before the two-in-flight bound) the slices' all-reduce hung and
    XLA aborted the process: 3 of 3 runs of this test on the 2-core VM, 6 of 7 of the same
    loop outside it; on 8 devices 0 of 3, which is why the tests, all on 8 devices, never
    saw it. Mutation: no wait in `refresh_in_slices` → aborts (nearly every run), fails."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=5 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=10",
    }
    done = subprocess.run(
        [sys.executable, "-c", _IN_FLIGHT_SCRIPT, str(tiny_bert)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "encoded" in done.stdout, done.stderr[-2000:]
