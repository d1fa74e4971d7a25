"""SPAR: Salient Phrase Aware Dense Retrieval (Chen et al.) — training the lexical model Λ.

Λ is a dense retriever trained to imitate BM25: queries are sentences of the corpus, BM25's
top 10 of 50 are positives, its bottom 5 of 50 hard negatives, DPR's contrastive loss.
Combine Λ with any dense retriever at evaluation time:
  jaxret eval --data DIR --model BASE --lexical-model W --mu auto --tune-split dev

Variants:
  wiki     the paper's Wiki Λ: 37M sentences of the DPR Wikipedia passages (pseudo-exponential
           sampling), BERT-base, lr 3e-5, batch 32 × 64 GPUs, 20 epochs
  msmarco  MS MARCO Λ: every sentence of the passage collection as a query
  demo     `jaxret train --config=configs/spar.py:demo --workdir W`: the bundled SQuAD corpus,
           MiniLM initialisation, a few minutes on 2 CPU cores
  tiny     seconds-long runs for the tests (set model.name)
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
    c = run_config("spar")
    # DPR's two towers. dpr-scale tokenizes queries and passages with one transform,
    # max_seq_len 256 (dpr_scale/conf/task/transform/hf_transform.yaml:4); Λ's queries are
    # sentences.
    c.model = model_config(max_query_length=256)
    c.data = ml_collections.ConfigDict(
        dict(
            # the corpus whose sentences train Λ: a data folder or a corpus file (no queries
            # needed); a folder's `eval_split` questions, if any, compare before / after
            dir="",
            eval_split="test",  # questions of `dir` for the final before/after comparison
            max_eval_queries=0,
            store="",  # token tables, sampled sentences, BM25 labels (default WORKDIR/store)
        )
    )
    c.queries = ml_collections.ConfigDict(
        dict(
            mode="auto",  # auto | pseudo_exponential | uniform | all
            base=1.2,  # passage i of a document gives max(1, round(n / (base · (i + 1))))
            splitter="sentencex",  # sentencex | moses (SPAR's sentence-splitter)
            language="en",
            min_chars=20,  # shorter fragments are not queries
            dev=2000,  # held-out sentences for the surrogate MRR (at most 10 %)
            # the paper's validation (§4.1): a questions file (NQ dev for a Wiki Λ, MS MARCO
            # dev for a MARCO Λ) whose BM25 top-1 is the positive; "" = held-out sentences
            dev_questions="",
        )
    )
    # The teacher: Pyserini's BM25 (dpr-scale spar/README.md:48: top 50 per query, top 10
    # positives, bottom 5 hard negatives) with Pyserini's defaults, k1 0.9, b 0.4 and Lucene's
    # English analyzer.
    c.labels = ml_collections.ConfigDict(
        dict(top_k=50, positives=10, negatives=5, bm25_k1=0.9, bm25_b=0.4, bm25_analyzer="english")
    )
    # The contrastive loss scores as model.similarity / model.scale do (one scale per model).
    c.spar = ml_collections.ConfigDict(dict(dropout=True, hard_negatives=1))
    c.encode = ml_collections.ConfigDict(dict(batch_size=256, chunk_rows=32768))
    c.optimizer = optimizer_config(lr=3e-5, clip_norm=2.0)
    c.train = train_config(epochs=20, batch_size=2048)  # 32 per GPU × 64 GPUs
    c.eval = ml_collections.ConfigDict(dict(at_start=True, test_at_end=True))
    return c


def wiki(c: ml_collections.ConfigDict) -> None:
    c.queries.mode = "pseudo_exponential"


def msmarco(c: ml_collections.ConfigDict) -> None:
    c.queries.mode = "all"
    c.model.passage_format = "join"


def demo(c: ml_collections.ConfigDict) -> None:
    c.data.update(dir=str(ROOT / "data" / "squad-dev-open"), max_eval_queries=1000)
    # Λ keeps MiniLM's own embedding (mean, unit norm) and learns with cosine × 20, so its
    # scores live on the scale of the MiniLM it is combined with and μ ∈ [0.1, 10] fits.
    c.model.update(
        name=minilm_path(),
        shared=False,
        **cosine_mean_encoder(),
        # 32 + 96 tokens (the paper: 256 + 256) and batch 16 keep a step near 2.5 s on 2
        # CPU cores.
        max_query_length=32,
        max_passage_length=96,
        dtype="float32",
    )
    c.queries.update(dev=300)
    # docs/spar.md's demo numbers were measured with this teacher (k1 1.2, b 0.75, no
    # stemming or stop words), not the paper's Pyserini settings above.
    c.labels.update(bm25_k1=1.2, bm25_b=0.75, bm25_analyzer="none")
    c.optimizer.update(lr=5e-5, warmup_fraction=0.05)
    c.encode.update(batch_size=64, chunk_rows=4096)
    c.train.update(steps=200, batch_size=16, eval_every=100, checkpoint_every=100)


def tiny(c: ml_collections.ConfigDict) -> None:
    c.data.update(dir=str(ROOT / "data" / "adi"), max_eval_queries=20)
    c.model.update(
        name="", max_query_length=16, max_passage_length=32, dtype="float32", shared=True
    )
    c.queries.update(dev=20, min_chars=5)
    c.optimizer.update(lr=1e-3, warmup_fraction=0.1)
    c.encode.update(batch_size=32, chunk_rows=16)
    c.train.update(**tiny_train(steps=6, eval_every=3, checkpoint_every=3))


VARIANTS = {
    "wiki": wiki,
    "msmarco": msmarco,
    "demo": demo,
    "tiny": tiny,
}


def get_config(arg=None):
    return with_variant(base(), VARIANTS, arg or "wiki")
