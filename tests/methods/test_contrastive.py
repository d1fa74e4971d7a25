"""The DPR contrastive loss with negatives gathered over the whole mesh, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxret.data.tokenization import load_tokenizer, tokenize_passages, tokenize_queries
from jaxret.eval.evaluate import load_eval_data
from jaxret.index.gather import device_table
from jaxret.index.mips import RowLayout, row_sharding
from jaxret.losses import contrastive_loss
from jaxret.methods import contrastive
from jaxret.models import dual_encoder as de
from jaxret.parallel import global_batch, make_mesh
from jaxret.train import state as train_state


def numpy_reference(q, p, scale):
    """loss = mean_i −log softmax(scale · q_i · Pᵀ)[i]; d/dq, d/dp by hand."""
    q, p = q.astype(np.float64), p.astype(np.float64)
    b = len(q)
    s = scale * q @ p.T
    s -= s.max(1, keepdims=True)
    soft = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    loss = -np.mean(np.log(soft[np.arange(b), np.arange(b)]))
    g = soft.copy()
    g[np.arange(b), np.arange(b)] -= 1
    g *= scale / b
    return loss, g @ p, g.T @ q


@pytest.mark.parametrize("negatives", [0, 1, 3])
def test_gathered_loss_and_gradients_equal_numpy_on_8_devices(negatives):
    r = np.random.RandomState(negatives)
    b, d = 16, 12
    q = r.randn(b, d).astype(np.float32)
    p = r.randn(b * (1 + negatives), d).astype(np.float32)  # positives, then hard negatives
    mesh = make_mesh()
    shard = NamedSharding(mesh, P("data"))
    qs, ps = jax.device_put(q, shard), jax.device_put(p, shard)

    def loss(q, p):
        p_all = jax.lax.with_sharding_constraint(p, NamedSharding(mesh, P()))  # all-gather
        return contrastive_loss(q, p_all, jnp.arange(q.shape[0]), scale=0.5)

    value, (gq, gp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(qs, ps)
    ref, ref_gq, ref_gp = numpy_reference(q, p, 0.5)
    np.testing.assert_allclose(float(value), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gq), ref_gq, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gp), ref_gp, atol=1e-6)
    if negatives:  # the hard-negative columns carry gradient (they compete with the positives)
        assert np.abs(ref_gp[b:]).max() > 1e-4


B, NEG = 8, 1


# the replicated layout in make test-slow: fsdp_tensor exercises both mesh axes
@pytest.mark.parametrize(
    "mesh_shape,strategy",
    [pytest.param((8, 1), "replicated", marks=pytest.mark.slow), ((4, 2), "fsdp_tensor")],
)
def test_sharded_step_equals_single_device(tiny_bert, data_dir, mesh_shape, strategy):
    data = load_eval_data(data_dir / "adi")
    corpus = data.corpus
    spec = de.EncoderSpec(shared=False, pooling="cls", max_query_length=16, max_passage_length=24)
    encoder, params, tok_folder = de.from_pretrained(tiny_bert, spec)
    tok = load_tokenizer(tok_folder)
    p_tokens = tokenize_passages(tok, corpus.titles, corpus.texts, 24, "pair")
    q_tokens = tokenize_queries(tok, data.query_texts[: 2 * B], 16)
    rows = np.random.RandomState(0).randint(0, len(corpus), (2 * B, 1 + NEG)).astype(np.int32)
    rows[1, 0] = rows[0, 0]  # two queries of one passage: each must not be the other's negative
    rows[2, 1] = rows[2, 0]  # a hard negative that is the positive itself
    optimizer = optax.sgd(0.5)

    def reference(params):
        """One device, no gather: the passages' tokens indexed with numpy."""
        losses = []
        for step in range(2):
            sl = slice(step * B, (step + 1) * B)
            order = rows[sl].T.reshape(-1)
            pt = {k: v[order] for k, v in p_tokens.items()}
            qt = {k: v[sl] for k, v in q_tokens.items()}

            # Another copy of a query's positive passage does not compete against it.
            valid = (order[None, :] != order[:B, None]) | np.eye(B, len(order), dtype=bool)

            def loss_fn(prm, qt=qt, pt=pt, valid=valid):
                q = encoder.embed(prm, "query", qt)
                p = encoder.embed(prm, "passage", pt)
                return contrastive_loss(q, p, jnp.arange(B), valid=valid)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            params = optax.apply_updates(params, optimizer.update(grads, optimizer.init(params))[0])
            losses.append(float(loss))
        return params, losses

    ref_params, ref_losses = reference(params)
    mesh = make_mesh(("data", "model"), mesh_shape)
    layout = RowLayout.for_mesh(len(corpus), mesh, 8)
    pad = lambda v: np.pad(v, ((0, layout.padded_rows - len(v)), (0, 0)))
    tables = {"input_ids": device_table(lambda s, e: pad(p_tokens["input_ids"])[s:e], layout, mesh)}
    state = train_state.init_state(params, optimizer, 0)
    shardings = train_state.state_shardings(state, mesh, strategy)
    state = jax.device_put(state, shardings)
    cfg = contrastive.ContrastiveConfig(scale=1.0, dropout=False)
    step_fn, losses = None, []
    for step in range(2):
        sl = slice(step * B, (step + 1) * B)
        batch = global_batch(
            {"query": {k: v[sl] for k, v in q_tokens.items()}, "passage_rows": rows[sl]}, mesh
        )
        if step_fn is None:
            in_sh = (
                shardings,
                jax.tree.map(lambda _: NamedSharding(mesh, P("data")), batch),
                {"input_ids": row_sharding(mesh)},
            )
            step_fn = contrastive.make_train_step(encoder, optimizer, cfg, mesh, in_sh, layout)
        state, metrics = step_fn(state, batch, tables)
        losses.append(float(metrics["loss"]))
        assert float(metrics["candidates"]) == B * (1 + NEG)  # the whole global batch
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
        state.params,
        ref_params,
    )


