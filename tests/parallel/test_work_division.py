"""The ART step with a T5 teacher divides its work over 8 devices, proven on the compiled
program: matmul FLOPs per device (loops counted × their trip count) ≈ 1/8 of the one-device
program, for teacher sharding replicated, fsdp and tensor; under fsdp no activation-sized
all-reduce (weights are all-gathered instead)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxret.data.tokenization import load_tokenizer, tokenize_passages, tokenize_queries
from jaxret.eval.evaluate import load_eval_data
from jaxret.index.gather import device_table
from jaxret.index.mips import row_sharding
from jaxret.index.sharded import ShardedIndex
from jaxret.methods.art import step as art
from jaxret.models import dual_encoder as de
from jaxret.parallel import global_batch, make_mesh
from jaxret.parallel.activations import Activations
from jaxret.parallel.compiled import program
from jaxret.parallel.partitioning import param_shardings
from jaxret.teachers import T5Teacher, TeacherSpec
from jaxret.teachers import t5_teacher as tt
from jaxret.train import state as train_state
from jaxret.train.optim import make_optimizer

B, K, LP, LT, LQ = 8, 4, 24, 96, 40


@pytest.fixture(scope="module")
def parts(tiny_bert, tmp_path_factory, data_dir):
    from conftest import T5_TEXTS, save_tiny_t5

    t5 = save_tiny_t5(tmp_path_factory.mktemp("t5"), T5_TEXTS, gated=True)
    data = load_eval_data(data_dir / "adi")
    return tiny_bert, t5, data


def compile_step(parts, mesh, student, teacher_strategy, chunk, sharded_teacher=True):
    bert, t5, data = parts
    corpus = data.corpus
    spec = de.EncoderSpec(pooling="mean", shared=False, max_query_length=16, max_passage_length=LP)
    enc, params, tok_folder = de.from_pretrained(bert, spec)
    enc = enc.with_activations(Activations.for_strategy(mesh, student))
    tok = load_tokenizer(tok_folder)
    p_tokens = tokenize_passages(tok, corpus.titles, corpus.texts, LP, "pair")
    q_tokens = tokenize_queries(tok, data.query_texts[:B], 16)
    tspec = TeacherSpec(max_passage_length=LT, max_question_length=LQ, chunk_pairs=chunk)
    teacher = T5Teacher.from_pretrained(t5, "float32", tspec)
    if sharded_teacher:
        teacher = teacher.on_mesh(mesh, teacher_strategy)
        t_params = teacher.params
    else:
        t_params = jax.device_put(
            teacher.params, param_shardings(teacher.params, mesh, teacher_strategy)
        )
    emb = np.random.RandomState(0).randn(len(corpus), enc.dim).astype(np.float32)
    index = ShardedIndex.from_embeddings(emb, mesh, jnp.float32, chunk_rows=128)
    pad = lambda v: np.pad(v, ((0, index.layout.padded_rows - len(v)), (0, 0)))
    tables = {
        "input_ids": device_table(lambda s, e: pad(p_tokens["input_ids"])[s:e], index.layout, mesh)
    }
    z = tt.tokenize_passages(teacher.tokenizer, corpus.titles, corpus.texts, tspec)
    t_tables = {
        "input_ids": device_table(lambda s, e: pad(z["input_ids"])[s:e], index.layout, mesh)
    }
    target = tt.tokenize_questions(teacher.tokenizer, data.query_texts[:B], tspec)
    batch = global_batch({"query": q_tokens, "target": target}, mesh)
    opt_cfg = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-3,
            warmup_fraction=0.1,
            weight_decay=0.1,
            clip_norm=1.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
        )
    )
    optimizer = make_optimizer(opt_cfg, 10)
    state = train_state.init_state(params, optimizer, 0)
    shardings = train_state.state_shardings(state, mesh, student)
    state = jax.device_put(state, shardings)
    in_shardings = (
        shardings,
        jax.tree.map(lambda _: NamedSharding(mesh, P("data")), batch),
        jax.tree.map(lambda x: x.sharding, index),
        jax.tree.map(lambda _: row_sharding(mesh), tables),
        jax.tree.map(lambda _: row_sharding(mesh), t_tables),
        jax.tree.map(lambda x: x.sharding, t_params),
    )
    cfg = art.ArtConfig(top_k=K, teacher="t5", dropout=False)
    step = art.make_train_step(enc, optimizer, cfg, mesh, in_shardings, teacher)
    return program(step.lower(state, batch, index, tables, t_tables, t_params).compile())


CASES = [
    # (teacher sharding, mesh, student sharding)
    pytest.param("replicated", (8, 1), "fsdp", marks=pytest.mark.slow),
    ("fsdp", (8, 1), "fsdp"),
    ("tensor", (4, 2), "fsdp_tensor"),
]


@pytest.mark.parametrize("teacher_strategy,mesh_shape,student", CASES)
def test_flops_per_device_divide_by_eight(parts, teacher_strategy, mesh_shape, student):
    # Same number of teacher chunks in both programs: 2 pairs per device per chunk on 8
    # devices, 16 pairs per chunk on one (32 pairs = 2 chunks either way).
    one = make_mesh(("data", "model"), (1, 1), devices=jax.devices()[:1])
    single = compile_step(parts, one, student, teacher_strategy, chunk=16).dot_flops()
    eight = compile_step(
        parts, make_mesh(("data", "model"), mesh_shape), student, teacher_strategy, chunk=2
    )
    per_device = eight.dot_flops()
    assert per_device <= 1.2 * single / 8, (per_device, single / 8)
    if teacher_strategy == "fsdp":
        # An activation of one teacher chunk is ≥ 2 pairs × 40 target tokens × d_model 32.
        activation = 2 * LQ * 32
        big = [c for c in eight.collectives() if c.op == "all-reduce" and c.largest() >= activation]
        assert not big, big[:3]
        gathers = [c for c in eight.collectives() if c.op == "all-gather"]
        assert gathers  # the sharded weights are gathered per layer


@pytest.mark.slow  # the checks' own mutation test: minutes of compiles, run in make test-slow
def test_the_checks_catch_a_teacher_that_does_not_divide(parts):
    """Without activation sharding (the old code path) the same checks fail: the teacher's
    chunks are gathered onto every device and FSDP all-reduces activations."""
    one = make_mesh(("data", "model"), (1, 1), devices=jax.devices()[:1])
    single = compile_step(parts, one, "fsdp", "fsdp", 16, sharded_teacher=False).dot_flops()
    eight = compile_step(
        parts, make_mesh(("data", "model"), (8, 1)), "fsdp", "fsdp", 2, sharded_teacher=False
    )
    assert eight.dot_flops() > 2 * single / 8
    assert any(c.op == "all-reduce" and c.largest() >= 2 * LQ * 32 for c in eight.collectives())
