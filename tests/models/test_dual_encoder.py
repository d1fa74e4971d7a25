import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxret.data.tokenization import load_tokenizer, tokenize_passages, tokenize_queries
from jaxret.models import dual_encoder as de


def _torch_mean_pooled(folder, tokens):
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        hidden = model(
            input_ids=torch.tensor(tokens["input_ids"]),
            attention_mask=torch.tensor(tokens["attention_mask"]),
            token_type_ids=torch.tensor(tokens["token_type_ids"]),
        ).last_hidden_state.numpy()
    m = tokens["attention_mask"][..., None].astype(np.float32)
    emb = (hidden * m).sum(1) / m.sum(1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


MINILM_SPEC = dict(pooling="mean", normalize=True, passage_format="join", max_passage_length=256)


@pytest.fixture(scope="module")
def minilm_tokens(minilm, real_texts):
    return tokenize_queries(load_tokenizer(minilm), real_texts, max_length=256)


@pytest.mark.parametrize("dtype,min_cos", [("float32", 0.99999), ("bfloat16", 0.999)])
def test_minilm_parity_on_real_texts(minilm, minilm_tokens, dtype, min_cos):
    assert len(minilm_tokens["input_ids"]) == 64
    ref = _torch_mean_pooled(minilm, minilm_tokens)
    enc, params, _ = de.from_pretrained(minilm, de.EncoderSpec(**MINILM_SPEC, dtype=dtype))
    emb = np.asarray(jax.jit(lambda p, t: enc.embed(p, "query", t))(params, minilm_tokens))
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > min_cos, cos.min()


def test_export_round_trip_loads_in_pytorch(minilm, minilm_tokens, tmp_path):
    enc, params, tok_folder = de.from_pretrained(minilm, de.EncoderSpec(**MINILM_SPEC))
    folders = de.export(enc, params, tmp_path / "out", load_tokenizer(tok_folder))
    assert set(folders) == {"shared"}
    ours = np.asarray(enc.embed(params, "passage", minilm_tokens))
    theirs = _torch_mean_pooled(folders["shared"], minilm_tokens)
    assert np.abs(ours - theirs).max() < 1e-5
    # The export is itself a jaxret model: it reloads with its spec.
    enc2, params2, _ = de.from_pretrained(tmp_path / "out")
    assert enc2.spec == enc.spec
    assert np.abs(np.asarray(enc2.embed(params2, "query", minilm_tokens)) - ours).max() < 1e-6


def test_separate_towers_dense_tanh_is_the_pooler(tiny_bert, tmp_path):
    spec = de.EncoderSpec(shared=False, projection="dense_tanh", passage_format="hf_pair")
    enc, params, tok_folder = de.from_pretrained(tiny_bert, spec)
    assert set(params) == {"query", "passage"}
    # Train-like divergence of the towers, then export both and compare with torch pooler_output.
    params["passage"] = jax.tree.map(lambda x: x * 1.01, params["passage"])
    tok = load_tokenizer(tok_folder)
    tokens = tokenize_passages(
        tok, ["Title a", ""], ["some text here", "more text"], 24, spec.passage_format
    )
    assert tokens["token_type_ids"][0].max() == 1  # HF sentence pair: the text has type 1
    folders = de.export(enc, params, tmp_path / "two", tok)
    for tower in ("query", "passage"):
        ours = np.asarray(enc.embed(params, tower, tokens))
        model = transformers.AutoModel.from_pretrained(str(folders[tower])).eval()
        with torch.no_grad():
            ref = model(**{k: torch.tensor(v) for k, v in tokens.items()}).pooler_output.numpy()
        assert np.abs(ours - ref).max() < 1e-5
    q = enc.embed(params, "query", tokens)
    p = enc.embed(params, "passage", tokens)
    assert np.abs(np.asarray(q) - np.asarray(p)).max() > 1e-4  # towers really are separate


def test_cosine_similarity_scales_unit_vectors(tiny_bert):
    enc, params, tok_folder = de.from_pretrained(
        tiny_bert, de.EncoderSpec(similarity="cosine", scale=20.0)
    )
    tokens = tokenize_queries(load_tokenizer(tok_folder), ["a query", "another one"], 16)
    q = enc.embed(params, "query", tokens)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q), axis=1), 1.0, rtol=1e-6)
    s = np.asarray(enc.score(q, q))
    np.testing.assert_allclose(np.diag(s), 20.0, rtol=1e-5)


def test_spec_rejects_unknown_choices():
    with pytest.raises(ValueError, match="pooling"):
        de.EncoderSpec(pooling="max")
    with pytest.raises(ValueError, match="passage_format"):
        de.EncoderSpec(passage_format="concat")


def test_tokenizer_shapes_and_truncation(minilm):
    tok = load_tokenizer(minilm)
    out = tokenize_passages(tok, ["t"] * 3, ["word " * 100, "x", "y z"], 16, "join", batch_size=2)
    assert {k: v.shape for k, v in out.items()} == {
        "input_ids": (3, 16),
        "attention_mask": (3, 16),
        "token_type_ids": (3, 16),
    }
    assert out["input_ids"].dtype == np.int32
    assert out["attention_mask"][0].sum() == 16 and out["input_ids"][0, -1] == tok.sep_token_id
    assert out["attention_mask"][1].sum() == 4  # [CLS] t x [SEP]
    assert jnp.asarray(out["token_type_ids"]).max() == 0
