import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxret.index.mips import stored_values
from jaxret.index.sharded import IndexMismatchError, ShardedIndex
from jaxret.parallel import make_mesh


def brute_force(emb, q, k):
    """Exact reference: float64 scores (no BLAS rounding, so equal rows tie exactly), sorted
    descending, ties to the lower row id."""
    s = np.asarray(q, np.float64) @ np.asarray(emb, np.float64).T
    rows = np.broadcast_to(np.arange(emb.shape[0]), s.shape)
    order = np.lexsort((rows, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def assert_same_top_k(ids, scores, emb, q, k, atol=1e-4):
    """Tie-tolerant: the returned rows are k distinct rows whose exact scores are the returned
    scores and are the k best up to `atol` (rows closer than float32 accumulation noise may
    swap); where the exact gap is clear, the ids are exactly the reference's."""
    ids, scores = np.asarray(ids), np.asarray(scores, np.float64)
    ref_s, ref_i = brute_force(emb, q, k)
    exact = np.asarray(q, np.float64) @ np.asarray(emb, np.float64).T
    np.testing.assert_allclose(np.take_along_axis(exact, ids, 1), scores, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=atol)
    for row in ids:
        assert len(set(row.tolist())) == k
    gap_before = np.diff(ref_s, axis=1, prepend=np.inf)
    gap_after = -np.diff(ref_s, axis=1, append=-np.inf)
    clear = (np.abs(gap_before) > atol) & (np.abs(gap_after) > atol)
    np.testing.assert_array_equal(ids[clear], ref_i[clear])


@pytest.fixture(scope="module")
def data():
    r = np.random.RandomState(0)
    # Small integers: every dot product is exact in float32 whatever the summation order, so
    # duplicated rows tie exactly on any CPU and the tie-breaking rule is what decides.
    emb = r.randint(-8, 9, (1003, 24)).astype(np.float32)  # 1003: not divisible by 8 devices
    emb[700] = emb[5]  # exact duplicates: ties
    emb[998] = emb[5]
    q = r.randint(-8, 9, (6, 24)).astype(np.float32)
    q[0] = emb[5]
    return emb, q


@pytest.fixture(scope="module")
def gaussian():
    """Real-valued data: compared with the tie-tolerant float64 reference."""
    r = np.random.RandomState(1)
    return r.randn(1003, 24).astype(np.float32), r.randn(9, 24).astype(np.float32)


@pytest.mark.parametrize("k,chunk", [(1, 32768), (10, 16), (150, 32), (1003, 64)])
def test_exact_equals_numpy_on_8_devices(data, k, chunk):
    emb, q = data
    assert jax.device_count() == 8
    index = ShardedIndex.from_embeddings(emb, dtype=jnp.float32, chunk_rows=chunk)
    assert index.layout.padded_rows % 8 == 0 and index.layout.rows_per_shard < 150
    scores, ids = index.search(q, k)
    ref_s, ref_i = brute_force(emb, q, k)
    np.testing.assert_array_equal(np.asarray(ids), ref_i)
    np.testing.assert_array_equal(np.asarray(scores), ref_s)  # integer data: exact
    assert (np.asarray(ids) < 1003).all()  # padding never returned


@pytest.mark.parametrize("k,chunk", [(10, 16), (150, 32)])
def test_gaussian_data_against_float64_reference(gaussian, k, chunk):
    emb, q = gaussian
    index = ShardedIndex.from_embeddings(emb, dtype=jnp.float32, chunk_rows=chunk)
    scores, ids = index.search(q, k)
    assert_same_top_k(ids, scores, emb, q, k)


def test_ties_go_to_lower_row(data):
    emb, q = data
    _, ids = ShardedIndex.from_embeddings(emb, dtype=jnp.float32, chunk_rows=16).search(q[:1], 3)
    assert list(np.asarray(ids)[0]) == [5, 700, 998]


@pytest.mark.parametrize("batch", [1, 9, 40])
@pytest.mark.parametrize("stored", ["bits", "bfloat16"])
def test_bf16_rows(data, gaussian, batch, stored):
    """bf16 rows against the float64 reference of the same bf16 values, stored as on CPU
    (their uint16 bits, `ShardedIndex`) and as bf16 (as on GPU/TPU, converted to bits at the
    search), at batches below and above 16. Fails if the rows are read as anything but
    their bf16 values (e.g. the bits viewed as float16 in `mips.stored_values`)."""

    def index_of(emb: np.ndarray) -> ShardedIndex:
        index = ShardedIndex.from_embeddings(emb, dtype=jnp.bfloat16, chunk_rows=32)
        assert index.embeddings.dtype == jnp.uint16 and index.dtype == jnp.bfloat16
        if stored == "bfloat16":
            values = jax.jit(stored_values)(index.embeddings)
            index = ShardedIndex(values, index.layout, index.mesh)
            assert index.embeddings.dtype == jnp.bfloat16 == index.dtype
        return index

    emb, q = gaussian
    q = np.concatenate([q] * 5)[:batch]
    emb16 = emb.astype(ml_dtypes.bfloat16).astype(np.float32)
    q16 = q.astype(ml_dtypes.bfloat16).astype(np.float32)
    scores, ids = index_of(emb).search(q, 20)
    assert_same_top_k(ids, scores, emb16, q16, 20, atol=1e-3)
    # Small integers are exact in bf16: there even the tie order is exact.
    emb, q = data
    q = np.concatenate([q] * 7)[:batch]
    scores, ids = index_of(emb).search(q, 20)
    np.testing.assert_array_equal(np.asarray(ids), brute_force(emb, q, 20)[1])


def test_storage_round_trip_keeps_bits_as_bits():
    """Values → bits → values is exact (jax and numpy), and rows already stored as bits are
    stored as they are, never converted as numbers. Fails if `to_storage` casts its input to
    bf16 whatever its dtype (the bits of 1.0, 16256, would become the value 16256.0)."""
    from jaxret.index.mips import BF16_BITS, to_storage

    values = np.array([[1.0, -2.5, 0.0, 3.0e-3]], np.float32)
    exact = values.astype(ml_dtypes.bfloat16)
    for rows in (values, jnp.asarray(values)):
        bits = to_storage(rows, BF16_BITS)
        assert bits.dtype == np.uint16 and int(np.asarray(bits)[0, 0]) == 16256  # 0x3F80
        np.testing.assert_array_equal(np.asarray(stored_values(bits)), exact)
        again = to_storage(bits, BF16_BITS)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(bits))
        with pytest.raises(ValueError, match="stored as bits"):
            to_storage(bits, jnp.float32)


@pytest.mark.parametrize("selection", ["running", "two_pass"])
@pytest.mark.parametrize("batch", [4, 32])
def test_bf16_search_never_widens_the_block(selection, batch):
    """A bf16 index of 65,536 × 64 rows per device, compiled with abstract shapes on 8 CPU
    devices (XLA:CPU widens a sliced bf16 operand to fp32 and hoists that out of the row
    loop, i.e. converts the whole block on every search): rows stored as their bits
    (`ShardedIndex` on CPU) need temporaries far below one copy of a device's rows; rows
    given as bf16 one copy of their bits, below the fp32 size. Fails if the stored bits are
    viewed as bf16 before they are sliced (`mips_top_k`: 18 MB > 4 MB)."""
    from jaxret.index.mips import RowLayout, mips_top_k, row_sharding

    mesh = make_mesh()
    layout = RowLayout.for_shards(8 * 65_536, 8, 8192)
    q = jax.ShapeDtypeStruct((batch, 64), jnp.float32)
    search = jax.jit(lambda e, q: mips_top_k(e, q, 10, layout, mesh, selection))
    block_bytes = layout.rows_per_shard * 64 * 2  # one copy of a device's bf16 rows
    for dtype, bound in ((jnp.uint16, block_bytes // 2), (jnp.bfloat16, 2 * block_bytes)):
        emb = jax.ShapeDtypeStruct((layout.padded_rows, 64), dtype, sharding=row_sharding(mesh))
        temp = search.lower(emb, q).compile().memory_analysis().temp_size_in_bytes
        assert temp < bound, (dtype, temp)


def test_callable_inside_jit_with_sharded_queries(data):
    emb, q = data
    index = ShardedIndex.from_embeddings(emb, dtype=jnp.float32, chunk_rows=32)

    @jax.jit
    def step(index, queries):
        s, i = index.search(queries * 2.0, 7)  # traced queries
        return s.sum(), i

    total, ids = step(index, q)
    ref_s, ref_i = brute_force(emb, q * 2.0, 7)
    np.testing.assert_array_equal(np.asarray(ids), ref_i)
    np.testing.assert_allclose(float(total), ref_s.sum(), rtol=1e-5)


def test_other_mesh_shapes_and_k_bounds(data):
    emb, q = data
    for shape in ((4, 2), (2, 4), (1, 8)):
        index = ShardedIndex.from_embeddings(
            emb, make_mesh(("data", "model"), shape), jnp.float32, chunk_rows=40
        )
        np.testing.assert_array_equal(
            np.asarray(index.search(q, 50)[1]), brute_force(emb, q, 50)[1]
        )
    with pytest.raises(ValueError, match="k=1004"):
        index.search(q, 1004)
    with pytest.raises(ValueError, match="k=0"):
        index.search(q, 0)


def test_search_batched_pads_last_batch(data):
    emb, q = data
    index = ShardedIndex.from_embeddings(emb, dtype=jnp.float32)
    many = np.concatenate([q] * 3)  # 18 queries in batches of 4
    s, i = index.search_batched(many, 5, batch_size=4)
    ref_s, ref_i = brute_force(emb, many, 5)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s)


def test_save_load_and_mismatch_refusal(data, tmp_path):
    emb, q = data
    fp = {"corpus_hash": "abc", "encoder": {"step": 3, "param_hash": "ff"}}
    index = ShardedIndex.from_embeddings(emb, dtype=jnp.bfloat16, chunk_rows=32, fingerprint=fp)
    index.save(tmp_path / "idx")
    loaded = ShardedIndex.load(tmp_path / "idx", make_mesh(("data", "model"), (2, 4)), expect=fp)
    assert loaded.dtype == jnp.bfloat16 and loaded.meta == fp
    np.testing.assert_array_equal(loaded.rows(), index.rows())
    np.testing.assert_array_equal(
        np.asarray(loaded.search(q, 9)[1]), np.asarray(index.search(q, 9)[1])
    )
    with pytest.raises(IndexMismatchError, match="corpus_hash"):
        ShardedIndex.load(tmp_path / "idx", expect={"corpus_hash": "other"})
    with pytest.raises(IndexMismatchError, match="encoder"):
        ShardedIndex.load(tmp_path / "idx", expect={"encoder": {"step": 4, "param_hash": "ff"}})
    with pytest.raises(IndexMismatchError, match="not a jaxret index"):
        ShardedIndex.load(tmp_path)


def test_index_saved_as_bf16_values_loads_as_bits_on_cpu(data, tmp_path):
    """An index written where bf16 rows are stored as values (GPU/TPU; or before the
    manifest named its storage) loads on CPU as the same values stored as bits, and a
    manifest whose storage cannot hold its dtype is refused. Fails if `load` restores the
    saved bf16 rows straight into the CPU's uint16 storage (Orbax converts them as numbers)."""
    import json

    emb, q = data
    on_cpu = ShardedIndex.from_embeddings(emb, dtype=jnp.bfloat16, chunk_rows=32)
    values = jax.jit(stored_values)(on_cpu.embeddings)
    as_on_gpu = ShardedIndex(values, on_cpu.layout, on_cpu.mesh)
    as_on_gpu.save(tmp_path / "gpu")
    manifest = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    assert manifest["dtype"] == manifest["storage"] == "bfloat16"
    del manifest["storage"]  # an older manifest
    (tmp_path / "gpu" / "manifest.json").write_text(json.dumps(manifest))
    loaded = ShardedIndex.load(tmp_path / "gpu")
    assert loaded.embeddings.dtype == jnp.uint16 and loaded.dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded.rows(), emb.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(loaded.search(q, 9)[1]), brute_force(emb, q, 9)[1])
    manifest["storage"] = "uint16"
    manifest["dtype"] = "float32"
    (tmp_path / "gpu" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="manifest.json: rows stored as uint16"):
        ShardedIndex.load(tmp_path / "gpu")


@pytest.mark.parametrize("devices", [1, 4])
def test_index_saved_on_8_devices_loads_on_fewer(data, tmp_path, devices):
    emb, q = data
    index = ShardedIndex.from_embeddings(emb, dtype=jnp.bfloat16, chunk_rows=40)
    assert index.embeddings.sharding.mesh.size == 8
    index.save(tmp_path / "idx")
    mesh = make_mesh(("data", "model"), (devices, 1), devices=jax.devices()[:devices])
    loaded = ShardedIndex.load(tmp_path / "idx", mesh)
    assert loaded.embeddings.sharding.mesh.size == devices
    assert loaded.layout.padded_rows == loaded.embeddings.shape[0]
    assert loaded.layout.rows_per_shard != index.layout.rows_per_shard  # laid out anew
    np.testing.assert_array_equal(loaded.rows(), index.rows())
    np.testing.assert_array_equal(
        np.asarray(loaded.search(q, 9)[1]), np.asarray(index.search(q, 9)[1])
    )


@pytest.mark.parametrize(
    "k,m,rows,real,group",
    [
        (1, 64, 4096, 4096, 0),
        (10, 16, 4096, 4000, 0),
        (100, 32, 4096, 4096, 0),
        (100, 7, 4200, 3501, 0),
        (256, 16, 4096, 4096, 0),
        (4096, 8, 4096, 4096, 0),
        (4000, 7, 4200, 4200, 0),
        (10, 16, 4096, 4000, 16),  # 16 groups of 16 blocks
        (16, 16, 4096, 4096, 16),  # every group chosen
        (37, 7, 4200, 3501, 4),
        (3, 8, 4096, 4096, 16),
    ],
)
def test_two_pass_is_exact_with_ties_across_blocks(k, m, rows, real, group):
    """The two-pass selection on one device equals a float64 full sort, ids included, on
    data where everything ties: entries in {-1, 0, 1} (a handful of distinct scores, so many
    blocks share their maximum), one query that ties every row (all-zero), rows past `real`
    padding, k up to all rows, blocks that do not divide k. Fails if the chosen blocks are
    not taken in row order (ties go to a higher id), if fewer than k blocks are kept (a row
    is missed) or if padding is returned; with groups, if the chosen groups are not taken
    in position order or a group's blocks are not all candidates (`_best_blocks`)."""
    from jaxret.index.mips import TwoPassPlan, two_pass_top_k

    r = np.random.RandomState(k + m)
    emb = r.randint(-1, 2, (rows, 3)).astype(np.float32)
    q = r.randint(-1, 2, (6, 3)).astype(np.float32)
    q[0] = 0.0  # every row ties
    q[1] = [1, 1, 1]
    plan = TwoPassPlan(
        scan_rows=m * (rows // m // 3 if rows // m % 3 == 0 else 1),
        block=m,
        query_tile=4,
        group=group,
    )
    assert rows % plan.scan_rows == 0
    k = min(k, real)
    search = jax.jit(lambda e, q: two_pass_top_k(e, q, k, jnp.int32(0), real, plan))
    scores, ids = search(jnp.asarray(emb), jnp.asarray(q))
    ref_s, ref_i = brute_force(emb[:real], q, k)
    np.testing.assert_array_equal(np.asarray(ids), ref_i)
    np.testing.assert_array_equal(np.asarray(scores), ref_s)


def test_grouped_selection_breaks_ties_by_row_across_groups():
    """A tie at the k-th block between groups of different maxima: group 2 (rows 8-11,
    max 2) ranks before group 0 (rows 0-3, max 1), and block 5 (row 10) ties block 0
    (row 0) at 1; the answer is rows 8 and 0. Fails if the best groups are not put back
    in position order before their blocks compete (row 10 would win the tie)."""
    from jaxret.index.mips import TwoPassPlan, two_pass_top_k

    emb = np.zeros((16, 1), np.float32)
    emb[[0, 8, 10], 0] = [1, 2, 1]
    plan = TwoPassPlan(scan_rows=16, block=2, query_tile=1, group=2)
    scores, ids = two_pass_top_k(jnp.asarray(emb), jnp.ones((1, 1)), 2, jnp.int32(0), 16, plan)
    assert np.asarray(ids).tolist() == [[8, 0]]
    assert np.asarray(scores).tolist() == [[2.0, 1.0]]


@pytest.mark.parametrize("selection", ["two_pass", "auto"])
def test_sharded_two_pass_search_stays_exact(selection):
    """`mips_top_k` with the two-pass selection on 8 devices, 4,191 rows per device (aligned
    to 4,192) and the last 77 rows padding, gives the float64 reference's ids and scores on
    tied integer data; "auto" picks it for k = 2 (64 candidates of 4,192 rows per device).
    Fails if a device's row offset or the padding mask is lost."""
    from jaxret.index.mips import mips_top_k, two_pass_plan

    r = np.random.RandomState(5)
    emb = r.randint(-3, 4, (8 * 4200 - 77, 8)).astype(np.float32)
    q = r.randint(-3, 4, (20, 8)).astype(np.float32)
    index = ShardedIndex.from_embeddings(emb, make_mesh(), jnp.float32, chunk_rows=4200)
    assert index.layout.chunk == 4192  # 4,191 rows per device, aligned to blocks of 32
    k = 60 if selection == "two_pass" else 2
    plan = two_pass_plan(20, index.layout, k, 8, 4, worthwhile=selection == "auto")
    assert plan is not None and plan.block == (8 if selection == "two_pass" else 32)
    search = jax.jit(lambda e, q: mips_top_k(e, q, k, index.layout, index.mesh, selection))
    scores, ids = search(index.embeddings, jnp.asarray(q))
    ref_s, ref_i = brute_force(emb, q, k)
    np.testing.assert_array_equal(np.asarray(ids), ref_i)
    np.testing.assert_array_equal(np.asarray(scores), ref_s)


def test_layouts_pad_little_and_factor_well():
    """Rows per device in equal chunks of at most chunk_rows with little padding, multiples
    of 1,024 above 8,192 rows and of 32 below. Fails if whole chunk_rows chunks come back
    (100,000 rows over 2 devices padded by 31 %) or the alignment is dropped."""
    from jaxret.index.mips import RowLayout

    for rows, shards, chunk_rows, per_shard, chunk in [
        (1_000_000, 2, 32768, 507_904, 31_744),
        (100_000, 2, 32768, 51_200, 25_600),
        (21_015_324, 16, 32768, 1_343_488, 32_768),  # ART's NQ run on 16 GPUs
        (1003, 8, 32768, 128, 128),
        (1003, 8, 16, 128, 16),
        (40, 8, 5, 5, 5),
    ]:
        layout = RowLayout.for_shards(rows, shards, chunk_rows)
        assert (layout.rows_per_shard, layout.chunk) == (per_shard, chunk), rows
        assert layout.rows_per_shard % layout.chunk == 0 and layout.chunk <= chunk_rows
        assert layout.padded_rows >= rows


def test_two_pass_plan_shapes():
    """At the benchmark's size (1M rows over 2 devices) the plan keeps the [B, scan] scores
    within 4 MB, gathers at most 4 MB of candidate rows per tile, takes blocks of 16 rows
    for k = 100 and 64 for k = 10 (`block_rows`), chooses blocks group-first and is taken
    at every batch size; it is refused where the candidates are a large share of the rows
    (100k rows, k = 200), where the maxima would exceed their budget and where no block
    size divides the chunk, and it chooses blocks in one top-k where the groups would be
    fewer than 4 k. Fails if the scan ignores the batch (a 127 MB score block at
    B = 1024) or if the candidate share stops being checked."""
    from jaxret.index.mips import RowLayout, TwoPassPlan, two_pass_plan

    big = RowLayout.for_shards(1_000_000, 2)
    assert two_pass_plan(1024, big, 100, 128, 4) == TwoPassPlan(1024, 16, 5, 16)
    assert two_pass_plan(64, big, 100, 128, 4) == TwoPassPlan(15_872, 16, 5, 16)
    assert two_pass_plan(1, big, 10, 128, 2) == TwoPassPlan(31_744, 64, 1, 16)
    small = RowLayout.for_shards(100_000, 2)
    assert two_pass_plan(64, small, 200, 128, 4) is None  # 1,600 candidates of 51,200 rows
    # 6,400 blocks in 400 groups, fewer than 4 · 200: one top-k over the blocks
    assert two_pass_plan(64, small, 200, 128, 4, worthwhile=False).group == 0
    assert two_pass_plan(64, small, 100, 128, 4) == TwoPassPlan(12_800, 8, 10, 16)
    assert two_pass_plan(4096, RowLayout(40_000_000, 1, 40_000_000, 32_768), 10, 128, 4) is None
    assert two_pass_plan(8, RowLayout(2687 * 16, 16, 2687, 2687), 1, 128, 4) is None
