"""QGen (Liang et al., "Embedding-based Zero-shot Retrieval through Query Generation").

Stages (qgen.stage): `generator` fine-tunes a T5 / BART query generator on (passage → query)
pairs; `retriever` trains a siamese (model.shared=true) or two-tower BERT retriever with
in-batch sampled softmax on a BEIR folder of pairs (`jaxret generate` output) or on ICT pairs
(qgen.pairs=ict); `adapt` chains generator → `jaxret generate` on the target corpus →
retriever → the target's real test queries before / after.

Variants:
  generator_msmarco  the paper's generator: BART-large on MS MARCO positive pairs, 5 epochs,
                     batch 96, lr 3e-5, warmup 0.1 (set generator.data.dir to a BEIR MS MARCO)
  wikigq             the paper's pretraining: BERT-base siamese, [CLS] → dense → tanh, on the
                     synthetic WikiGQ pairs (data.train_dir), batch 100 × 32 GPUs, lr 5e-5,
                     warmup 0.1, 10 epochs (model.shared=false: two-tower;
                     model.projection_dim=d: the embedding-size ablation; qgen.pairs=ict with
                     train.epochs=50: the ICT baseline)
  adapt              domain adaptation: a trained generator (generator.name) writes queries
                     for data.dir's corpus; the retriever (model.name) is fine-tuned on them
                     (lr 3e-5, batch 50 × 8 GPUs, 10 epochs)
  demo               `jaxret train --config=configs/qgen.py:demo --workdir W`, offline, under
                     15 minutes on 2 CPU cores: a small BART trained from scratch on the
                     bundled SQuAD pairs writes queries for cranfield; MiniLM is adapted on
                     them and compared with itself on cranfield's held-out test queries
  tiny               seconds-long runs for the tests (set model.name, generator.tokenizer)
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


def _optimizer(lr: float) -> ml_collections.ConfigDict:
    return optimizer_config(lr=lr, warmup_fraction=0.1, weight_decay=0.01)


def _train(batch_size: int, epochs: int) -> ml_collections.ConfigDict:
    return train_config(
        batch_size=batch_size, epochs=epochs, eval_every=2000, checkpoint_every=2000
    )


def base():
    c = run_config("qgen")
    c.qgen = ml_collections.ConfigDict(
        dict(
            stage="adapt",  # generator | retriever | adapt
            pairs="qrels",  # retriever pairs: qrels of data.train_dir, or ict on its corpus
            dropout=True,  # the contrastive loss scores as model.similarity / model.scale do
        )
    )
    # The retriever: BERT-base, [CLS] → dense → tanh (BERT's pooler when projection_dim is
    # 0 or the hidden size; a fresh head of that size otherwise), dot product.
    c.model = model_config(
        shared=True, projection="dense_tanh", projection_dim=0
    )  # siamese; shared=False: two-tower
    c.generator = ml_collections.ConfigDict(
        dict(
            name="",  # HF T5 / BART folder or hub id ("" + tokenizer: BART from scratch)
            tokenizer="",  # a tokenizer folder for a generator trained from scratch
            scratch=ml_collections.ConfigDict(
                dict(
                    d_model=256,
                    encoder_layers=2,
                    decoder_layers=2,
                    encoder_attention_heads=4,
                    decoder_attention_heads=4,
                    encoder_ffn_dim=1024,
                    decoder_ffn_dim=1024,
                    max_position_embeddings=512,
                )
            ),
            dtype="float32",
            remat=False,
            dropout=True,
            max_input_length=512,  # passage tokens (title + " " + text, EOS kept)
            max_target_length=64,  # query tokens when training
            prefix="",  # put before every passage (e.g. a T5 task prefix)
            use_best=True,  # adapt: generate with the best-by-dev generator
            data=ml_collections.ConfigDict(
                dict(
                    dir="",  # BEIR folder of (passage → query) pairs; "" = do not train
                    split="train",
                    dev_pairs=2000,  # held out for the dev token cross-entropy
                )
            ),
            train=_train(96, 5),
            optimizer=_optimizer(3e-5),
        )
    )
    c.generate = ml_collections.ConfigDict(
        dict(
            decoding="nucleus",  # nucleus | top_k | beam | greedy
            num_samples=10,
            keep=5,  # the 5 most likely of the 10 samples, then duplicates removed (Liang et al.)
            length_normalized=False,  # rank by the summed log-likelihood, as the paper
            top_p=0.95,
            top_k=0,
            temperature=1.0,  # of the sampled decodings (nucleus, top_k)
            num_beams=5,
            max_length=64,  # generated tokens, EOS included
            batch_size=64,
            shard_size=1024,
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            train_dir="",  # retriever pairs: a BEIR folder (queries + qrels/<train_split>)
            train_split="train",
            splitter="sentencex",  # ICT sentences
            ict_remove_prob=0.9,  # the paper's ICT: the sentence leaves its passage 90 % of time
            dir="",  # the target: its real queries select (dev) and report (test)
            test_split="test",
            dev_split="",  # a split name of dir, or
            dev_fraction=0.0,  # test queries held out by id hash for model selection
            max_eval_queries=0,
            store="",  # token tables (default WORKDIR/store)
            # Supervised pairs with mined hard negatives (sentence-transformers'
            # msmarco-hard-negatives.jsonl.gz format; "" = in-batch negatives only): a
            # negative within ce_score_margin of the positives' cross-encoder score is
            # dropped, negatives_per_system per mining system (BEIR's train_msmarco_v3).
            hard_negatives="",
            ce_score_margin=3.0,
            negatives_per_system=5,
        )
    )
    c.encode = ml_collections.ConfigDict(dict(batch_size=256, chunk_rows=65536))
    c.optimizer = _optimizer(5e-5)
    c.train = _train(3200, 10)  # 100 per GPU × 32 GPUs
    c.eval = ml_collections.ConfigDict(dict(test_at_end=True, metric="ndcg@10", at_start=True))
    return c


def generator_msmarco(c: ml_collections.ConfigDict) -> None:
    c.qgen.stage = "generator"
    c.generator.update(name="facebook/bart-large", dtype="bfloat16", max_input_length=512)


def wikigq(c: ml_collections.ConfigDict) -> None:
    c.qgen.stage = "retriever"


def lapradoor_ft(c: ml_collections.ConfigDict) -> None:
    # LaPraDoR-FT: the pretrained LaPraDoR fine-tuned on MS MARCO as BEIR's
    # train_msmarco_v3 (beir-cellar/beir examples/retrieval/training/
    # train_msmarco_v3.py:59-65, 165, 182-184): batch 75, 350 tokens, in-batch + one mined
    # hard negative per query (CE margin 3, 5 per system), MultipleNegativesRankingLoss
    # (cosine × 20), 10 epochs, 1000 warmup steps, AdamW lr 2e-5 (sentence-transformers'
    # default). Set model.name (the LaPraDoR export), data.train_dir (BEIR msmarco),
    # data.hard_negatives and data.dir (the evaluation set).
    c.qgen.update(stage="retriever", pairs="qrels")
    c.model.update(
        name="",
        shared=True,
        **cosine_mean_encoder(),
        max_query_length=350,
        max_passage_length=350,
    )
    c.data.update(train_split="train", dev_split="dev")
    c.optimizer = _optimizer(2e-5)
    c.optimizer.update(warmup_fraction=0.0, warmup_steps=1000)
    c.train = _train(75, 10)


def adapt(c: ml_collections.ConfigDict) -> None:
    c.generator.update(name="BeIR/query-gen-msmarco-t5-base-v1", max_input_length=350)
    c.optimizer.update(lr=3e-5)
    c.train.update(batch_size=400, epochs=10)  # 50 per GPU × 8 GPUs


def demo(c: ml_collections.ConfigDict) -> None:
    data = ROOT / "data"
    c.generator.update(
        tokenizer=minilm_path(),
        max_input_length=96,
        max_target_length=24,
        use_best=True,
    )
    c.generator.scratch.update(
        d_model=128,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        max_position_embeddings=128,
    )
    c.generator.data.update(dir=str(data / "squad-dev-open"), split="test", dev_pairs=500)
    c.generator.optimizer.update(lr=1e-3, warmup_fraction=0.05)
    c.generator.train.update(
        steps=300, epochs=0, batch_size=32, eval_every=150, checkpoint_every=150
    )
    # 5 samples, keep 3, ≤ 20 tokens (the paper: 10, keep 5, 64): the demo's time budget.
    c.generate.update(num_samples=5, keep=3, max_length=20, batch_size=64, shard_size=256)
    c.model.update(
        name=minilm_path(),
        **cosine_mean_encoder(),
        max_query_length=32,
        max_passage_length=128,
        dtype="float32",
    )
    # No dev split: with one evaluation at the end there is nothing to select, so all
    # 225 cranfield queries are the test set (baseline = the same MiniLM, untrained).
    c.data.update(dir=str(data / "cranfield"), dev_fraction=0.0)
    c.encode.update(batch_size=64)
    c.optimizer.update(lr=2e-5)
    c.train.update(steps=80, epochs=0, batch_size=16, eval_every=80, checkpoint_every=80)


def tiny(c: ml_collections.ConfigDict) -> None:
    data = ROOT / "data" / "adi"
    c.model.update(
        name="", projection_dim=8, max_query_length=16, max_passage_length=32, dtype="float32"
    )
    c.generator.update(max_input_length=32, max_target_length=12)
    c.generator.scratch.update(
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    c.generator.data.update(dir=str(data), split="test", dev_pairs=16)
    c.generator.optimizer.update(lr=1e-3)
    c.generator.train.update(
        steps=4, epochs=0, batch_size=8, eval_every=2, checkpoint_every=2, progress=False
    )
    c.generate.update(num_samples=3, keep=2, max_length=8, batch_size=16, shard_size=32)
    c.data.update(dir=str(data), dev_fraction=0.5, max_eval_queries=10)
    c.encode.update(batch_size=32, chunk_rows=64)
    c.optimizer.update(lr=1e-3)
    c.train.update(**tiny_train(steps=4, epochs=0, eval_every=2, checkpoint_every=2))


VARIANTS = {
    "generator_msmarco": generator_msmarco,
    "wikigq": wikigq,
    "lapradoor_ft": lapradoor_ft,
    "adapt": adapt,
    "demo": demo,
    "tiny": tiny,
}


def get_config(arg=None):
    return with_variant(base(), VARIANTS, arg or "wikigq")