@pytest.mark.parametrize("mesh_shape,strategy", [((8, 1), "replicated"), ((4, 2), "fsdp_tensor")])
def test_two_tower_head_step_on_given_passages_equals_single_device(
    tiny_bert, data_dir, mesh_shape, strategy
):
    """QGen's two-tower model: [CLS] → dense(32→8) → tanh, one head per tower, passages given as
    tokens [B, 1, L] (synthetic pairs), not gathered from tables."""
    data = load_eval_data(data_dir / "adi")
    spec = de.EncoderSpec(
        shared=False,
        pooling="cls",
        projection="dense_tanh",
        projection_dim=8,
        max_query_length=16,
        max_passage_length=24,
    )
    encoder, params, tok_folder = de.from_pretrained(tiny_bert, spec)
    assert encoder.dim == 8 and params["query"]["projection"]["kernel"].shape == (32, 8)
    # A wider head than init's so that the scores, and the gradients, are far from zero.
    r = np.random.RandomState(1)
    for tower in ("query", "passage"):
        params[tower]["projection"]["kernel"] = r.randn(32, 8).astype(np.float32)
    params = jax.tree.map(np.array, params)  # host copies: the step donates its state
    tok = load_tokenizer(tok_folder)
    q_tokens = tokenize_queries(tok, data.query_texts[: 2 * B], 16)
    texts = data.corpus.texts[: 2 * B]
    p_tokens = tokenize_passages(tok, [""] * len(texts), texts, 24, "pair")
    optimizer = optax.sgd(1.0)

    ref_params, opt_state, ref_losses = params, optimizer.init(params), []
    for step in range(2):
        sl = slice(step * B, (step + 1) * B)

        def loss_fn(prm, sl=sl):
            q = encoder.embed(prm, "query", {k: v[sl] for k, v in q_tokens.items()})
            p = encoder.embed(prm, "passage", {k: v[sl] for k, v in p_tokens.items()})
            return contrastive_loss(q, p, jnp.arange(B), scale=20.0)

        loss, grads = jax.value_and_grad(loss_fn)(ref_params)
        updates, opt_state = optimizer.update(grads, opt_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        ref_losses.append(float(loss))

    mesh = make_mesh(("data", "model"), mesh_shape)
    state = train_state.init_state(params, optimizer, 0)
    shardings = train_state.state_shardings(state, mesh, strategy)
    state = jax.device_put(state, shardings)
    cfg = contrastive.ContrastiveConfig(scale=20.0, dropout=False)
    step_fn, losses = None, []
    for step in range(2):
        sl = slice(step * B, (step + 1) * B)
        passages = {k: v[sl][:, None] for k, v in p_tokens.items()}  # [B, 1, L]
        query = {k: v[sl] for k, v in q_tokens.items()}
        batch = global_batch({"query": query, "passages": passages}, mesh)
        if step_fn is None:
            in_sh = (shardings, jax.tree.map(lambda _: NamedSharding(mesh, P("data")), batch), {})
            step_fn = contrastive.make_train_step(encoder, optimizer, cfg, mesh, in_sh)
        state, metrics = step_fn(state, batch, {})
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)

    # Compare the updates, not the parameters (they are small next to the weights), against
    # the largest update: leaves whose gradient is a cancelling sum carry fp32 reduction noise.
    delta = lambda new: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new, params)
    got, want = delta(state.params), delta(ref_params)
    scale = max(np.abs(x).max() for x in jax.tree.leaves(want))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale), got, want
    )
    moved = (
        ref_params["passage"]["projection"]["kernel"] - params["passage"]["projection"]["kernel"]
    )
    assert np.abs(np.asarray(moved)).max() > 1e-4  # the head trains
