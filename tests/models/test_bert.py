import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxret.models import hf_io
from jaxret.models.bert import BertModel
from jaxret.models.hf_bert import load_bert


def _padded_batch():
    r = np.random.RandomState(1)
    ids = r.randint(1000, 30000, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 6:] = 1
    return ids, mask, types


def _torch_hidden(folder, ids, mask, types):
    model = transformers.BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        )
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_parity_with_pytorch_fp32_padded(tiny_bert):
    ids, mask, types = _padded_batch()
    ref_hidden, ref_pooled = _torch_hidden(tiny_bert, ids, mask, types)
    cfg, params, _ = load_bert(tiny_bert)
    hidden, pooled = jax.jit(BertModel(cfg).apply)({"params": params}, ids, mask, types)
    valid = mask.astype(bool)
    assert np.abs(np.asarray(hidden)[valid] - ref_hidden[valid]).max() < 1e-5
    assert np.abs(np.asarray(pooled) - ref_pooled).max() < 1e-5


def test_bf16_compute_and_remat_close(tiny_bert):
    ids, mask, types = _padded_batch()
    cfg, params, _ = load_bert(tiny_bert)
    ref, _ = BertModel(cfg).apply({"params": params}, ids, mask, types)
    bf16, _ = BertModel(cfg, dtype=jnp.bfloat16).apply({"params": params}, ids, mask, types)
    remat, _ = BertModel(cfg, remat=True).apply({"params": params}, ids, mask, types)
    assert bf16.dtype == jnp.bfloat16
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(remat), np.asarray(ref), atol=1e-6)
    err = np.abs(np.asarray(bf16, np.float32)[valid] - np.asarray(ref)[valid]).max()
    assert 0 < err < 0.1


