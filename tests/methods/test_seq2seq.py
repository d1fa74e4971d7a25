"""Generator fine-tuning step: the loss is transformers' own, and the sharded step is the
single-device step."""

import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxret.methods import seq2seq as gen_step
from jaxret.methods.qgen.generator import tokenize_targets
from jaxret.models.seq2seq import load_generator
from jaxret.parallel import global_batch, make_mesh
from jaxret.train import state as train_state

PASSAGES = [
    "the eiffel tower was built in 1889 for the world fair in paris france",
    "photosynthesis converts light energy into chemical energy in plants",
    "the bowling hall of fame is located in arlington texas",
    "a short one",
    "mount everest is the highest mountain above sea level on earth",
    "the mitochondria is the powerhouse of the cell",
    "python is a programming language created by guido van rossum",
    "water boils at one hundred degrees celsius at sea level",
]
QUERIES = [
    "when was the eiffel tower built",
    "what does photosynthesis convert",
    "where is the bowling hall of fame",
    "what",
    "highest mountain",
    "what is the powerhouse of the cell",
    "who created python",
    "boiling point of water",
]


def batch_of(tokenizer, pad_id):
    src = tokenizer(PASSAGES, padding="max_length", max_length=20, truncation=True)
    source = {
        "input_ids": np.asarray(src["input_ids"], np.int32),
        "attention_mask": np.asarray(src["attention_mask"], np.int32),
    }
    source["input_ids"][source["attention_mask"] == 0] = pad_id
    return {"source": source, "target": tokenize_targets(tokenizer, QUERIES, 12)}


@pytest.fixture(params=["bart", "t5"])
def generator_folder(request, tiny_generator, tiny_t5):
    return tiny_generator if request.param == "bart" else tiny_t5


def test_loss_equals_transformers_loss(generator_folder):
    generator, params, tokenizer, _ = load_generator(generator_folder)
    batch = batch_of(tokenizer, generator.config.pad_token_id)
    loss, metrics = gen_step.generator_loss(
        params, batch, jax.random.key(0), generator=generator, dropout=False
    )
    tgt = batch["target"]
    labels = np.where(tgt["attention_mask"] == 1, tgt["input_ids"], -100)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(generator_folder)).eval()
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(batch["source"]["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["source"]["attention_mask"], dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
        ).loss
    np.testing.assert_allclose(float(loss), float(ref), rtol=2e-5)
    assert float(metrics["tokens"]) == tgt["attention_mask"].sum()


# the replicated layout in make test-slow: fsdp_tensor exercises both mesh axes
@pytest.mark.parametrize(
    "mesh_shape,strategy",
    [pytest.param((8, 1), "replicated", marks=pytest.mark.slow), ((4, 2), "fsdp_tensor")],
)
def test_sharded_step_equals_single_device(tiny_generator, mesh_shape, strategy):
    generator, params, tokenizer, _ = load_generator(tiny_generator)
    batch = batch_of(tokenizer, generator.config.pad_token_id)
    optimizer = optax.adamw(1e-3)

    ref_params, opt_state, ref_losses = params, optimizer.init(params), []
    for _ in range(2):
        (loss, _), grads = jax.value_and_grad(gen_step.generator_loss, has_aux=True)(
            ref_params, batch, jax.random.key(0), generator=generator, dropout=False
        )
        updates, opt_state = optimizer.update(grads, opt_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        ref_losses.append(float(loss))

    mesh = make_mesh(("data", "model"), mesh_shape)
    state = train_state.init_state(jax.tree.map(np.array, params), optimizer, 0)
    shardings = train_state.state_shardings(state, mesh, strategy)
    state = jax.device_put(state, shardings)
    placed = global_batch(batch, mesh)
    in_sh = (shardings, jax.tree.map(lambda _: NamedSharding(mesh, P("data")), placed))
    step = gen_step.make_train_step(generator, optimizer, mesh, in_sh, dropout=False)
    losses = []
    for _ in range(2):
        state, metrics = step(state, placed)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[1] < losses[0]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
        state.params,
        ref_params,
    )
    if strategy == "fsdp_tensor":  # the embedding really is split over the devices
        emb = state.params["shared"]["embedding"]
        assert emb.addressable_shards[0].data.size < emb.size
