"""Flax BART against transformers' BartForConditionalGeneration: logits in fp32 and bf16,
tied and untied heads, with and without final_logits_bias, and the export round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxret.models.bart import Bart
from jaxret.models.hf_bart import load_bart, save_bart


def save_tiny_bart(folder, tied=True, bias=True, seed=0):
    """A random BART saved by PyTorch transformers, with a BPE-free tokenizer-less config
    (token ids are used directly)."""
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(
        vocab_size=120,
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=40,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        dropout=0.0,
    )
    model = transformers.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        if bias:
            model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias))
        if not tied:
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.05)
        for name, p in model.named_parameters():  # non-trivial layer norms
            if "layer_norm" in name or "layernorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def batch():
    r = np.random.RandomState(0)
    ids = r.randint(3, 120, (3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 1
    dec = r.randint(3, 120, (3, 6)).astype(np.int32)
    dec[:, 0] = 2
    return ids, mask, dec


def torch_logits(model, ids, mask, dec):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
        ).logits.numpy()


@pytest.mark.parametrize("tied,bias", [(True, True), (True, False), (False, True)])
def test_parity_with_pytorch(tmp_path, tied, bias):
    model = save_tiny_bart(tmp_path, tied, bias)
    ids, mask, dec = batch()
    ref = torch_logits(model, ids, mask, dec)
    cfg, params, _ = load_bart(tmp_path)
    assert cfg.tie_word_embeddings == tied and ("lm_head" in params) == (not tied)
    ours = np.asarray(jax.jit(Bart(cfg).apply)({"params": params}, ids, mask, dec))
    assert np.abs(ours - ref).max() < 1e-4
    cfg16, params16, _ = load_bart(tmp_path, dtype="bfloat16")
    bf16 = np.asarray(Bart(cfg16, dtype=jnp.bfloat16).apply({"params": params16}, ids, mask, dec))
    assert bf16.dtype == np.float32 and np.abs(bf16 - ref).max() < 0.15
    # Cached step-by-step decoding gives the teacher-forced logits.
    m = Bart(cfg)
    apply = lambda fn, *a: m.apply({"params": params}, *a, method=fn)
    encoded = apply(Bart.encode, ids, mask)
    cache, cross = apply(Bart.init_cache, encoded, dec.shape[1])
    for t in range(dec.shape[1]):
        step_logits, cache = apply(
            Bart.decode_step, jnp.asarray(dec[:, t]), jnp.int32(t), cache, cross, mask
        )
        np.testing.assert_allclose(np.asarray(step_logits), ref[:, t], atol=1e-4)


def test_export_round_trip(tmp_path):
    model = save_tiny_bart(tmp_path / "src", tied=True, bias=True)
    cfg, params, _ = load_bart(tmp_path / "src")
    save_bart(tmp_path / "out", cfg, params)
    again = transformers.BartForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask, dec = batch()
    np.testing.assert_allclose(
        torch_logits(again, ids, mask, dec), torch_logits(model, ids, mask, dec), atol=1e-5
    )
