"""ART: Questions Are All You Need to Train a Dense Passage Retriever (Sachan et al.).

Variants:
  nq_t0_3b            the paper's NQ setting (ART's released scripts): batch 64, K 32, lr 2e-5,
                      AdamW (Megatron's decoupled decay) 0.1, warmup 1 %, linear decay, clip 1.0,
                      10 epochs, re-index every 500 steps, retriever seq 256, teacher seq 512, T0-3B
  nq_t5_xxl_lm_adapt  T5-XXL-LM-adapt teacher: K 16, batch 32, re-index every 1000 steps
  msmarco             MS MARCO questions: batch 512, K 8
  demo                `make demo`: bundled SQuAD-dev-open, real MiniLM towers, bm25 teacher, K 8
  demo_rolling        demo with art.refresh=rolling (benchmarks/refresh.py compares the two)
  tiny                seconds-long CPU runs for the tests (set model.name to a checkpoint)

The paper variants train on real training questions and never on evaluation questions:
  jaxret train --config=configs/art.py:nq_t0_3b --config.data.dir=DIR \
      --config.data.train_questions=DIR/qas/nq-train.csv \
      --config.data.dev_split=DIR/qas/nq-dev.csv --config.data.test_split=DIR/qas/nq-test.csv \
      --config.model.name=MSS_EXPORT --workdir=runs/nq
(DIR/corpus: data.dir holds psgs_w100.tsv as corpus.tsv or corpus.jsonl.)
"""

from pathlib import Path

import ml_collections

