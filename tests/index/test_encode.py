import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxret.data.corpus_store import StoreMismatchError, open_table
from jaxret.data.readers import Corpus
from jaxret.data.tokenization import load_tokenizer, tokenize_passages
from jaxret.index.encode import encode_corpus, passage_table
from jaxret.index.sharded import params_fingerprint
from jaxret.models import dual_encoder as de
from jaxret.parallel import make_mesh


@pytest.fixture(scope="module")
def setup(tiny_bert):
    enc, params, tok_folder = de.from_pretrained(
        tiny_bert, de.EncoderSpec(pooling="mean", max_passage_length=48, passage_format="pair")
    )
    r = np.random.RandomState(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    texts = [" ".join(r.choice(words, r.randint(1, 40))) for _ in range(37)]
    corpus = Corpus([f"d{i}" for i in range(37)], [f"title {i}" for i in range(37)], texts)
    return enc, params, load_tokenizer(tok_folder), corpus


def test_encode_corpus_equals_direct_embedding(setup, tmp_path):
    """Length bucketing and sorting must not change any row: compare with one full pass."""
    enc, params, tok, corpus = setup
    table = passage_table(tmp_path, corpus, enc, tok)
    index = encode_corpus(
        enc,
        params,
        table,
        make_mesh(),
        batch_size=8,
        dtype="float32",
        chunk_rows=4,
        corpus_hash=corpus.content_hash(),
        step=5,
    )
    full = tokenize_passages(tok, corpus.titles, corpus.texts, 48, "pair")
    direct = np.asarray(jax.jit(lambda p, t: enc.embed(p, "passage", t))(params, full))
    np.testing.assert_allclose(index.rows(), direct, atol=2e-5)
    assert index.embeddings.sharding.spec == jax.sharding.PartitionSpec(("data", "model"))
    assert index.meta["corpus_hash"] == corpus.content_hash()
    assert index.meta["encoder"] == params_fingerprint(params["shared"], 5)


def test_store_reuses_and_rebuilds(setup, tmp_path):
    enc, params, tok, corpus = setup
    calls = []

    def tokenize(titles, texts, trunc):
        calls.append(len(titles))
        return tokenize_passages(tok, titles, texts, 16, "join", truncation=trunc)

    fp = {"tokenizer": "t", "max_length": 16, "vocab_size": 30522}
    t1 = open_table(tmp_path, "p", corpus, tokenize, fp, shard_rows=10)
    assert calls == [10, 10, 10, 7] and len(t1) == 37
    assert t1.arrays["input_ids"].dtype == np.uint16  # 30k vocabulary fits
    # What the 16-token cut removed is recorded with the table.
    lengths = [
        len(tok(f"{a} {b}".strip())["input_ids"]) for a, b in zip(corpus.titles, corpus.texts)
    ]
    cut = t1.truncation("passages")
    assert (cut.rows, cut.cut, cut.longest) == (37, sum(n > 16 for n in lengths), max(lengths))
    assert cut.cut > 0 and "longer than 16 tokens" in cut.message()
    t2 = open_table(tmp_path, "p", corpus, tokenize, fp, shard_rows=10)
    assert calls == [10, 10, 10, 7]  # reloaded, not re-tokenized
    np.testing.assert_array_equal(t2.rows(0, 37)["input_ids"], t1.rows(0, 37)["input_ids"])
    assert t2.rows(30, 40)["input_ids"][7:].sum() == 0  # past the end: padding rows
    with pytest.raises(StoreMismatchError, match="max_length"):
        open_table(tmp_path, "p", corpus, tokenize, {**fp, "max_length": 32}, build=False)
    other = Corpus(corpus.ids, corpus.titles, corpus.texts[:-1] + ["changed"])
    with pytest.raises(StoreMismatchError, match="corpus_hash"):
        open_table(tmp_path, "p", other, tokenize, fp, build=False)
    open_table(tmp_path, "p", other, tokenize, fp, shard_rows=100)  # rebuilds
    assert calls[-1] == 37


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-5), ("bfloat16", 2e-2)])
def test_device_refresh_equals_host_path(setup, tmp_path, dtype, atol):
    """The on-device encoder (token tables already on the devices, output born in the index
    layout, the old index donated) gives the host path's embeddings."""
    from jaxret.index.encode import empty_index, refresh_index
    from jaxret.index.gather import device_table, memmap_rows
    from jaxret.index.mips import RowLayout

    enc, params, tok, corpus = setup
    mesh = make_mesh()
    table = passage_table(tmp_path, corpus, enc, tok)
    host = encode_corpus(enc, params, table, mesh, batch_size=8, dtype=dtype, chunk_rows=4)
    layout = RowLayout.for_mesh(len(corpus), mesh, 4)
    tables = {
        k: device_table(
            memmap_rows(table.arrays[k], len(table)), layout, mesh, table.arrays[k].dtype
        )
        for k in ("input_ids",)
    }
    old = empty_index(layout, mesh, enc.dim, dtype)
    donated = old.embeddings
    new = refresh_index(enc, params, tables, old, per_device=2)
    assert donated.is_deleted()  # the old buffer was given to the new index
    assert new.embeddings.sharding == host.embeddings.sharding
    np.testing.assert_allclose(new.rows(), host.rows(), atol=atol)


