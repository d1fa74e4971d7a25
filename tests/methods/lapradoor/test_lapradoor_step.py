"""ICoL: the cache queue, the alternation of the towers, and the loss terms of the paper's
equations (2)–(7) against numpy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxret.data.tokenization import load_tokenizer, tokenize_queries
from jaxret.losses import info_nce_with_cache
from jaxret.methods.lapradoor import step as icol
from jaxret.models import dual_encoder as de
from jaxret.parallel import global_batch, make_mesh
from jaxret.parallel.activations import Activations
from jaxret.train import state as train_state
from jaxret.train.optim import make_optimizer, schedule


def test_queue_is_a_fifo_ring_with_a_valid_mask():
    cfg = icol.IcolConfig(queue_size=13)  # rounded up to 16 = 2 rows × 8 devices
    mesh = make_mesh()
    q = icol.init_queue(cfg, 3, mesh)
    assert q["vectors"].shape == (16, 3)
    assert q["vectors"].sharding.shard_shape((16, 3)) == (2, 3)  # 2 rows on each device
    ref_rows, ref_valid = np.zeros((16, 3)), np.zeros(16, bool)
    pointer = 0
    enqueue = jax.jit(icol.enqueue)
    for t in range(5):  # 5 × 6 = 30 entries: wraps around once, the oldest overwritten
        new = np.full((6, 3), float(t + 1)) + np.arange(6)[:, None] / 10
        q = enqueue(q, jnp.asarray(new))
        for j in range(6):
            ref_rows[(pointer + j) % 16] = new[j]
            ref_valid[(pointer + j) % 16] = True
        pointer = (pointer + 6) % 16
        np.testing.assert_allclose(np.asarray(q["vectors"]), ref_rows)
        np.testing.assert_array_equal(np.asarray(q["valid"]), ref_valid)
        assert int(q["pointer"]) == pointer
    assert q["vectors"].sharding.shard_shape((16, 3)) == (2, 3)  # stays split over the devices
    cleared = icol.clear(q)
    assert not np.asarray(cleared["valid"]).any() and int(cleared["pointer"]) == 0
    # The same on one device (with a capacity both device counts divide).
    one = make_mesh(("data", "model"), (1, 1), devices=jax.devices()[:1])
    q1 = icol.init_queue(icol.IcolConfig(queue_size=16), 3, one)
    for t in range(5):
        new = np.full((6, 3), float(t + 1)) + np.arange(6)[:, None] / 10
        q1 = jax.jit(icol.enqueue)(q1, jnp.asarray(new))
    np.testing.assert_array_equal(np.asarray(q1["vectors"]), np.asarray(q["vectors"]))


def test_empty_slots_never_act_as_negatives():
    r = np.random.RandomState(0)
    scores = jnp.asarray(r.randn(4, 4))
    cache = jnp.asarray(r.randn(4, 6))
    valid = jnp.array([True, False, True, False, False, True])
    loaded = cache.at[:, ~valid].set(1e4)  # would dominate if it counted
    a = info_nce_with_cache(scores, jnp.arange(4), loaded, valid)
    b = info_nce_with_cache(scores, jnp.arange(4), cache[:, valid])
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    empty = info_nce_with_cache(scores, jnp.arange(4), cache, jnp.zeros(6, bool))
    np.testing.assert_allclose(
        float(empty), float(info_nce_with_cache(scores, jnp.arange(4))), rtol=1e-6
    )
    g = jax.grad(lambda c: info_nce_with_cache(scores, jnp.arange(4), c, jnp.zeros(6, bool)))(cache)
    assert np.isfinite(np.asarray(g)).all()


B = 8


@pytest.fixture(scope="module")
def setup(tiny_bert):
    spec = de.EncoderSpec(shared=False, pooling="mean", max_query_length=12, max_passage_length=20)
    encoder, params, tok = de.from_pretrained(tiny_bert, spec)
    tok = load_tokenizer(tok)
    r = np.random.RandomState(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    queries = [" ".join(r.choice(words, 4)) for _ in range(4 * B)]
    docs = [" ".join(r.choice(words, 14)) for _ in range(4 * B)]
    batches = [
        {
            "query": tokenize_queries(tok, queries[i * B : (i + 1) * B], 12),
            "document": tokenize_queries(tok, docs[i * B : (i + 1) * B], 20),
        }
        for i in range(4)
    ]
    return encoder, params, batches


def numpy_icol(a, a_plus, b, queue, valid, scale, lam):
    """Eq. (2)–(4) (or (5)–(7)) for the training tower A: L_AB + λ·L_AA, cosine × scale."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    a, a_plus, b, queue = unit(a), unit(a_plus), unit(b), queue
    n = len(a)

    def nll(scores):
        scores = scores - scores.max(1, keepdims=True)
        return -np.mean(np.log(np.exp(scores[np.arange(n), np.arange(n)]) / np.exp(scores).sum(1)))

    l_aa = nll(scale * a @ a_plus.T)
    cross = scale * np.concatenate([a @ b.T, a @ queue[valid].T], axis=1)
    l_ab = nll(cross)
    return l_ab + lam * l_aa, l_ab, l_aa


