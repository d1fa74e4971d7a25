"""The ART step: KL gradients, and the sharded 8-device step against a plain reference."""

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
from jaxret.index.rolling import empty_staleness, rolling_refresher, rolling_update
from jaxret.index.sharded import ShardedIndex
from jaxret.lexical.bm25 import BM25
from jaxret.losses import kl_teacher_student
from jaxret.methods.art import step as art
from jaxret.models import dual_encoder as de
from jaxret.parallel import global_batch, make_mesh
from jaxret.train import state as train_state


def test_kl_gradient_is_softmax_difference():
    r = np.random.RandomState(0)
    s = jnp.asarray(r.randn(5, 7).astype(np.float32))
    t = jnp.asarray(r.randn(5, 7).astype(np.float32))
    g_s, g_t = jax.grad(kl_teacher_student, argnums=(1, 0))(t, s)
    expected = (jax.nn.softmax(s, -1) - jax.nn.softmax(t, -1)) / 5
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(expected), atol=1e-6)
    assert np.all(np.asarray(g_t) == 0)  # the teacher gets no gradient
    # With scores = q·p / τ, the gradient w.r.t. the raw dot products is divided by τ.
    tau = 3.0
    g_dot = jax.grad(lambda d: kl_teacher_student(t, d / tau))(s * tau)
    np.testing.assert_allclose(np.asarray(g_dot), np.asarray(expected) / tau, atol=1e-6)
    # KL ≥ 0 and = 0 for identical distributions; -inf teacher logits are handled.
    assert float(kl_teacher_student(s, s)) == pytest.approx(0.0, abs=1e-6)
    masked = t.at[:, 0].set(-jnp.inf)
    assert np.isfinite(float(kl_teacher_student(masked, s)))


def test_sparse_teacher_lookup():
    table_ids = jnp.array([[4, 2, -1], [7, -1, -1]])
    table_scores = jnp.array([[3.0, 1.5, 0.0], [2.0, 0.0, 0.0]])
    ids = jnp.array([[2, 5, 4], [7, 7, 1]])
    out = art.sparse_teacher_scores(table_ids, table_scores, ids)
    np.testing.assert_array_equal(np.asarray(out), [[1.5, 0.0, 3.0], [2.0, 2.0, 0.0]])


K, B, STEPS = 4, 8, 3


@pytest.fixture(scope="module")
def problem(tiny_bert, data_dir):
    data = load_eval_data(data_dir / "adi")
    corpus = data.corpus  # 82 real documents
    spec = de.EncoderSpec(pooling="mean", shared=False, max_query_length=16, max_passage_length=24)
    encoder, params, tok_folder = de.from_pretrained(tiny_bert, spec)
    tok = load_tokenizer(tok_folder)
    p_tokens = tokenize_passages(tok, corpus.titles, corpus.texts, 24, "pair")
    questions = data.query_texts[: B * STEPS]
    q_tokens = tokenize_queries(tok, questions, 16)
    bm25 = BM25(corpus, show_progress=False)
    scores, rows = bm25.retrieve(questions, 20)
    return encoder, params, p_tokens, q_tokens, rows.astype(np.int32), scores


def reference_run(encoder, params, p_tokens, q_tokens, t_ids, t_scores, embeddings, optimizer):
    """Single device, no sharding, numpy top-k and indexing: written independently of jaxret's
    index, gather and step code."""
    opt_state = optimizer.init(params)
    tau = np.sqrt(encoder.dim)
    losses = []
    for step in range(STEPS):
        sl = slice(step * B, (step + 1) * B)
        q_tok = {k: v[sl] for k, v in q_tokens.items()}
        q_now = np.asarray(encoder.embed(params, "query", q_tok), np.float64)
        s = q_now @ np.asarray(embeddings, np.float64).T  # exact: no BLAS rounding in the ranking
        order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :K]
        p_tok = {k: v[order.reshape(-1)] for k, v in p_tokens.items()}
        teacher = np.array(
            [
                [
                    t_scores[sl][b][list(t_ids[sl][b]).index(r)] if r in t_ids[sl][b] else 0.0
                    for r in order[b]
                ]
                for b in range(B)
            ],
            np.float32,
        )

        def loss_fn(p, q_tok=q_tok, p_tok=p_tok, teacher=teacher):
            q = encoder.embed(p, "query", q_tok)
            pe = encoder.embed(p, "passage", p_tok).reshape(B, K, -1)
            student = jnp.einsum("bd,bkd->bk", q, pe) / tau
            t = jax.nn.log_softmax(teacher)
            return jnp.mean(jnp.sum(jnp.exp(t) * (t - jax.nn.log_softmax(student)), -1))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    return params, losses