def test_device_encoding_of_a_prime_block_runs_full_batches(setup, tmp_path):
    """37 rows on 8 devices in blocks of 5 (a prime, as the paper's 2687-row slices):
    `per_device=2` runs ⌈5 / 2⌉ = 3 calls of 2 rows per device on a padded block and cuts the
    padding, giving the host path's rows. Before issue 19 the batch shrank to a divisor of
    the block: 1 row, 5 calls. Fails if the batch goes back to dividing the block (trip
    count 5) or the padding is not cut (rows shift)."""
    from jaxret.index.encode import device_encoder, empty_index
    from jaxret.index.gather import device_table, memmap_rows
    from jaxret.index.mips import RowLayout

    enc, params, tok, corpus = setup
    mesh = make_mesh()
    table = passage_table(tmp_path, corpus, enc, tok)
    host = encode_corpus(enc, params, table, mesh, batch_size=8, dtype="float32", chunk_rows=4)
    layout = RowLayout.for_mesh(len(corpus), mesh, 5)
    assert layout.rows_per_shard == 5
    arr = table.arrays["input_ids"]
    tables = {"input_ids": device_table(memmap_rows(arr, len(table)), layout, mesh, arr.dtype)}
    old = empty_index(layout, mesh, enc.dim, "float32")
    fn = device_encoder(enc, mesh, layout, 2, "float32")
    hlo = fn.lower(params, tables, old.embeddings).compile().as_text()
    assert '"known_trip_count":{"n":"3"}' in hlo and '"n":"5"' not in hlo
    new = fn(params, tables, old.embeddings)
    got = np.asarray(jax.device_get(new)).reshape(8, 5, -1).reshape(40, -1)[: len(corpus)]
    np.testing.assert_allclose(got, host.rows(), atol=2e-5)


BUILD = """
import sys, time
import numpy as np
from jaxret.data.corpus_store import open_table
from jaxret.data.readers import Corpus
n = 300
corpus = Corpus([f"d{i}" for i in range(n)], ["t"] * n, [f"text {i}" for i in range(n)])
calls = []
def tokenize(titles, texts, trunc):
    time.sleep(float(sys.argv[2]))  # slow enough for the builders to overlap
    calls.append(len(texts))
    ids = np.array([[1 + len(t) + int(t.split()[1]) % 7] * 4 for t in texts])
    trunc.add([4 + int(t.split()[1]) % 5 for t in texts])
    return {"input_ids": ids}
workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
table = open_table(sys.argv[1], "p", corpus, tokenize, {"vocab_size": 100, "max_length": 6},
                   shard_rows=20, workers=workers)
print("OPENED", table.folder, int(table.arrays["input_ids"].sum()), flush=True)
print("CALLS", len(calls), flush=True)
"""