from jaxret.configlib import (
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
    c = run_config("art")
    # ART starts from MSS-pretrained BERT-base towers (separate question and passage towers);
    # pass a converted HF folder. ART trains in fp16 mixed precision with
    # --checkpoint-activations: bf16 compute (parameters, optimizer and losses stay fp32) and
    # both towers rematerialized.
    c.model = model_config(remat="both")
    c.data = ml_collections.ConfigDict(
        dict(
            dir="",  # corpus (corpus.jsonl or psgs_w100.tsv) + qa/<split> or qrels/<split>
            # "files": train on train_questions, select on dev_split, report test_split once.
            # "hash_split": demos/tests only, one question set split by a hash of the id.
            protocol="files",
            train_questions="",  # questions file (NQ: nq-train.csv, DPR QA csv or jsonl)
            train_qrels="",  # optional qrels of the training questions (oracle teacher)
            dev_split="dev",  # split name of dir (qa/dev.jsonl, qrels/dev.tsv) or a QA file
            test_split="test",  # "" = no final test
            split="test",  # hash_split: the question set that is split
            split_fractions=(0.8, 0.1, 0.1),  # hash_split: train/dev/test fractions
            max_docs=0,
            max_eval_queries=0,
            store="",  # tokenized corpus store (default: WORKDIR/store)
        )
    )
    c.encode = ml_collections.ConfigDict(
        dict(
            batch_size=256,  # host-path encoding (evaluation queries)
            device_batch=256,  # passages per device per step of the on-device corpus encoding
            # encoder calls per device between two SIGTERM checks of a whole-corpus encoding
            # (NQ on 16 A100s: 328 slices of ~1.5 s instead of one 8-minute program)
            calls_per_slice=16,
            index_dtype="bfloat16",
            chunk_rows=32768,
        )
    )
    # refresh: "sync" re-encodes the whole corpus every train.refresh_every steps (the paper's;
    # training waits); "rolling" re-encodes 1/refresh_every of every device's rows after each
    # step (same total work, no stall; rows are up to refresh_every − 1 steps old).
    # rolling_program: "separate" dispatches that slice as a second program right after the
    # step (measured 2.7 % faster per step on CPU: benchmarks/refresh.py programs); "fused"
    # runs it inside the jitted train step (one program, index donated).
    c.art = ml_collections.ConfigDict(
        dict(
            top_k=32,
            temperature_multiplier=1.0,
            dropout=True,
            refresh="sync",
            rolling_program="separate",
        )
    )
    c.teacher = ml_collections.ConfigDict(
        dict(
            kind="t5",  # t5 | bm25 | oracle
            model="bigscience/T0_3B",
            dtype="bfloat16",
            max_passage_length=512,
            max_question_length=128,  # ART: T0 tokenizer, max_length=128
            chunk_pairs=16,  # pairs per device per teacher forward (ART's --shard-size 16)
            param_sharding="fsdp",  # replicated | fsdp | tensor | fsdp_tensor
            remat=False,  # only matters when the T5 is differentiated (QGen's generator)
            temperature=1.0,  # divides bm25/oracle scores
            bm25_k1=1.2,
            bm25_b=0.75,
            bm25_top=1000,
            oracle_margin=10.0,
        )
    )
    c.optimizer = optimizer_config(weight_decay=0.1)
    c.train = train_config(refresh_every=500, eval_every=500, checkpoint_every=500)
    # index: dev evaluation on the "training" index as it is (its age reported; no stall,
    # no second index) or on a "fresh" scratch index (a corpus encoding and a second index
    # on the devices). The final test always encodes the corpus with the final parameters.
    # slices: a dev evaluation on the training index searches its queries over this many
    # steps (one slice after each), a stall of 1/slices of the search; the parameters
    # evaluated are kept (one more copy of them) until the last slice.
    # answer_workers: processes matching answers in the retrieved passages (DPR's has_answer,
    # QA data) while training goes on; -1: none on CPU devices, else half the host's
    # cores up to 8 (jaxret/eval/qa.py:workers_for).
    c.eval = ml_collections.ConfigDict(
        dict(
            metric="top20",
            at_start=True,
            test_at_end=True,
            test_baseline=True,
            index="training",
            slices=1,
            answer_workers=-1,
        )
    )
    return c


def nq_t0_3b(c: ml_collections.ConfigDict) -> None:
    """The base config as it is."""


def nq_t5_xxl_lm_adapt(c: ml_collections.ConfigDict) -> None:
    c.teacher.model = "google/t5-xxl-lm-adapt"
    c.art.top_k = 16
    c.train.update(batch_size=32, refresh_every=1000, eval_every=1000, checkpoint_every=1000)


def msmarco(c: ml_collections.ConfigDict) -> None:
    c.art.top_k = 8
    c.train.batch_size = 512
    c.eval.metric = "ndcg@10"


def demo(c: ml_collections.ConfigDict) -> None:
    # SQuAD-dev-open has one question set: the demo splits it by id hash (and says so).
    c.data.update(
        dir=str(ROOT / "data" / "squad-dev-open"),
        protocol="hash_split",
        max_docs=800,
        max_eval_queries=300,
    )
    c.model.update(
        name=minilm_path(),
        shared=True,
        pooling="mean",
        normalize=True,
        passage_format="join",
        # 64 tokens keeps a step near 1.6 s on 2 CPU cores (passages average ~95 tokens).
        max_query_length=24,
        max_passage_length=64,
        dtype="float32",  # XLA:CPU has no fast bf16 matmul
        remat="none",
    )
    # Unit-norm MiniLM embeddings: τ = 0.0025·√384 ≈ 0.05, a usual contrastive temperature.
    c.art.update(top_k=8, temperature_multiplier=0.0025)
    c.teacher.update(kind="bm25", temperature=2.0)
    c.optimizer.update(lr=2e-5, warmup_fraction=0.05)
    c.encode.update(batch_size=64, device_batch=32, index_dtype="float32", chunk_rows=4096)
    c.train.update(steps=200, batch_size=4, refresh_every=50, eval_every=100, checkpoint_every=100)


def demo_rolling(c: ml_collections.ConfigDict) -> None:
    """The demo's run, the index refreshed in slices."""
    demo(c)
    c.art.refresh = "rolling"


def tiny(c: ml_collections.ConfigDict) -> None:
    c.data.update(
        dir=str(ROOT / "data" / "squad-dev-open"),
        protocol="hash_split",
        max_docs=120,
        max_eval_queries=40,
    )
    c.model.update(
        name="",
        shared=True,
        pooling="cls",
        max_query_length=16,
        max_passage_length=32,
        dtype="float32",
        remat="none",
    )
    c.art.update(top_k=4, dropout=False)
    c.teacher.update(kind="oracle", max_passage_length=64, max_question_length=24, chunk_pairs=4)
    c.optimizer.update(lr=1e-3, warmup_fraction=0.1)
    c.encode.update(batch_size=32, device_batch=8, index_dtype="float32", chunk_rows=16)
    c.train.update(**tiny_train(steps=6, refresh_every=2, eval_every=3, checkpoint_every=3))


VARIANTS = {
    "nq_t0_3b": nq_t0_3b,
    "nq_t5_xxl_lm_adapt": nq_t5_xxl_lm_adapt,
    "msmarco": msmarco,
    "demo": demo,
    "demo_rolling": demo_rolling,
    "tiny": tiny,
}


def get_config(arg=None):
    return with_variant(base(), VARIANTS, arg or "nq_t0_3b")