def token_tables(p_tokens, layout, mesh):
    """The passage token rows on the devices, in the index layout (zero padding rows)."""
    return {
        k: device_table(
            lambda s, e, v=v: np.pad(v, ((0, layout.padded_rows - len(v)), (0, 0)))[s:e],
            layout,
            mesh,
        )
        for k, v in p_tokens.items()
    }


def step_batch(step, q_tokens, t_ids, t_scores, mesh):
    """Global batch `step`: B questions in order with their sparse-teacher lists."""
    sl = slice(step * B, (step + 1) * B)
    local = {
        "query": {k: v[sl] for k, v in q_tokens.items()},
        "teacher_ids": t_ids[sl],
        "teacher_scores": t_scores[sl],
    }
    return global_batch(local, mesh)


# the replicated layout in make test-slow: fsdp_tensor exercises both mesh axes
@pytest.mark.parametrize(
    "mesh_shape,strategy",
    [pytest.param((8, 1), "replicated", marks=pytest.mark.slow), ((4, 2), "fsdp_tensor")],
)
def test_sharded_step_equals_single_device_reference(problem, mesh_shape, strategy):
    encoder, params, p_tokens, q_tokens, t_ids, t_scores = problem
    # SGD, not Adam: some gradients here are mathematically zero (attention key biases) and
    # Adam's m/√v turns their float noise (1e-13) into lr-sized steps, which no two reduction
    # orders can reproduce. The step's math and sharding are what this test pins down.
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.add_decayed_weights(0.1), optax.sgd(0.5)
    )
    embed_p = jax.jit(lambda p, t: encoder.embed(p, "passage", t))
    embeddings = np.asarray(embed_p(params, p_tokens))
    ref_params, ref_losses = reference_run(
        encoder, params, p_tokens, q_tokens, t_ids, t_scores, embeddings, optimizer
    )

    mesh = make_mesh(("data", "model"), mesh_shape)
    index = ShardedIndex.from_embeddings(embeddings, mesh, jnp.float32, chunk_rows=8)
    layout = RowLayout.for_mesh(len(embeddings), mesh, 8)
    assert layout == index.layout
    tables = token_tables(p_tokens, layout, mesh)
    cfg = art.ArtConfig(top_k=K, teacher="bm25", teacher_temperature=1.0, dropout=False)
    state = train_state.init_state(params, optimizer, seed=0)
    shardings = train_state.state_shardings(state, mesh, strategy)
    state = jax.device_put(state, shardings)
    batch_sh = NamedSharding(mesh, P("data"))
    in_sh = (
        shardings,
        None,
        jax.tree.map(lambda x: x.sharding, index),
        jax.tree.map(lambda _: row_sharding(mesh), tables),
        {},
        None,
    )
    losses = []
    step_fn = None
    for step in range(STEPS):
        batch = step_batch(step, q_tokens, t_ids, t_scores, mesh)
        if step_fn is None:
            in_sh = in_sh[:1] + (jax.tree.map(lambda _: batch_sh, batch),) + in_sh[2:]
            step_fn = art.make_train_step(encoder, optimizer, cfg, mesh, in_sh)
        state, metrics = step_fn(state, batch, index, tables, {}, None)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert max(ref_losses) > 1e-3  # the teacher really disagrees with the student
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
        state.params,
        ref_params,
    )
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params))
    )
    assert moved > 1e-4  # three steps really changed the parameters
    if strategy == "fsdp_tensor":
        specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
        assert any("model" in s or "data" in s for s in specs)


