"""LaPraDoR (Xu et al.): unsupervised pretraining with Iterative Contrastive Learning (ICT +
dropout positives, alternating towers, a cache queue), evaluated with LEDR (cosine × BM25).

Variants:
  c4     the paper's main run: DistilBERT init, AdamW 2e-4, batch 256 × 16 GPUs, query / doc
         length 64 / 350, 1M steps, switch every 100, queue 100k, mean pooling, shared towers
  wiki   the paper's ablation setting: Wikipedia, 100k steps
  wiki_in_batch, wiki_moco   its Table 2 baselines: In-Batch (shared; no queue, no
         alternation) and MoCo (a momentum key tower, θ_D ← 0.999·θ_D + 0.001·θ_Q, and its queue)
  demo   `jaxret train --config=configs/lapradoor.py:demo --workdir W`: the bundled corpora
         (medline, cranfield, cisi), MiniLM init, a few minutes on 2 CPU cores
  tiny   seconds-long runs for the tests (set model.name)

Ablations (the paper's Table 2 switches): --config.icol.ict=false (DaPI only),
--config.icol.dapi=false (ICT only), --config.icol.use_queue=false (in-batch negatives only),
--config.icol.shared=false (two towers).
LaPraDoR-FT (supervised fine-tuning on MS MARCO with mined hard negatives, as BEIR's
train_msmarco_v3) is the shared supervised retriever stage: configs/qgen.py:lapradoor_ft.
Evaluate a result with LEDR on any BEIR folder:
  jaxret eval --data DIR --model W --retriever ledr --bm25-depth 1000 --json
"""

from pathlib import Path

import ml_collections

from jaxret.configlib import (
    cosine_mean_encoder,
    minilm_path,
    model_config,
    optimizer_config,
    run_config,
    tiny_train,
    train_config,
    with_variant,
)

ROOT = Path(__file__).resolve().parents[1]


def base():
    c = run_config("lapradoor")
    # ICoL keeps two towers (icol.shared ties them at every switch).
    c.model = model_config(
        name="distilbert-base-uncased", **cosine_mean_encoder(), max_passage_length=350
    )
    c.data = ml_collections.ConfigDict(
        dict(
            # comma-separated corpora to pretrain on: data folders or corpus files (C4,
            # Wikipedia: corpus.jsonl / psgs_w100.tsv, no queries needed)
            dir="",
            # comma-separated BEIR folders evaluated before / after at the end (their
            # `eval_split` queries and qrels); "" = none
            eval_dir="",
            eval_split="test",
            max_eval_queries=0,
            store="",  # corpus text and sentence counts (default WORKDIR/store)
            splitter="sentencex",
            ict_remove_prob=1.0,  # LaPraDoR removes the query sentence from its document
        )
    )
    c.icol = ml_collections.ConfigDict(
        dict(
            switch_every=100,
            lam=1.0,
            queue_size=100_000,
            ict=True,
            dapi=True,
            use_queue=True,
            shared=True,
            method="icol",  # or the paper's baselines: in_batch, moco (methods/lapradoor/step.py)
            momentum=0.999,  # moco's m
        )
    )
    c.encode = ml_collections.ConfigDict(dict(batch_size=256))
    c.optimizer = optimizer_config(lr=2e-4, weight_decay=0.01)
    c.train = train_config(
        steps=1_000_000,
        epochs=0,
        batch_size=4096,  # 256 per GPU × 16 GPUs
        eval_every=10**9,
        checkpoint_every=5000,
    )
    # Queries and documents encoded up to 350 tokens for evaluation, as the authors' code
    # (JetRunner/LaPraDoR code/laprador.py:17-18); 0 = the training lengths.
    # LEDR's BM25: BEIR's Elasticsearch one (english analyzer, k1 1.2, b 0.75; hybrid.LEDR_BM25).
    c.eval = ml_collections.ConfigDict(
        dict(test_at_end=True, bm25_depth=1000, max_length=350, bm25_analyzer="english")
    )
    return c


def c4(c: ml_collections.ConfigDict) -> None:
    """The base config as it is."""


def wiki(c: ml_collections.ConfigDict) -> None:
    c.train.steps = 100_000


def wiki_in_batch(c: ml_collections.ConfigDict) -> None:
    """Table 2's In-Batch (shared): no queue, no alternation"""
    c.train.steps = 100_000
    c.icol.update(method="in_batch", use_queue=False, shared=True)


def wiki_moco(c: ml_collections.ConfigDict) -> None:
    """Table 2's MoCo: a momentum key tower and its queue"""
    c.train.steps = 100_000
    c.icol.update(method="moco", shared=False)


def demo(c: ml_collections.ConfigDict) -> None:
    data = ROOT / "data"
    sets = ",".join(str(data / n) for n in ("medline", "cranfield", "cisi"))
    c.data.update(dir=sets, eval_dir=sets)
    c.model.update(name=minilm_path(), max_query_length=32, max_passage_length=128, dtype="float32")
    c.icol.update(switch_every=25, queue_size=2048)
    c.optimizer.update(lr=2e-5, warmup_fraction=0.05)
    c.encode.update(batch_size=64)
    c.train.update(steps=200, batch_size=16, checkpoint_every=100)
    c.eval.max_length = 0  # the training lengths (128): the demo's CPU budget
    c.eval.bm25_analyzer = "none"  # as docs/lapradoor.md's demo numbers were measured


def tiny(c: ml_collections.ConfigDict) -> None:
    adi = str(ROOT / "data" / "adi")
    c.data.update(dir=adi, eval_dir=adi, max_eval_queries=10)
    c.model.update(name="", max_query_length=16, max_passage_length=32, dtype="float32")
    c.icol.update(switch_every=2, queue_size=64)
    c.optimizer.update(lr=1e-3, warmup_fraction=0.1)
    c.encode.update(batch_size=32)
    c.train.update(**tiny_train(steps=6, checkpoint_every=3))
    c.eval.max_length = 0


VARIANTS = {
    "c4": c4,
    "wiki": wiki,
    "wiki_in_batch": wiki_in_batch,
    "wiki_moco": wiki_moco,
    "demo": demo,
    "tiny": tiny,
}


def get_config(arg=None):
    return with_variant(base(), VARIANTS, arg or "c4")