def test_dropout_active_only_with_rng(tiny_bert):
    ids, mask, types = _padded_batch()
    cfg, params, _ = load_bert(tiny_bert)
    model = BertModel(cfg)
    a, _ = model.apply({"params": params}, ids, mask, types)
    b, _ = model.apply(
        {"params": params},
        ids,
        mask,
        types,
        deterministic=False,
        rngs={"dropout": jax.random.key(1)},
    )
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_unexpected_misshaped_tensors_are_named(tiny_bert, tmp_path):
    tensors = load_file(str(tiny_bert / "model.safetensors"))

    missing = _copy(tiny_bert, tmp_path / "missing")
    t = dict(tensors)
    del t["encoder.layer.1.output.dense.bias"]
    save_file(t, str(missing / "model.safetensors"))
    with pytest.raises(hf_io.CheckpointError, match="encoder.layer.1.output.dense.bias"):
        load_bert(missing)

    unexpected = _copy(tiny_bert, tmp_path / "unexpected")
    t = dict(tensors, **{"encoder.layer.9.extra.weight": np.zeros(3, np.float32)})
    save_file(t, str(unexpected / "model.safetensors"))
    with pytest.raises(hf_io.CheckpointError, match="encoder.layer.9.extra.weight"):
        load_bert(unexpected)

    misshaped = _copy(tiny_bert, tmp_path / "misshaped")
    t = dict(tensors)
    t["encoder.layer.0.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
    save_file(t, str(misshaped / "model.safetensors"))
    with pytest.raises(hf_io.CheckpointError, match="encoder.layer.0.intermediate.dense.weight"):
        load_bert(misshaped)


def test_sharded_index_prefixed_and_gamma_beta_names(tiny_bert, tmp_path):
    """A `bert.`-prefixed, gamma/beta-named checkpoint split over two shards loads the same."""
    tensors = load_file(str(tiny_bert / "model.safetensors"))
    renamed = {
        "bert."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in tensors.items()
    }
    renamed["cls.predictions.bias"] = np.zeros(30522, np.float32)  # pre-training head: ignored
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(tiny_bert / "config.json", folder / "config.json")
    names = sorted(renamed)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: renamed[k] for k in keys}, str(folder / shard))
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, a, _ = load_bert(tiny_bert)
    _, b, _ = load_bert(folder)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_offline_hub_id_error_says_how_to_pass_a_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(hf_io.CheckpointError, match="local"):
        load_bert("nonexistent-org/nonexistent-model")


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(hf_io.CheckpointError, match="neither"):
        load_bert(str(tmp_path / "does" / "not" / "exist"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(hf_io.CheckpointError, match="model.safetensors"):
        load_bert(tmp_path)


def test_unsupported_architecture_is_refused(tiny_bert, tmp_path):
    folder = _copy(tiny_bert, tmp_path / "rel")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="relative_key"):
        load_bert(folder)


def test_hub_repo_with_only_pytorch_model_bin_loads(tiny_bert, tmp_path, monkeypatch):
    """A hub id whose repo ships only `pytorch_model.bin` (many BERT-era checkpoints) loads
    from the Hugging Face cache, through torch.load(weights_only=True)."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--old-bert" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in tiny_bert.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, snapshot / f.name)
    model = transformers.BertModel.from_pretrained(str(tiny_bert))
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert hf_io.resolve_checkpoint("someone/old-bert") == snapshot
    cfg, params, folder = load_bert("someone/old-bert")
    ref_cfg, ref_params, _ = load_bert(tiny_bert)
    assert folder == snapshot and cfg == ref_cfg
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    # Both present: safetensors is read, the pickle never opened.
    shutil.copy(tiny_bert / "model.safetensors", snapshot / "model.safetensors")
    (snapshot / "pytorch_model.bin").write_bytes(b"not a pickle")
    jax.tree.map(np.testing.assert_array_equal, load_bert("someone/old-bert")[1], ref_params)
    with pytest.raises(hf_io.CheckpointError, match="empty"):
        load_bert("")


def test_hub_download_fetches_pickles_only_without_safetensors(tiny_bert, tmp_path, monkeypatch):
    """Online: the first download asks for config/tokenizer/safetensors; a repo without
    safetensors gets a second download that includes `pytorch_model*.bin`."""
    import fnmatch

    import huggingface_hub

    remote = tmp_path / "remote"
    shutil.copytree(tiny_bert, remote, ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(
        transformers.BertModel.from_pretrained(str(tiny_bert)).state_dict(),
        remote / "pytorch_model.bin",
    )
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **_):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        if local_files_only:
            raise FileNotFoundError("not cached")
        out = tmp_path / "cache" / str(len(calls))
        out.mkdir(parents=True)
        for f in remote.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = hf_io.resolve_checkpoint("someone/bin-only")
    assert (folder / "pytorch_model.bin").is_file()
    assert [c[2] for c in calls] == [True, False, True, False]
    assert not any("*.bin" in p or "pytorch_model" in p for p in calls[1][1])  # safetensors first
    assert "pytorch_model*.bin" in calls[3][1]
    cfg, params, _ = load_bert("someone/bin-only")
    jax.tree.map(np.testing.assert_array_equal, params, load_bert(tiny_bert)[1])


def test_distilbert_parity_and_export(tmp_path):
    """DistilBERT (LaPraDoR's initialisation): no token types, its own tensor names."""
    from conftest import minilm_path

    from jaxret.models.hf_bert import save_bert

    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(
        vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128
    )
    model = transformers.DistilBertModel(cfg).eval()
    model.save_pretrained(tmp_path / "distil")
    transformers.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(
        str(tmp_path / "distil")
    )
    ids, mask, _ = _padded_batch()
    with torch.no_grad():
        ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    ours_cfg, params, _ = load_bert(tmp_path / "distil")
    assert ours_cfg.family == "distilbert" and "token_type_embeddings" not in params
    hidden, pooled = BertModel(ours_cfg).apply({"params": params}, ids, mask)
    valid = mask.astype(bool)
    assert pooled is None and np.abs(np.asarray(hidden)[valid] - ref[valid]).max() < 1e-5
    save_bert(tmp_path / "out", ours_cfg, params)
    again = transformers.AutoModel.from_pretrained(str(tmp_path / "out")).eval()
    assert type(again).__name__ == "DistilBertModel"
    with torch.no_grad():
        out = again(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(out, ref, atol=1e-6)