@pytest.mark.parametrize(
    "strategy", [pytest.param("replicated", marks=pytest.mark.slow), "fsdp_tensor"]
)
def test_fused_rolling_step_equals_step_then_separate_refresh(problem, strategy):
    """The rolling refresh inside the train step (one program, index and staleness donated)
    computes what the step followed by the separate refresh program computes: the same
    losses, parameters, index rows and staleness record, step after step."""
    encoder, params, p_tokens, q_tokens, t_ids, t_scores = problem
    optimizer = optax.sgd(0.5)
    mesh = make_mesh(("data", "model"), (4, 2) if strategy == "fsdp_tensor" else (8, 1))
    embeddings = np.asarray(jax.jit(lambda p, t: encoder.embed(p, "passage", t))(params, p_tokens))
    layout = RowLayout.for_mesh(len(embeddings), mesh, 8)
    tables = token_tables(p_tokens, layout, mesh)
    cfg = art.ArtConfig(top_k=K, teacher="bm25", teacher_temperature=1.0, dropout=False)
    refresh_every = 2
    roll_args = (encoder, mesh, layout, refresh_every, 4)
    runs = {}
    for program in ("separate", "fused"):
        index = ShardedIndex.from_embeddings(embeddings, mesh, jnp.float32, chunk_rows=8)
        stale = empty_staleness(layout, mesh)
        state = train_state.init_state(params, optimizer, seed=0)
        shardings = train_state.state_shardings(state, mesh, strategy)
        state = jax.device_put(state, shardings)
        step_fn, losses, encoded = None, [], []
        for step in range(STEPS):
            batch = step_batch(step, q_tokens, t_ids, t_scores, mesh)
            if step_fn is None:
                in_sh = (
                    shardings,
                    jax.tree.map(lambda _: NamedSharding(mesh, P("data")), batch),
                    jax.tree.map(lambda x: x.sharding, index),
                    jax.tree.map(lambda _: row_sharding(mesh), tables),
                    {},
                    None,
                )
                if program == "fused":
                    in_sh += (row_sharding(mesh),)
                    roll = rolling_update(*roll_args)
                    step_fn = art.make_train_step(encoder, optimizer, cfg, mesh, in_sh, None, roll)
                    compiled = step_fn.lower(state, batch, index, tables, {}, None, stale).compile()
                else:
                    step_fn = art.make_train_step(encoder, optimizer, cfg, mesh, in_sh)
                    separate = rolling_refresher(*roll_args)
            if program == "fused":
                state, metrics, index, stale = step_fn(state, batch, index, tables, {}, None, stale)
                stats = {k[len("refresh_") :]: v for k, v in metrics.items() if "refresh_" in k}
            else:
                state, metrics = step_fn(state, batch, index, tables, {}, None)
                emb, stale, stats = separate(
                    state.params, tables, index.embeddings, stale, step + 1
                )
                index = ShardedIndex(emb, layout, mesh)
            losses.append(float(metrics["loss"]))
            encoded.append(float(stats["encoded"]))
        runs[program] = (losses, state.params, np.asarray(index.embeddings), np.asarray(stale))
        runs[program + "_encoded"] = encoded

    (l_sep, p_sep, e_sep, s_sep), (l_fus, p_fus, e_fus, s_fus) = runs["separate"], runs["fused"]
    np.testing.assert_allclose(l_fus, l_sep, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p_fus, p_sep)
    np.testing.assert_allclose(e_fus, e_sep, atol=1e-5)
    np.testing.assert_array_equal(s_fus, s_sep)
    assert set(s_fus[: len(embeddings)]) == {2, 3}  # rows of step 1 were refreshed again at 3
    assert runs["fused_encoded"] == runs["separate_encoded"]
    assert sum(runs["fused_encoded"][:refresh_every]) == len(embeddings)
    # The refreshed rows really moved: step 3's parameters differ from the initial ones.
    assert np.abs(e_fus[: len(embeddings)] - embeddings).max() > 1e-3
    # In place: the index and the staleness record alias their outputs (donated, no copy).
    index_bytes = layout.padded_rows * encoder.dim * 4 // mesh.size
    assert compiled.memory_analysis().alias_size_in_bytes >= index_bytes