@pytest.mark.parametrize("trained", ["query", "passage"])
def test_loss_terms_equal_numpy(setup, trained):
    encoder, params, batches = setup
    mesh = make_mesh()
    frozen = "passage" if trained == "query" else "query"
    x = {"query": batches[0]["query"], "passage": batches[0]["document"]}
    cfg = icol.IcolConfig(queue_size=16, scale=20.0, lam=0.7)
    r = np.random.RandomState(1)
    queue = {
        "vectors": jnp.asarray(r.randn(16, encoder.dim), jnp.float32),
        "valid": jnp.asarray(r.rand(16) < 0.6),
        "pointer": jnp.int32(3),
    }
    rng = jax.random.key(7)
    loss, (metrics, b_out) = icol.icol_loss(
        params[trained],
        params[frozen],
        x[trained],
        x[frozen],
        queue,
        rng,
        encoder=encoder,
        trained_tower=trained,
        frozen_tower=frozen,
        cfg=cfg,
        mesh=mesh,
    )
    r1, r2 = jax.random.split(rng)
    a = np.asarray(encoder.embed(params, trained, x[trained], dropout_rng=r1), np.float64)
    a_plus = np.asarray(encoder.embed(params, trained, x[trained], dropout_rng=r2), np.float64)
    b = np.asarray(encoder.embed(params, frozen, x[frozen]), np.float64)
    assert np.abs(a - a_plus).max() > 1e-3  # two dropout masks: DaPI's positive pair
    ref, ref_ab, ref_aa = numpy_icol(
        a,
        a_plus,
        b,
        np.asarray(queue["vectors"], np.float64),
        np.asarray(queue["valid"]),
        20.0,
        0.7,
    )
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss_cross"]), ref_ab, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss_same"]), ref_aa, rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(b_out), b / np.linalg.norm(b, axis=1, keepdims=True), atol=1e-6
    )
    assert float(metrics["negatives"]) == B - 1 + int(np.asarray(queue["valid"]).sum())


def _run(setup, mesh, cfg, steps, lr=1e-3):
    encoder, params, batches = setup
    encoder = encoder.with_activations(Activations.for_strategy(mesh))
    opt_cfg = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=lr,
            warmup_fraction=0.0,
            weight_decay=0.01,
            clip_norm=1.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
        )
    )
    optimizer = make_optimizer(opt_cfg, 100, learning_rate=1.0)
    lr_at = schedule(lr, 100, 0.0)
    queue = icol.init_queue(cfg, encoder.dim, mesh)
    state = icol.init_state(params, optimizer, 0, jax.device_get(queue))
    sh = train_state.state_shardings(state, mesh, "replicated", icol.queue_shardings(mesh))
    state = jax.device_put(state, sh)
    batch_sh = NamedSharding(mesh, P("data"))
    step = icol.make_train_step(
        encoder, optimizer, lr_at, cfg, mesh, (sh, jax.tree.map(lambda _: batch_sh, batches[0]))
    )
    history = [jax.device_get(state)]
    for t in range(steps):
        state, metrics = step(state, global_batch(batches[t % len(batches)], mesh))
        history.append(jax.device_get(state))
    return history


def test_frozen_tower_is_bit_identical_and_the_queue_clears_at_switch(setup):
    cfg = icol.IcolConfig(switch_every=2, queue_size=32)
    h = _run(setup, make_mesh(), cfg, 4)
    same = lambda a, b: all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    for t, frozen in ((0, "passage"), (1, "passage"), (2, "query"), (3, "query")):
        trained = "query" if frozen == "passage" else "passage"
        assert same(h[t + 1].params[frozen], h[t].params[frozen]), t
        assert same(h[t + 1].opt_state[frozen], h[t].opt_state[frozen]), t
        if t > 0:  # the schedule's learning rate is 0 at step 0 (warmup)
            assert not same(h[t + 1].params[trained], h[t].params[trained]), t
    valid = [int(np.asarray(s.extra["valid"]).sum()) for s in h]
    assert valid == [0, 8, 16, 8, 16]  # cleared at step 2 (the switch), then refilled


def test_shared_towers_copy_weights_at_the_switch(setup):
    cfg = icol.IcolConfig(switch_every=2, queue_size=32, shared=True)
    encoder, params, batches = setup
    apart = {**params, "passage": jax.tree.map(lambda x: x * 1.01, params["passage"])}
    h = _run((encoder, apart, batches), make_mesh(), cfg, 3, lr=0.0)  # lr 0: only copies move
    leaves = lambda t: jax.tree.leaves(t)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(leaves(h[0].params["query"]), leaves(h[0].params["passage"]))
    )
    # Step index 2 switches to E_D: E_D starts from E_Q (params and optimizer state).
    for a, b in zip(leaves(h[3].params["passage"]), leaves(h[2].params["query"])):
        np.testing.assert_array_equal(a, b)
    # Its optimizer state was copied too, then stepped once: E_Q's step count plus one.
    count = lambda tree: [int(x) for x in leaves(tree) if np.ndim(x) == 0]
    assert count(h[3].opt_state["passage"]) == [c + 1 for c in count(h[2].opt_state["query"])]


