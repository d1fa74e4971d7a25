"""ART's data protocol: train on training questions, select on dev, report test once."""

import json
import logging

import pytest

from jaxret.configlib import ConfigError, load_config
from jaxret.data.readers import DataError
from jaxret.methods.art.data import load_art_data
from jaxret.methods.art.runner import train


def _beir_with_splits(tmp_path, data_dir):
    """squad-dev-open's corpus with two QA files written as dev and test splits."""
    from jaxret.data.readers import read_qa_jsonl

    qa = read_qa_jsonl(data_dir / "squad-dev-open" / "qa" / "test.jsonl")
    folder = tmp_path / "nq_like"
    (folder / "qa").mkdir(parents=True)
    (folder / "corpus.jsonl.gz").symlink_to(data_dir / "squad-dev-open" / "corpus.jsonl.gz")
    for name, rows in (("dev", qa[:30]), ("test", qa[30:70])):
        with open(folder / "qa" / f"{name}.jsonl", "w") as f:
            for e in rows:
                f.write(
                    json.dumps({"id": e.id, "question": e.question, "answers": e.answers}) + "\n"
                )
    train_file = tmp_path / "train.csv"  # DPR QA csv, as nq-train.csv
    train_file.write_text("".join(f"{e.question}\t{e.answers!r}\n" for e in qa[100:160]))
    return folder, train_file, qa


def test_files_protocol_keeps_train_dev_test_apart(tmp_path, data_dir, caplog):
    folder, train_file, qa = _beir_with_splits(tmp_path, data_dir)
    cfg = load_config(
        "configs/art.py:nq_t0_3b",
        [("data.dir", str(folder)), ("data.train_questions", str(train_file))],
    )
    data = load_art_data(cfg.data)
    assert data.train_questions == [e.question for e in qa[100:160]]
    assert data.dev.query_ids == [e.id for e in qa[:30]]
    assert data.test.query_ids == [e.id for e in qa[30:70]]
    assert len(data.corpus) == 3526 and data.dev.corpus is data.test.corpus  # read once
    # A QA file path works as a split too, and an overlap with the training set is reported.
    cfg.data.dev_split = str(folder / "qa" / "dev.jsonl")
    cfg.data.train_questions = str(folder / "qa" / "dev.jsonl")
    with caplog.at_level(logging.WARNING):
        data = load_art_data(cfg.data)
    assert data.dev.query_ids == [e.id for e in qa[:30]]
    assert "30 of the 30 dev questions also appear verbatim among the training" in caplog.text


def test_paper_variants_refuse_to_start_without_training_questions(tmp_path, data_dir):
    folder, _, _ = _beir_with_splits(tmp_path, data_dir)
    for variant in ("nq_t0_3b", "nq_t5_xxl_lm_adapt", "msmarco"):
        cfg = load_config(f"configs/art.py:{variant}", [("data.dir", str(folder))])
        with pytest.raises(DataError, match="data.train_questions is empty"):
            train(cfg, tmp_path / variant)
    cfg = load_config(
        "configs/art.py:nq_t0_3b",
        [("data.dir", str(folder)), ("data.train_questions", "x"), ("data.test_split", "dev")],
    )
    with pytest.raises(DataError, match="cannot also be the one reported"):
        load_art_data(cfg.data)


def test_hash_split_says_what_it_is(data_dir, caplog):
    cfg = load_config("configs/art.py:demo")
    with caplog.at_level(logging.WARNING):
        data = load_art_data(cfg.data)
    assert "data.protocol=hash_split" in caplog.text and "for demos and tests" in caplog.text
    train_ids = set(data.train_ids)
    assert not train_ids & set(data.dev.query_ids) and not train_ids & set(data.test.query_ids)
    assert not set(data.dev.query_ids) & set(data.test.query_ids)


def test_tiny_without_model_name_names_the_key(tmp_path):
    cfg = load_config("configs/art.py:tiny")
    with pytest.raises(ConfigError, match="model.name is empty"):
        train(cfg, tmp_path)
