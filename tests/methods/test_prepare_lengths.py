"""`jaxret prepare` tokenizes for the lengths the training run will use."""

import importlib
import json

import pytest

from jaxret.configlib import load_config
from jaxret.data import corpus_store


@pytest.mark.parametrize("module,runner", [("art", "ArtRun"), ("spar", "SparRun")])
def test_prepare_tokenizes_for_the_lengths_the_run_uses(
    tiny_bert, tmp_path, monkeypatch, module, runner
):
    """model.max_passage_length beyond the model's position table: the run cuts it to the
    table (as sentence-transformers does), and `prepare` builds the passage table for that
    cut length, reading only the model's config.json, so the run opens the prepared table
    instead of tokenizing again (a multi-process run would refuse to start). Fails if
    prepare fingerprints the config's uncapped length (the run then calls build_table)."""
    positions = json.loads((tiny_bert / "config.json").read_text())["max_position_embeddings"]
    cfg = load_config(
        f"configs/{module}.py:tiny",
        [
            ("model.name", str(tiny_bert)),
            ("model.max_passage_length", str(positions + 50)),
            ("data.store", str(tmp_path / "store")),
        ],
    )
    run_module = importlib.import_module(f"jaxret.methods.{module}.runner")
    tables = run_module.prepare(cfg, tmp_path / "w", 1)
    assert tables["passages"].max_length == positions

    def no_build(*a, **k):
        raise AssertionError("the run tokenized the corpus again")

    monkeypatch.setattr(corpus_store, "build_table", no_build)
    run = getattr(run_module, runner)(cfg, tmp_path / "w")
    assert run.encoder.spec.max_passage_length == positions
