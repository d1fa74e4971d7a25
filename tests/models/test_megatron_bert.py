"""Megatron-BERT (pre-LN) towers: parity with transformers' MegatronBertModel, export, and the
conversion of a Megatron retriever checkpoint (ART / MSS layout) into a jaxret export."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import minilm_path

from jaxret.models import dual_encoder as de
from jaxret.models import megatron_convert as mc
from jaxret.models.bert import BertModel
from jaxret.models.hf_bert import load_bert, save_bert

CONFIG = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    layer_norm_eps=1e-5,
)


def save_tiny_megatron(folder, seed=0):
    torch.manual_seed(seed)
    model = transformers.MegatronBertModel(transformers.MegatronBertConfig(**CONFIG)).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped norm shows
        for name, p in model.named_parameters():
            if "ln" in name.split("."):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(str(folder))
    return model


def padded_batch():
    r = np.random.RandomState(3)
    ids = r.randint(1000, 30000, (3, 14)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 7:] = 1
    return ids, mask, types


def torch_hidden(model, ids, mask, types):
    with torch.no_grad():
        out = model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        )
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.fixture(scope="module")
def megatron(tmp_path_factory):
    folder = tmp_path_factory.mktemp("megatron")
    return folder, save_tiny_megatron(folder)


def test_parity_with_pytorch_megatron_bert_fp32(megatron):
    folder, model = megatron
    ids, mask, types = padded_batch()
    ref_hidden, ref_pooled = torch_hidden(model, ids, mask, types)
    cfg, params, _ = load_bert(folder)
    assert cfg.pre_layer_norm and "final_norm" in params and "embeddings_norm" not in params
    hidden, pooled = jax.jit(BertModel(cfg).apply)({"params": params}, ids, mask, types)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(hidden)[valid] - ref_hidden[valid]).max() < 1e-5
    assert np.abs(np.asarray(pooled) - ref_pooled).max() < 1e-5
    bf16, _ = BertModel(cfg, dtype=jnp.bfloat16).apply({"params": params}, ids, mask, types)
    err = np.abs(np.asarray(bf16, np.float32)[valid] - ref_hidden[valid]).max()
    assert err < 0.1


def test_megatron_export_loads_in_pytorch(megatron, tmp_path):
    folder, model = megatron
    cfg, params, _ = load_bert(folder)
    save_bert(tmp_path / "out", cfg, params)
    again = transformers.AutoModel.from_pretrained(str(tmp_path / "out")).eval()
    assert type(again).__name__ == "MegatronBertModel"
    ids, mask, types = padded_batch()
    a, _ = torch_hidden(model, ids, mask, types)
    b, _ = torch_hidden(again, ids, mask, types)
    np.testing.assert_allclose(a, b, atol=1e-6)


def _fuse_qkv(q, k, v, heads, version):
    """The inverse of Megatron's view in ParallelAttention.forward, written from its code:
    version 0 stores rows as [3, heads, dim]; 1.0 (ART) as [heads, dim, 3]; 2.0 as
    [heads, 3, dim]."""
    d = q.shape[0] // heads
    rest = q.shape[1:]
    stack = np.stack([x.reshape((heads, d) + rest) for x in (q, k, v)])  # [3, H, D, ...]
    if version == 0:
        fused = stack
    elif version == 1.0:
        fused = np.moveaxis(stack, 0, 2)  # [H, D, 3, ...]
    else:
        fused = np.moveaxis(stack, 0, 1)  # [H, 3, D, ...]
    return torch.tensor(np.ascontiguousarray(fused).reshape((3 * heads * d,) + rest))


def megatron_language_model(hf_model, version, encoder_key="encoder"):
    """A Megatron `language_model` state dict (ART's DualEncoderModel layout) holding the
    weights of an HF MegatronBertModel."""
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    heads = hf_model.config.num_attention_heads
    layers = {}
    for i in range(hf_model.config.num_hidden_layers):
        hf = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (
                sd[f"{hf}attention.self.{n}.{kind}"].numpy() for n in ("query", "key", "value")
            )
            layers[f"layers.{i}.self_attention.query_key_value.{kind}"] = _fuse_qkv(
                q, k, v, heads, version
            )
            layers[f"layers.{i}.input_layernorm.{kind}"] = sd[f"{hf}attention.ln.{kind}"]
            layers[f"layers.{i}.self_attention.dense.{kind}"] = sd[
                f"{hf}attention.output.dense.{kind}"
            ]
            layers[f"layers.{i}.post_attention_layernorm.{kind}"] = sd[f"{hf}ln.{kind}"]
            layers[f"layers.{i}.mlp.dense_h_to_4h.{kind}"] = sd[f"{hf}intermediate.dense.{kind}"]
            layers[f"layers.{i}.mlp.dense_4h_to_h.{kind}"] = sd[f"{hf}output.dense.{kind}"]
    for kind in ("weight", "bias"):
        layers[f"final_layernorm.{kind}"] = sd[f"encoder.ln.{kind}"]
    embedding = {
        "word_embeddings": {"weight": sd["embeddings.word_embeddings.weight"].half()},  # fp16
        "position_embeddings": {"weight": sd["embeddings.position_embeddings.weight"]},
        "tokentype_embeddings": {"weight": sd["embeddings.token_type_embeddings.weight"]},
    }
    return {"language_model": {"embedding": embedding, encoder_key: layers}}


@pytest.mark.parametrize("version,nested", [(1.0, True), (0, False), (2.0, False)])
def test_convert_megatron_retriever_checkpoint(tmp_path, version, nested):
    torch.manual_seed(1)
    cfg = transformers.MegatronBertConfig(**CONFIG)
    query = transformers.MegatronBertModel(cfg, add_pooling_layer=False).eval()
    context = transformers.MegatronBertModel(cfg, add_pooling_layer=False).eval()
    towers = {
        "query_model": megatron_language_model(query, version),
        "context_model": megatron_language_model(
            context, version, "transformer" if version == 0 else "encoder"
        ),
    }
    model = {"retriever/biencoder_model": towers} if nested else towers  # an ART checkpoint
    args = argparse.Namespace(num_attention_heads=4, layernorm_epsilon=1e-5, openai_gelu=False)
    state = {"model": model, "args": args, "iteration": 100}
    if version:
        state["checkpoint_version"] = version
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000100" / "mp_rank_00").mkdir(parents=True)
    torch.save(state, ckpt / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("100")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    out = mc.convert(ckpt, tmp_path / "export", tok)

    # transformers loads each tower as the model it came from ...
    ids, mask, types = padded_batch()
    types[:] = 0
    for sub, ref in (("query_encoder", query), ("passage_encoder", context)):
        loaded = transformers.AutoModel.from_pretrained(str(out / sub)).eval()
        assert type(loaded).__name__ == "MegatronBertModel"
        with torch.no_grad():
            a = loaded(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
            b = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        # fp16 word embeddings round-trip through the checkpoint: compare in that precision.
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-3)
    # ... and jaxret loads the folder as ART's two-tower [CLS] dual encoder.
    encoder, params, _ = de.from_pretrained(out)
    assert encoder.spec.shared is False and encoder.spec.pooling == "cls"
    assert encoder.spec.passage_format == "pair" and encoder.bert.pre_layer_norm
    tokens = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    q = np.asarray(encoder.embed(params, "query", tokens))
    p = np.asarray(encoder.embed(params, "passage", tokens))
    with torch.no_grad():
        q_ref = query(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state[:, 0]
        p_ref = context(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state[
            :, 0
        ]
    np.testing.assert_allclose(q, q_ref.numpy(), atol=2e-3)
    np.testing.assert_allclose(p, p_ref.numpy(), atol=2e-3)
    assert np.abs(q - p).max() > 0.1  # the towers really are different


def test_convert_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(mc.CheckpointError, match="no Megatron checkpoint"):
        mc.checkpoint_file(tmp_path)
    torch.save({"model": {"language_model": {}}}, tmp_path / "x.pt")
    with pytest.raises(mc.CheckpointError, match="num_attention_heads"):
        mc.convert(tmp_path / "x.pt", tmp_path / "o", None)
    with pytest.raises(mc.CheckpointError, match="not a retriever"):
        mc.convert(tmp_path / "x.pt", tmp_path / "o", None, num_heads=4)


def test_cli_and_vocab_tokenizer(tmp_path):
    """`jaxret convert-megatron --vocab vocab.txt` builds Megatron's lower-case WordPiece
    tokenizer, equal to the HF tokenizer of the same vocabulary."""
    from jaxret import cli

    torch.manual_seed(2)
    model = transformers.MegatronBertModel(transformers.MegatronBertConfig(**CONFIG)).eval()
    lm = megatron_language_model(model, 1.0)
    state = {
        "model": {"query_model": lm, "context_model": lm},
        "args": argparse.Namespace(num_attention_heads=4),
        "checkpoint_version": 1.0,
    }
    torch.save(state, tmp_path / "model_optim_rng.pt")
    vocab = minilm_path() / "vocab.txt"
    code = cli.main(
        [
            "convert-megatron",
            "--checkpoint",
            str(tmp_path / "model_optim_rng.pt"),
            "--vocab",
            str(vocab),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out" / "query_encoder"))
    ref = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    texts = ["Who wrote Hamlet?", "ÉCOLE normale supérieure, 1794 — Paris"]
    assert ours(texts)["input_ids"] == ref(texts)["input_ids"]
    assert ours.cls_token_id == ref.cls_token_id and ours.pad_token_id == 0