def _build(store, delay, workers=1):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen(
        [sys.executable, "-c", BUILD, str(store), str(delay), str(workers)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _table_bytes(store):
    (folder,) = Path(store).glob("p-*")
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_killed_build_resumes_and_concurrent_builds_give_one_table(tmp_path):
    """A build killed halfway leaves no table that opens, only its finished shards; the next
    build tokenizes just the missing shards; two builders at once give one table that both
    open. Fails if shards are not kept (the rebuild tokenizes all 15) or not atomic."""
    import signal
    import time

    from jaxret.data.readers import Corpus

    store = tmp_path / "store"
    # 0.2 s per shard: a poll starved for a few seconds on a loaded machine still sees the
    # build before its last shard (at 0.05 s it once saw all 15 done). Finished shards only:
    # a shard being written (".000003.<pid>.tmp.npz") is not one (counting it failed once).
    victim = _build(store, 0.2)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(store.glob(".p-*.shards/[0-9]*.npz"))) < 3:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    n = 300
    corpus = Corpus([f"d{i}" for i in range(n)], ["t"] * n, [f"text {i}" for i in range(n)])
    with pytest.raises(StoreMismatchError, match="no token table"):
        open_table(store, "p", corpus, None, {"vocab_size": 100, "max_length": 6}, build=False)
    finished = len(list(store.glob(".p-*.shards/[0-9]*.npz")))
    assert 3 <= finished < 15
    # Two builders at once, resuming from the kept shards: one table, both open it.
    procs = [_build(store, 0.01), _build(store, 0.01)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    opened = {line for out in outs for line in out.splitlines() if line.startswith("OPENED")}
    assert len(opened) == 1  # same folder, same content
    calls = [int(line.split()[1]) for out in outs for line in out.splitlines() if "CALLS" in line]
    assert max(calls) <= 15 - finished  # the killed build's shards were not redone
    tables = list(store.glob("p-*"))
    assert len(tables) == 1 and (tables[0] / "manifest.json").is_file()
    assert not list(store.glob(".p-*"))  # no temporary folder and no spent shards left
    table = open_table(store, "p", corpus, None, {"vocab_size": 100, "max_length": 6}, build=False)
    assert len(table) == 300 and table.arrays["input_ids"].dtype == np.uint16
    cut = sum(4 + i % 5 > 6 for i in range(300))  # the lengths BUILD reports, cut at 6
    assert table.manifest["truncation"] == {"rows": 300, "cut": cut, "longest": 8}
    # The resumed table is byte for byte the one an uninterrupted build writes.
    clean = tmp_path / "clean"
    assert _build(clean, 0).wait() == 0
    assert _table_bytes(clean) == _table_bytes(store)


def test_build_is_byte_identical_for_any_worker_count(tmp_path):
    """`jaxret prepare --workers N` writes the same table for N = 1 and 3 (fixed shards, forked
    workers). Fails if the shard boundaries depended on the worker count."""
    for workers in (1, 3):
        out = _build(tmp_path / f"w{workers}", 0, workers).communicate(timeout=300)[0].decode()
        assert "OPENED" in out, out
    assert _table_bytes(tmp_path / "w1") == _table_bytes(tmp_path / "w3")


def test_only_dead_builds_of_this_host_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    from jaxret.data.corpus_store import _remove_dead_builds

    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(done.stdout)
    host = socket.gethostname()
    folder = tmp_path / "p-0123"
    names = {
        "dead": f".p-0123.tmp-{host}-{dead}-abcd1234",
        "alive": f".p-0123.tmp-{host}-{os.getpid()}-abcd1234",
        "other host": f".p-0123.tmp-elsewhere-{dead}-abcd1234",
        "other table": f".p-9999.tmp-{host}-{dead}-abcd1234",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
    assert _remove_dead_builds(folder) == [tmp_path / names["dead"]]
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {names["alive"], names["other host"], names["other table"]}