def test_eight_devices_equal_one(setup):
    cfg = icol.IcolConfig(switch_every=2, queue_size=16)
    one = make_mesh(("data", "model"), (1, 1), devices=jax.devices()[:1])
    a = _run(setup, one, cfg, 3)
    b = _run(setup, make_mesh(), cfg, 3)
    for x, y in zip(jax.tree.leaves(a[-1].params), jax.tree.leaves(b[-1].params)):
        np.testing.assert_allclose(x, y, atol=2e-5)
    np.testing.assert_allclose(a[-1].extra["vectors"], b[-1].extra["vectors"], atol=1e-5)
    np.testing.assert_array_equal(a[-1].extra["valid"], b[-1].extra["valid"])


def test_in_batch_baseline_loss_equals_numpy(setup):
    """The In-Batch baseline (Table 2): L_qd + L_dq + λ·(L_qq + L_dd) over in-batch
    negatives only, every term against a numpy reference of the towers' embeddings with the
    step's dropout masks. Fails if a direction (L_dq) or a DaPI term is dropped, or a queue
    is read."""
    encoder, params, batches = setup
    x = {"query": batches[0]["query"], "passage": batches[0]["document"]}
    cfg = icol.IcolConfig(method="in_batch", use_queue=False, scale=20.0, lam=0.7)
    rng = jax.random.key(3)
    loss, metrics = icol.joint_loss(params, x, rng, encoder=encoder, cfg=cfg, mesh=make_mesh())
    r = jax.random.split(rng, 4)
    emb = lambda t, k: np.asarray(encoder.embed(params, t, x[t], dropout_rng=r[k]), np.float64)
    q, d, q_plus, d_plus = emb("query", 0), emb("passage", 1), emb("query", 2), emb("passage", 3)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)

    def nll(a, b):
        s = 20.0 * unit(a) @ unit(b).T
        s = s - s.max(1, keepdims=True)
        return -np.mean(np.diag(s) - np.log(np.exp(s).sum(1)))

    cross, same = nll(q, d) + nll(d, q), nll(q, q_plus) + nll(d, d_plus)
    np.testing.assert_allclose(float(metrics["loss_cross"]), cross, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss_same"]), same, rtol=1e-4)
    np.testing.assert_allclose(float(loss), cross + 0.7 * same, rtol=1e-4)
    assert float(metrics["negatives"]) == B - 1


@pytest.mark.slow  # ~25 s (a compile of the joint step); its loss is checked in the fast set
def test_in_batch_baseline_trains_both_towers_at_every_step(setup):
    """No alternation: both towers move at every step (after warmup's lr 0). Fails if the
    ICoL phase logic freezes one tower."""
    leaves = lambda t: jax.tree.leaves(t)
    moved = lambda a, b: not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    h = _run(setup, make_mesh(), icol.IcolConfig(method="in_batch", use_queue=False), 3)
    for t in (1, 2):
        assert moved(h[t + 1].params["query"], h[t].params["query"])
        assert moved(h[t + 1].params["passage"], h[t].params["passage"])


def test_moco_key_tower_is_the_momentum_copy_and_its_queue_is_never_cleared(setup):
    """MoCo (Table 2): the query tower trains at every step; after each step the document
    tower is m·θ_D + (1 − m)·θ_Q (θ_Q after the step), checked against numpy on every
    leaf; the queue keeps filling across `switch_every` boundaries. Fails if the key tower
    is trained or left frozen, or if the queue is cleared at a switch."""
    cfg = icol.IcolConfig(method="moco", shared=False, switch_every=2, queue_size=64, momentum=0.9)
    h = _run(setup, make_mesh(), cfg, 4)
    for t in range(4):
        for k, q, k_next in zip(
            leaves_of(h[t].params["passage"]),
            leaves_of(h[t + 1].params["query"]),
            leaves_of(h[t + 1].params["passage"]),
        ):
            want = 0.9 * np.asarray(k, np.float64) + 0.1 * np.asarray(q, np.float64)
            np.testing.assert_allclose(np.asarray(k_next, np.float64), want, rtol=1e-5, atol=1e-7)
    valid = [int(np.asarray(s.extra["valid"]).sum()) for s in h]
    assert valid == [0, 8, 16, 24, 32]
    with pytest.raises(ValueError, match="two towers"):
        icol.IcolConfig(method="moco", shared=True)


def leaves_of(tree):
    return jax.tree.leaves(tree)