def test_t5_teacher_gets_no_gradient(tmp_path):
    from conftest import T5_TEXTS, save_tiny_t5

    from jaxret.teachers.t5_teacher import T5Teacher, TeacherSpec

    folder = save_tiny_t5(tmp_path / "t5", T5_TEXTS, gated=True)
    teacher = T5Teacher.from_pretrained(folder, "float32", TeacherSpec(max_passage_length=40))
    ids = np.random.RandomState(0).randint(3, 100, (2, 3, 40)).astype(np.int32)
    labels = np.random.RandomState(1).randint(3, 100, (2, 8)).astype(np.int32)
    grads = jax.grad(
        lambda tp: teacher.score_tokens(
            tp, ids, np.ones_like(ids), labels, np.ones_like(labels)
        ).sum()
    )(teacher.params)
    assert all(float(np.abs(np.asarray(g)).max()) == 0.0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("strategy", ["replicated", "fsdp"])
def test_in_step_t5_teacher_equals_t5teacher_score(problem, tmp_path, data_dir, strategy):
    """The teacher scores computed inside the sharded step (token rows gathered by the
    retrieved ids, labels repeated per passage, chunked) equal `T5Teacher.score` on the same
    questions and the same retrieved passages."""
    from conftest import T5_TEXTS, save_tiny_t5

    from jaxret.parallel.partitioning import param_shardings
    from jaxret.teachers import T5Teacher, TeacherSpec
    from jaxret.teachers import t5_teacher as tt

    encoder, params, p_tokens, q_tokens, _, _ = problem
    corpus = load_eval_data(data_dir / "adi").corpus
    questions = load_eval_data(data_dir / "adi").query_texts[:B]
    folder = save_tiny_t5(tmp_path / "t5", T5_TEXTS, gated=True)
    spec = TeacherSpec(max_passage_length=96, max_question_length=40, chunk_pairs=4)
    teacher = T5Teacher.from_pretrained(folder, "float32", spec)

    mesh = make_mesh(("data", "model"), (8, 1))
    embeddings = np.asarray(jax.jit(lambda p, t: encoder.embed(p, "passage", t))(params, p_tokens))
    index = ShardedIndex.from_embeddings(embeddings, mesh, jnp.float32, chunk_rows=8)
    layout = index.layout
    pad = lambda v: np.pad(v, ((0, layout.padded_rows - len(v)), (0, 0)))
    tables = {
        k: device_table(lambda s, e, v=v: pad(v)[s:e], layout, mesh)
        for k, v in p_tokens.items()
        if k != "attention_mask"
    }
    z = tt.tokenize_passages(teacher.tokenizer, corpus.titles, corpus.texts, spec)
    teacher_tables = {
        "input_ids": device_table(lambda s, e: pad(z["input_ids"])[s:e], layout, mesh)
    }
    target = tt.tokenize_questions(teacher.tokenizer, questions, spec)
    batch = global_batch({"query": {k: v[:B] for k, v in q_tokens.items()}, "target": target}, mesh)
    t_params = jax.device_put(teacher.params, param_shardings(teacher.params, mesh, strategy))
    cfg = art.ArtConfig(top_k=K, teacher="t5", dropout=False)
    fn = jax.jit(
        lambda p, b, i, pt, tt_, tp: art.art_logits(
            p,
            b,
            i,
            pt,
            tt_,
            tp,
            jax.random.key(0),
            encoder=encoder,
            cfg=cfg,
            mesh=mesh,
            teacher=teacher,
        )
    )
    _, in_step, ids = fn(params, batch, index, tables, teacher_tables, t_params)
    ids = np.asarray(ids)
    passages = [[{"title": corpus.titles[r], "text": corpus.texts[r]} for r in row] for row in ids]
    reference = teacher.score(questions, passages)
    np.testing.assert_allclose(np.asarray(in_step), reference, atol=1e-4)
    assert np.ptp(reference, axis=1).min() > 1e-3  # the teacher tells the passages apart
