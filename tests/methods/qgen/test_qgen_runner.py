"""QGen on the shared loop: the tiny domain-adaptation chain end to end (generator → synthetic
queries → retriever with a d-sized tanh head), its exports, and the ICT two-tower baseline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxret.configlib import load_config
from jaxret.eval.evaluate import load_eval_data
from jaxret.methods.qgen import generator, retriever
from jaxret.methods.qgen import pairs as qpairs
from jaxret.methods.qgen import runner as qgen
from jaxret.models import dual_encoder as de
from jaxret.models.seq2seq import load_generator
from jaxret.train.batching import epoch_batch
from jaxret.train.loop import run


def rows(workdir, kind):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_read_pairs_takes_every_positive_judgement(data_dir):
    pairs = qpairs.read_pairs(data_dir / "adi", "test")
    data = load_eval_data(data_dir / "adi", "test")
    positives = sum(1 for j in data.qrels.values() for r in j.values() if r > 0)
    assert len(pairs.queries) == len(pairs.rows) == positives
    first = data.query_ids[0]
    docs = sorted(d for d, r in data.qrels[first].items() if r > 0)
    assert [pairs.corpus.ids[r] for r in pairs.rows[: len(docs)]] == docs
    assert pairs.queries[0] == data.query_texts[0]


def test_tokenize_targets_keeps_the_end_token(tiny_bert):
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    t = generator.tokenize_targets(tok, ["one two three four five six", "one"], 5)
    assert t["input_ids"][0].tolist() == tok("one two three four five six")["input_ids"][:4] + [
        tok.sep_token_id
    ]
    assert t["attention_mask"].sum(1).tolist() == [5, 3]


def test_adapt_chain_end_to_end(tiny_bert, tmp_path):
    cfg = load_config(
        "configs/qgen.py:tiny",
        [("model.name", str(tiny_bert)), ("generator.tokenizer", str(tiny_bert))],
    )
    summary = qgen.train(cfg, tmp_path)

    # 1. The generator trained on the loop: dev cross-entropy at 0, 2 and 4, and went down.
    gen_dev = rows(tmp_path / "generator", "dev")
    assert [r["step"] for r in gen_dev] == [0, 2, 4]
    assert gen_dev[-1]["dev_loss"] < gen_dev[0]["dev_loss"]
    best = json.loads((tmp_path / "generator" / "best" / "best.json").read_text())
    assert best["metric"] == "dev_loss"
    assert best["value"] == min(r["dev_loss"] for r in gen_dev)  # lower is better
    # Its export is an HF folder PyTorch loads, with our logits.
    folder = tmp_path / "generator" / "export"
    gen, params, tok, _ = load_generator(folder)
    hf = transformers.BartForConditionalGeneration.from_pretrained(str(folder)).eval()
    ids = np.asarray(tok(["a passage about indexing"])["input_ids"], np.int32)
    dec = np.asarray([[tok.sep_token_id, tok.cls_token_id, 2054]], np.int32)
    ours = gen.model.apply({"params": params}, ids, np.ones_like(ids), dec, None, True)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec)).logits
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-4)

    # 2. Synthetic queries for the target corpus, as a BEIR folder.
    synthetic = Path(summary["synthetic"])
    data = load_eval_data(synthetic, "train")
    assert len(data.corpus) == 82 and 0 < len(data.query_ids) <= 82 * 2
    assert summary["generator"].endswith("best_export")  # generated with the best-by-dev

    # 3. The retriever: trained on them, evaluated on adi's real queries (dev / test split).
    ret = tmp_path / "retriever"
    assert [r["step"] for r in rows(ret, "train")] == [1, 2, 3, 4]
    assert [r["step"] for r in rows(ret, "dev")] == [0, 2, 4]
    assert {"ndcg@10", "recall@100"} <= set(summary["test_after"])
    assert summary["test_after"]["num_queries"] == summary["test_before"]["num_queries"]
    # The paper's head: [CLS] → dense(8) → tanh, exported beside the tower.
    head = load_file(str(ret / "export" / "encoder" / "projection.safetensors"))
    assert head["kernel"].shape == (32, 8) and head["bias"].shape == (8,)
    encoder, loaded, tok_folder = de.from_pretrained(ret / "export")
    assert encoder.dim == 8 and encoder.spec.projection_dim == 8
    np.testing.assert_array_equal(loaded["shared"]["projection"]["kernel"], head["kernel"])
    initial = json.loads((ret / "config.json").read_text())
    assert initial["model.projection_dim"] == 8


# In make test-slow (~33 s end to end); the two-tower contrastive step is checked against one
# device in tests/methods/test_contrastive.py.
@pytest.mark.slow
def test_ict_baseline_trains_two_towers(tiny_bert, tmp_path):
    cfg = load_config(
        "configs/qgen.py:tiny",
        [
            ("model.name", str(tiny_bert)),
            ("qgen.stage", "retriever"),
            ("qgen.pairs", "ict"),
            ("model.shared", "false"),
            ("model.projection_dim", "0"),
            ("data.train_dir", str(Path(cfg_root()) / "data" / "adi")),
            ("eval.test_at_end", "false"),
        ],
    )
    qgen.train(cfg, tmp_path)
    train = rows(tmp_path, "train")
    assert len(train) == 4 and all(r["candidates"] == 8 for r in train)  # in-batch only
    encoder, params, _ = de.from_pretrained(tmp_path / "export")
    assert set(params) == {"query", "passage"} and encoder.dim == 32
    assert "pooler" in params["query"]  # dense_tanh at the hidden size is BERT's pooler
    a, b = params["query"]["pooler"]["kernel"], params["passage"]["pooler"]["kernel"]
    assert not np.array_equal(a, b)  # two towers, trained apart


def cfg_root():
    return Path(__file__).resolve().parents[3]


def test_lapradoor_ft_trains_on_mined_hard_negatives(tiny_bert, tmp_path):
    """`configs/qgen.py:lapradoor_ft` (LaPraDoR-FT, BEIR's train_msmarco_v3) on adi with a
    mined-negatives file: every batch row is (one of the query's positives, one of its hard
    negatives), the negative changes with the epoch, and the contrastive step trains on
    B·2 candidates. Fails if the hard negatives are not read into the batch (1 candidate
    per query) or a row pairs a query with another query's passages."""
    import gzip
    import shutil

    root = tmp_path / "msmarco-like"
    (root / "qrels").mkdir(parents=True)
    adi = cfg_root() / "data" / "adi"
    for name in ("corpus.jsonl.gz", "queries.jsonl.gz"):
        shutil.copy(adi / name, root / name)
    shutil.copy(adi / "qrels" / "test.tsv.gz", root / "qrels" / "train.tsv.gz")
    data = load_eval_data(root, "train")
    rng = np.random.default_rng(0)
    lines = []
    for qid in data.query_ids:
        pos = [d for d, r in data.qrels[qid].items() if r > 0]
        others = [d for d in data.corpus.ids if d not in pos]
        negs = rng.choice(others, 4, replace=False).tolist()
        lines.append(
            {
                "qid": qid,
                "pos": [{"pid": p, "ce-score": 9.0} for p in pos],
                "neg": {"bm25": [{"pid": n, "ce-score": 0.0} for n in negs]},
            }
        )
    mined = tmp_path / "hard.jsonl.gz"
    with gzip.open(mined, "wt") as f:
        f.write("\n".join(json.dumps(x) for x in lines))
    cfg = load_config(
        "configs/qgen.py:lapradoor_ft",
        [
            ("model.name", str(tiny_bert)),
            ("model.max_query_length", "16"),
            ("model.max_passage_length", "32"),
            ("model.dtype", "float32"),
            ("data.train_dir", str(root)),
            ("data.hard_negatives", str(mined)),
            ("data.dir", ""),  # no evaluation: the batches and the step are under test
            ("train.batch_size", "8"),
            ("train.epochs", "0"),
            ("train.steps", "2"),
            ("train.progress", "false"),
            ("optimizer.warmup_steps", "1"),
            ("eval.test_at_end", "false"),
        ],
    )
    runner = retriever.RetrieverRun(cfg, tmp_path / "run")
    n = len(runner.items)
    assert n == len(data.query_ids)
    for step in (0, n // 8 + 1):  # epoch 0 and epoch 1
        batch = runner.batch_at(step)
        rows = np.asarray(batch["passage_rows"])
        assert rows.shape == (8, 2)
        idx = epoch_batch(runner.items, step, 8, [cfg.seed, 9])
        epoch = step * 8 // n
        for i, (pos_row, neg_row) in zip(idx, rows):
            pos, neg = runner.mined[i]
            assert pos_row == pos[epoch % len(pos)] and neg_row == neg[epoch % len(neg)]
    summary = run(cfg, runner, tmp_path / "run")  # the runner above, trained
    train = [
        r
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]
    assert len(train) == 2 and all(r["candidates"] == 16 for r in train)
    assert "final_step_loss" in summary
