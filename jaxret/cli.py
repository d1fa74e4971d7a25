"""`jaxret <command>`: prepare, train, demo, encode, search, eval, analyze, export, generate,
convert-megatron.

Every command reads an ml_collections config (`--config=configs/x.py:variant`, default
configs/retrieval.py) and `--config.a.b=value` overrides; the named flags below are
shortcuts for the config fields they mention. An expected failure (bad input, a config or path
to fix) prints one line and exits 2; `--debug` anywhere on the line shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def _accelerator_host() -> bool:
    """Whether JAX will run on a GPU or TPU here (checked without importing jax)."""
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return "cpu" not in platforms.split(",")
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")
    return any(importlib.util.find_spec(p) is not None for p in plugins)


def _cpu_devices_per_core() -> None:
    # XLA:CPU runs a transformer mostly on one core per device; one host device per core
    # lets data-parallel encoding use them all. Must happen before jax is imported, and only
    # on CPU hosts: on GPU/TPU hosts the devices are the accelerators.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and not _accelerator_host():
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n or 1}".strip()


def _number(
    kind: type,
    low: float,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> Any:
    """An argparse type: a `kind` number in [low, high] ((low, high] with open_low); argparse
    names the flag in the error ("argument --k: expected an integer ≥ 1, got 0")."""
    what = "an integer" if kind is int else "a number"
    bounds = f"> {low}" if open_low else f"≥ {low}"
    if high is not None:
        bounds += f" and {'<' if open_high else '≤'} {high}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}") from None
        above = high is not None and (value > high or (open_high and value == high))
        if value < low or (open_low and value == low) or above:
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text}")
        return value

    parse.__name__ = f"{what} {bounds}"
    return parse


_positive_int = _number(int, 1)


def _weight(text: str) -> str:
    """--mu: 'auto' or a number ≥ 0."""
    if text != "auto":
        _number(float, 0.0)(text)
    return text


def cmd_prepare(cfg: Any, args: argparse.Namespace) -> None:
    from jaxret.methods import preparer

    built = preparer(cfg)(cfg, args.workdir, args.workers, args.shard_rows)
    if not built:
        print("nothing to prepare for this config")
    for name, item in built.items():
        if hasattr(item, "max_length"):
            print(f"{name}: {len(item)} rows × {item.max_length} tokens in {item.folder}")
        else:
            print(f"{name}: {len(item)} queries ({int(item.valid().sum())} with a BM25 hit)")


def _print_accuracy(title: str, result: dict) -> None:
    names = ("top1", "top5", "top20", "top100", "ndcg@10", "recall@100", "rbo_bm25")
    keys = [k for k in names if k in result]
    print(f"{title:>10}: " + "  ".join(f"{k} {result[k]:.3f}" for k in keys))


def cmd_train(cfg: Any, args: argparse.Namespace) -> None:
    """`jaxret train` / `jaxret demo`: the config's method on the loop, then where it wrote."""
    from jaxret.methods import trainer

    workdir = str(_writable(args.workdir, "--workdir", folder=True))
    summary = trainer(cfg)(cfg, workdir)
    if "preempted_at" in summary:
        print(f"stopped by SIGTERM after step {summary['preempted_at']}: checkpoint saved")
        return
    if "test_before" in summary:
        n = int(summary["test_after"].get("num_queries", 0))
        print(f"held-out test questions: {n}")
        _print_accuracy("baseline", summary["test_before"])
        _print_accuracy("trained", summary["test_after"])
    out = Path(summary.get("run_dir", workdir))
    best = out / "best" if (out / "best").exists() else "none (no dev evaluation)"
    print(f"checkpoints: {out / 'checkpoints'}  best: {best}")
    print(f"HF export: {out / 'export'}  plot: {summary.get('plot')}")
    print(f"metrics: {out / 'metrics.jsonl'}  tensorboard: {out / 'tensorboard'}")


# One runnable example per subcommand, shown by its --help (run from a clone's top folder).
EXAMPLES = {
    "prepare": "jaxret prepare --config=configs/art.py:demo --workdir runs/demo --workers 2",
    "train": "jaxret train --config=configs/spar.py:demo --workdir runs/spar",
    "demo": "jaxret demo --workdir runs/demo",
    "encode": "jaxret encode --data data/adi --out runs/adi-index",
    "search": 'jaxret search --index runs/adi-index --query "computer indexing of documents"',
    "eval": "jaxret eval --data data/adi --retriever bm25",
    "analyze": "jaxret analyze rbo --data data/adi --max-queries 20",
    "export": "jaxret export --model runs/demo --out runs/demo-hf",
    "generate": "jaxret generate --generator runs/qgen/generator/export --data data/adi "
    "--out runs/adi-queries  (after jaxret train --config=configs/qgen.py:demo "
    "--workdir runs/qgen)",
    "convert-megatron": "jaxret convert-megatron --checkpoint ART-NQ-checkpoint/ "
    "--vocab bert-large-uncased-vocab.txt --out runs/art-nq  (a downloaded ART checkpoint)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxret", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        """A subcommand: its function cmd_<name>, its default config, its example."""
        func = kw.pop("func", None) or globals()["cmd_" + name.replace("-", "_")]
        s = sub.add_parser(
            name,
            help=help,
            description=kw.pop("description", help),
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        s.set_defaults(func=func, config=kw.pop("config", "configs/retrieval.py"))
        return s

    def model_flags(s: argparse.ArgumentParser) -> None:
        s.set_defaults(model_flags=True)
        s.add_argument("--model", help="HF folder, hub id, or jaxret export/checkpoint")
        s.add_argument("--pooling", choices=["cls", "mean"])
        s.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
        s.add_argument("--max-length", type=_positive_int, help="passage max length")
        s.add_argument("--max-query-length", type=_positive_int)
        s.add_argument("--passage-format", choices=["pair", "hf_pair", "join"])
        s.add_argument("--dtype", choices=["float32", "bfloat16"])
        s.add_argument("--batch-size", type=_positive_int)

    def data_flags(s: argparse.ArgumentParser) -> None:
        s.add_argument("--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/, qa/)")
        s.add_argument(
            "--corpus", help="corpus file instead of DATA/corpus.jsonl (BEIR or DPR tsv)"
        )
        s.add_argument("--split", default="test")
        s.add_argument(
            "--on-missing",
            choices=["error", "warn"],
            default="error",
            help="qrels naming unknown documents/queries: refuse (default) or warn and drop",
        )

    pr = command(
        "prepare",
        help="build a training run's store before the job (ART, SPAR)",
        config="configs/art.py",
        description="Builds what a training run reads: ART's corpus text and token tables "
        "(the retriever's passages and, with a T5 teacher, the teacher's); SPAR's passage "
        "tokens, training sentences and BM25 labels. In parallel, resumable after a kill, the "
        "same bytes for any --workers. Multi-process training refuses to start without them.",
    )
    pr.add_argument("--workdir", required=True, help="the training run's workdir (its store/)")
    pr.add_argument(
        "--workers", type=_positive_int, default=os.cpu_count() or 1, help="default: all cores"
    )
    pr.add_argument("--shard-rows", type=_positive_int, default=65536, help=argparse.SUPPRESS)

    e = command("encode", help="embed a corpus into a saved sharded index")
    model_flags(e)
    data_flags(e)
    e.add_argument("--out", required=True, help="index folder")
    e.add_argument("--index-dtype", choices=["float32", "bfloat16"])
    e.add_argument("--store", help="tokenized corpus store folder (default: cache)")

    s = command("search", help="search a saved index with a text query")
    model_flags(s)
    s.add_argument("--index", required=True)
    s.add_argument("--query", action="append", required=True, help="repeatable")
    s.add_argument("-k", type=_positive_int, default=10)
    s.add_argument("--backend", choices=["exact", "scann"], default="exact")
    s.add_argument("--json", action="store_true")

    v = command("eval", help="retrieval metrics of a dense model or BM25")
    model_flags(v)
    data_flags(v)
    v.add_argument("--qa", help="QA file (jsonl or DPR csv) instead of DATA/qa/SPLIT.jsonl")
    v.add_argument(
        "--retriever",
        choices=["dense", "bm25", "hybrid", "ledr"],
        default="dense",
        help="hybrid: normalized dense + BM25 sum (with --lexical-model: SPAR + BM25); ledr: "
        "LaPraDoR's cosine × BM25",
    )
    v.add_argument("--lexical-model", help="SPAR: a Λ model combined with --model")
    v.add_argument(
        "--lexical-passage-model",
        help="SPAR: Λ's passage (context) encoder when Λ is two HF folders, as the released "
        "facebook/spar-*-lexmodel-{query,context}-encoder",
    )
    v.add_argument(
        "--lexical-pooling",
        choices=["cls", "mean"],
        help="pooling of an HF-folder Λ (default cls, dot product: DPR-style, as released)",
    )
    v.add_argument("--combine", choices=["concat", "sum"], default="concat")
    v.add_argument(
        "--mu",
        type=_weight,
        default="auto",
        help="SPAR weight of Λ (or the hybrid's BM25 weight): a number, or 'auto' = tuned on "
        "--tune-split over dpr-scale's grid (0.1..1.0 and reciprocals)",
    )
    v.add_argument(
        "--bm25-weight",
        type=_weight,
        default="auto",
        help="SPAR + BM25 (--lexical-model with --retriever hybrid): BM25's weight in the "
        "normalized sum, a number or 'auto' (tuned on --tune-split after μ)",
    )
    v.add_argument(
        "--mu-grid-scale",
        type=_number(float, 0.0, open_low=True),
        default=1.0,
        help="multiplies the μ grid (e.g. 0.01 for Contriever / GTR scores)",
    )
    v.add_argument(
        "--tune-metric",
        choices=["auto", "top100", "top20", "mrr@10", "ndcg@10", "recall@100"],
        default="auto",
        help="dev metric of --mu auto: top100 on QA sets, mrr@10 on MS MARCO, ndcg@10 else",
    )
    v.add_argument("--tune-split", help="split tuning the weight (default: dev)")
    v.add_argument(
        "--hash-split",
        type=_number(float, 0.0, 1.0, open_low=True, open_high=True),
        help="for a set with one split: this fraction of its questions (by id hash) is the "
        "dev split, the rest the evaluated split",
    )
    v.add_argument(
        "--bm25-depth", type=_positive_int, default=1000, help="LEDR / hybrid: BM25 depth"
    )
    v.add_argument(
        "--bm25-analyzer",
        choices=["none", "english"],
        help="none: lowercase word tokens; english: Lucene's English analyzer (stop words, "
        "Porter stems) as Pyserini and Elasticsearch. Default: english for ledr (BEIR's ES "
        "BM25, as LaPraDoR), none otherwise",
    )
    v.add_argument("--bm25-k1", type=_number(float, 0.0), help="default 1.2")
    v.add_argument("--bm25-b", type=_number(float, 0.0, 1.0), help="default 0.75")
    v.add_argument("--k", type=_positive_int, default=100)
    v.add_argument("--max-queries", type=_positive_int)
    v.add_argument("--max-docs", type=_positive_int)
    v.add_argument("--store")
    v.add_argument("--run-out", help="write the run as a TREC run file")
    v.add_argument(
        "--answer-workers",
        type=_number(int, 0),
        help="processes matching answers in the retrieved passages (QA data: DPR's top-k "
        f"accuracy); 0: in this process. Default: every core from {AUTO_MATCH_PAIRS:,} "
        "(question, passage) pairs on (NQ test: 361,000), else 0",
    )
    v.add_argument("--json", action="store_true", help="one JSON object on the last line")

    a = command("analyze", help="SPAR's analyses: RBO with BM25, token-shuffled queries")
    a.add_argument("analysis", choices=["rbo", "shuffled"])
    model_flags(a)
    data_flags(a)
    a.add_argument("--qa", help="QA file (jsonl or DPR csv) instead of DATA/qa/SPLIT.jsonl")
    a.add_argument("--retriever", choices=["dense", "bm25"], default="dense")
    a.add_argument("--vs", default="bm25", help="rbo: the reference ranking (bm25)")
    a.add_argument("-k", type=_positive_int, default=100, help="ranking depth")
    a.add_argument(
        "--p", type=_number(float, 0.0, 1.0, open_low=True), default=0.9, help="RBO persistence"
    )
    a.add_argument("--seed", type=int, default=0, help="shuffled: the shuffling seed")
    a.add_argument("--max-queries", type=_positive_int)
    a.add_argument("--max-docs", type=_positive_int)
    a.add_argument("--store")
    a.add_argument("--json", action="store_true", help="one JSON object on the last line")

    x = command("export", help="write the towers as HF folders (+ jaxret.json)")
    model_flags(x)
    x.add_argument("--out", required=True)

    g = command("generate", help="synthetic queries for a corpus (QGen), as a BEIR folder")
    g.add_argument("--generator", required=True, help="HF T5 / BART folder or hub id")
    g.add_argument("--data", help="BEIR folder whose corpus gets queries")
    g.add_argument("--corpus", help="a corpus file instead of DATA's")
    g.add_argument("--out", required=True)
    g.add_argument("--decoding", choices=["nucleus", "beam", "greedy", "top_k"], default="nucleus")
    g.add_argument("--num-samples", type=_positive_int, default=10, help="samples per passage")
    g.add_argument(
        "--keep",
        type=_positive_int,
        default=5,
        help="most likely samples kept, then duplicates dropped (the paper: 5 of 10)",
    )
    g.add_argument(
        "--length-normalized",
        action="store_true",
        help="rank samples by log-likelihood per token (default: the sum, as the paper)",
    )
    g.add_argument("--top-p", type=_number(float, 0.0, 1.0, open_low=True), default=0.95)
    g.add_argument("--top-k", type=_number(int, 0), default=0)
    g.add_argument("--temperature", type=_number(float, 0.0, open_low=True), default=1.0)
    g.add_argument("--num-beams", type=_positive_int, default=5)
    g.add_argument(
        "--max-length", type=_positive_int, default=64, help="generated tokens, EOS included"
    )
    g.add_argument("--max-input-length", type=_positive_int, default=512)
    g.add_argument("--prefix", default="", help="text put before every passage")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=_positive_int, default=32)
    g.add_argument(
        "--shard-size", type=_positive_int, default=1024, help="passages per resumable shard"
    )
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")

    m = command(
        "convert-megatron",
        config=None,
        help="Megatron retriever checkpoint (ART, MSS) → a jaxret export of HF MegatronBERT towers",
    )
    m.add_argument("--checkpoint", required=True, help="Megatron checkpoint folder or .pt file")
    m.add_argument("--out", required=True)
    tok = m.add_mutually_exclusive_group(required=True)
    tok.add_argument("--vocab", help="BERT vocab.txt (Megatron's BertWordPieceLowerCase)")
    tok.add_argument("--tokenizer", help="an HF tokenizer folder or hub id instead")
    m.add_argument("--cased", action="store_true", help="with --vocab: do not lowercase")
    m.add_argument("--num-heads", type=_positive_int, help="when the checkpoint stores no args")
    m.add_argument("--trust-pickle", action="store_true", help="allow arbitrary pickled objects")

    trains = (
        ("train", "train a retriever: the config's method (ART, SPAR, LaPraDoR, QGen)", ""),
        ("demo", "the bundled ART demo (configs/art.py:demo)", ":demo"),
    )
    for name, text, variant in trains:
        t = command(name, help=text, config=f"configs/art.py{variant}", func=cmd_train)
        t.add_argument("--workdir", required=name == "train", default="runs/demo")
    return p


# The model flags and the `model.` config fields they set (written once: applied by
# _apply_flags, and an explicit flag overrides a jaxret export's saved spec).
MODEL_FLAGS = {
    "model": "name",
    "pooling": "pooling",
    "normalize": "normalize",
    "max_length": "max_passage_length",
    "max_query_length": "max_query_length",
    "passage_format": "passage_format",
    "dtype": "dtype",
}


def _apply_flags(cfg: Any, args: argparse.Namespace) -> None:
    with cfg.unlocked():
        for flag, field in MODEL_FLAGS.items():
            value = getattr(args, flag, None)
            if value is not None:
                cfg.model[field] = value
        if getattr(args, "batch_size", None):
            cfg.encode.batch_size = args.batch_size
        if getattr(args, "index_dtype", None):
            cfg.encode.index_dtype = args.index_dtype


def _explicit_spec_fields(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> set[str]:
    """The encoder-spec fields given on the command line (flags or --config.model.X)."""
    given = {
        field
        for flag, field in MODEL_FLAGS.items()
        if flag != "model" and getattr(args, flag, None) is not None
    }
    return given | {k.split(".", 1)[1] for k, _ in overrides if k.startswith("model.")}


def load_model(cfg: Any, explicit: set[str] = frozenset()) -> tuple[Any, Any, Any]:
    """(encoder, params, tokenizer) from cfg.model; a jaxret export keeps its saved spec
    except for fields given explicitly."""
    import dataclasses

    from jaxret.data.tokenization import load_tokenizer
    from jaxret.models import dual_encoder as de

    spec = de.EncoderSpec.from_config(cfg.model)
    folder = de.export_folder(cfg.model.name)
    if folder is not None:
        saved = de.EncoderSpec(**json.loads((folder / de.SPEC_FILE).read_text())["spec"])
        spec = dataclasses.replace(saved, **{f: getattr(spec, f) for f in explicit})
    encoder, params, tok_folder = de.from_pretrained(
        cfg.model.name, spec, passage_model=cfg.model.passage_name or None
    )
    return encoder, params, load_tokenizer(tok_folder)


def load_lexical_model(cfg: Any, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """SPAR's Λ with its own settings: a jaxret export keeps its saved spec; an HF folder (or
    a query + context pair of them) is read as DPR-style towers — [CLS] pooling, dot product,
    title [SEP] text — whatever the base model's flags, unless --lexical-pooling says."""
    lex_cfg = cfg.copy_and_resolve_references()
    with lex_cfg.unlocked():
        m = lex_cfg.model
        m.name, m.passage_name = args.lexical_model, args.lexical_passage_model or ""
        m.shared = not args.lexical_passage_model
        m.pooling = args.lexical_pooling or "cls"
        m.update(projection="none", normalize=False, similarity="dot", passage_format="pair")
    explicit = {"pooling"} if args.lexical_pooling else set()
    if args.lexical_passage_model:
        explicit.add("shared")
    return load_model(lex_cfg, explicit)


def _mesh(cfg: Any) -> Any:
    from jaxret.parallel import mesh_from_config

    return mesh_from_config(cfg)


def _place_params(cfg: Any, params: Any, mesh: Any) -> Any:
    from jaxret.parallel import shard_params

    return shard_params(params, mesh, cfg.mesh.param_sharding)


def _eval_splits(cfg: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """(test, dev or None): the evaluated split and the split that tunes a weight."""
    from jaxret.eval import evaluate as ev

    load = lambda split, corpus=None: ev.load_eval_data(
        args.data, split, args.corpus, args.qa, on_missing=args.on_missing, corpus=corpus
    )
    data = ev.subsample(load(args.split), args.max_queries, args.max_docs, cfg.seed)
    needs_dev = args.retriever == "hybrid" or args.lexical_model
    if args.hash_split:
        dev, test = ev.hash_split(data, args.hash_split)
        return test, dev
    if not needs_dev or args.mu != "auto":
        return data, None
    tune = args.tune_split or "dev"
    if tune == args.split:
        raise ValueError(
            f"--tune-split {tune!r} is the evaluated split: tuning on it is not a test"
        )
    dev = load(tune, data.corpus)
    return data, ev.subsample(dev, args.max_queries, None, cfg.seed)


def _evaluate(cfg: Any, args: argparse.Namespace, explicit: set[str]) -> dict[str, Any]:
    import dataclasses

    from jaxret.eval import evaluate as ev
    from jaxret.eval import hybrid
    from jaxret.eval.trec import write_run
    from jaxret.lexical.bm25 import BM25Config

    if args.run_out:
        _writable(args.run_out, "--run-out")
    data, dev = _eval_splits(cfg, args)
    progress = not args.json
    info: dict[str, Any] = {"data": data.name, "split": args.split, "docs": len(data.corpus)}
    if args.hash_split:
        info["hash_split"] = {"dev_fraction": args.hash_split, "dev_queries": len(dev.query_ids)}
    weight = None if args.mu == "auto" else float(args.mu)
    bm25_config = BM25Config(
        k1=1.2 if args.bm25_k1 is None else args.bm25_k1,
        b=0.75 if args.bm25_b is None else args.bm25_b,
        analyzer=args.bm25_analyzer or ("english" if args.retriever == "ledr" else "none"),
    )
    if args.retriever == "bm25":
        scores, rows, desc = ev.bm25_search(data, args.k, bm25_config, progress)
        info["retriever"] = desc
    else:
        if not cfg.model.name:
            raise SystemExit(f"jaxret eval: --model is required for the {args.retriever} retriever")
        mesh = _mesh(cfg)
        encoder, params, tokenizer = load_model(cfg, explicit)
        if args.retriever == "ledr":  # the authors' evaluation lengths, unless given
            n = min(hybrid.LEDR_MAX_LENGTH, encoder.bert.max_position_embeddings)
            lengths = {f: n for f in ("max_query_length", "max_passage_length")}
            lengths = {f: v for f, v in lengths.items() if f not in explicit}
            encoder = dataclasses.replace(
                encoder, spec=dataclasses.replace(encoder.spec, **lengths)
            )
        model = (encoder, _place_params(cfg, params, mesh), tokenizer)
        bs = cfg.encode.batch_size
        info["retriever"] = {"model": cfg.model.name, **vars(encoder.spec)}
        if args.lexical_model:
            lex_encoder, lex_params, lex_tok = load_lexical_model(cfg, args)
            lex = (lex_encoder, _place_params(cfg, lex_params, mesh), lex_tok)
            mu_grid = hybrid.scaled_grid(args.mu_grid_scale)
            if args.retriever == "hybrid":  # SPAR + BM25 (the paper's Table 8)
                name = "spar+bm25"
                bm25_weight = None if args.bm25_weight == "auto" else float(args.bm25_weight)
                scores, rows, extra = hybrid.spar_bm25_retrieval(
                    model,
                    lex,
                    data,
                    dev,
                    mesh,
                    mu=weight,
                    weight=bm25_weight,
                    kind=args.combine,
                    k=args.k,
                    depth=args.bm25_depth,
                    batch_size=bs,
                    store=args.store,
                    mu_grid=mu_grid,
                    bm25_config=bm25_config,
                    metric=args.tune_metric,
                )
            else:
                name = "spar"
                scores, rows, extra = hybrid.spar_retrieval(
                    model,
                    lex,
                    data,
                    dev,
                    mesh,
                    mu=weight,
                    kind=args.combine,
                    k=args.k,
                    batch_size=bs,
                    store=args.store,
                    grid=mu_grid,
                    metric=args.tune_metric,
                )
            spar = {"base": info["retriever"], "lexical": args.lexical_model, **extra}
            info["retriever"] = {name: spar}
            info["mu"] = extra["mu"]
        elif args.retriever == "hybrid":
            scores, rows, extra = hybrid.hybrid_retrieval(
                model,
                data,
                dev,
                mesh,
                weight=weight,
                k=args.k,
                depth=args.bm25_depth,
                batch_size=bs,
                store=args.store,
                grid=hybrid.scaled_grid(args.mu_grid_scale),
                bm25_config=bm25_config,
                metric=args.tune_metric,
            )
            info["retriever"] = {"hybrid": info["retriever"], **extra}
            info["mu"] = extra["weight"]
        elif args.retriever == "ledr":
            scores, rows, extra = hybrid.ledr_retrieval(
                model,
                data,
                mesh,
                depth=args.bm25_depth,
                k=args.k,
                batch_size=bs,
                store=args.store,
                bm25_config=bm25_config,
            )
            info["retriever"] = {"ledr": info["retriever"], **extra}
        else:
            scores, rows = ev.dense_search(
                encoder,
                model[1],
                tokenizer,
                data,
                mesh,
                k=args.k,
                batch_size=bs,
                index_dtype=cfg.encode.index_dtype,
                store=args.store,
                progress=progress,
            )
    result = ev.compute_metrics(data, scores, rows, _answer_hits(data, rows, args.answer_workers))
    if args.run_out:
        from jaxret.eval.metrics import run_from_arrays

        write_run(args.run_out, run_from_arrays(data.query_ids, data.corpus.ids, scores, rows))
    return {**result, **info}


def _analyze(cfg: Any, args: argparse.Namespace, explicit: set[str]) -> dict[str, Any]:
    import dataclasses

    from jaxret.eval import analysis
    from jaxret.eval import evaluate as ev
    from jaxret.lexical.bm25 import BM25, BM25Config

    data = ev.load_eval_data(
        args.data, args.split, args.corpus, args.qa, on_missing=args.on_missing
    )
    data = ev.subsample(data, args.max_queries, args.max_docs, cfg.seed)
    k = min(args.k, len(data.corpus))
    info: dict[str, Any] = {
        "analysis": args.analysis,
        "data": data.name,
        "queries": len(data.query_ids),
    }
    if args.retriever == "bm25":
        search = lambda d: ev.bm25_search(d, k, BM25Config(), False)[:2]
        info["retriever"] = "bm25"
    else:
        if not cfg.model.name:
            raise SystemExit("jaxret analyze: --model is required (or --retriever bm25)")
        mesh = _mesh(cfg)
        encoder, params, tokenizer = load_model(cfg, explicit)
        params = _place_params(cfg, params, mesh)
        index = ev.dense_index(
            encoder,
            params,
            tokenizer,
            data.corpus,
            mesh,
            cfg.encode.batch_size,
            store=args.store,
            progress=False,
        )

        def search(d: Any) -> tuple[Any, Any]:
            q = ev.encode_queries(encoder, params, tokenizer, d.query_texts, mesh, progress=False)
            return ev.search_index(index, q, d.query_ids, d.corpus.ids, k)

        info["retriever"] = {"model": cfg.model.name, **vars(encoder.spec)}
    if args.analysis == "rbo":
        if args.vs != "bm25":
            raise ValueError(f"--vs {args.vs!r}: only bm25 is supported")
        bm25 = BM25(data.corpus, BM25Config(), show_progress=False)
        _, rows = search(data)
        info.update(
            rbo=analysis.mean_rbo(rows, analysis.bm25_rows(bm25, data, k), args.p),
            p=args.p,
            depth=k,
        )
    else:
        original = ev.compute_metrics(data, *search(data))
        shuffled_data = dataclasses.replace(
            data, query_texts=analysis.shuffle_tokens(data.query_texts, args.seed)
        )
        shuffled = ev.compute_metrics(shuffled_data, *search(shuffled_data))
        info.update(original=original, shuffled=shuffled, seed=args.seed)
    return info


# Below this many (question, passage) pairs the matching takes less than starting workers.
AUTO_MATCH_PAIRS = 20_000


def _answer_hits(data: Any, rows: Any, workers: int | None) -> Any:
    """The answer hits [Q, K] of QA data (None otherwise), matched by `workers` processes."""
    from jaxret.eval import evaluate as ev
    from jaxret.eval import qa

    if data.answers is None:
        return None
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if rows.size >= AUTO_MATCH_PAIRS else 0
    matcher = qa.AnswerMatcher(workers)
    try:
        return ev.match_answers(data, rows, matcher=matcher).result()
    finally:
        matcher.close()


def cmd_eval(cfg: Any, args: argparse.Namespace) -> None:
    result = _evaluate(cfg, args, args.explicit)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_table(result)


def cmd_analyze(cfg: Any, args: argparse.Namespace) -> None:
    result = _analyze(cfg, args, args.explicit)
    print(json.dumps(result, default=str, indent=None if args.json else 2))


def _print_table(result: dict[str, Any]) -> None:
    keys = [
        k
        for k in ("ndcg@10", "recall@100", "mrr@10", "map", "top1", "top5", "top20", "top100")
        if k in result
    ]
    n = int(result.get("num_queries", 0))
    print(f"{result.get('data', '')}: {n} queries, {result.get('docs')} docs")
    for k in keys:
        print(f"  {k:>10}  {result[k]:.4f}")


def _writable(path: str | os.PathLike, flag: str, folder: bool = False) -> Path:
    """Refuses, before any work, an output path (or output `folder`) that cannot be written."""
    import tempfile

    from jaxret.configlib import ConfigError

    path = Path(path).absolute()
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".jaxret-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {where} ({e.strerror})") from None
    if path.exists() and not (path.is_dir() or path.is_symlink()) and flag == "--out":
        raise ConfigError(f"--out {path}: exists and is not an index folder")
    return path


def _replace_folder(out: Path, build: Any) -> None:
    """Writes a folder with `build(tmp)` beside `out`, then makes `out` point at it in one
    atomic rename (`out` is a symlink to a versioned sibling, as `best/` is): a kill at any
    moment leaves the previous folder in place and readable; it is deleted only after the
    swap."""
    import shutil
    import uuid

    import jax
    from jax.experimental import multihost_utils

    version = out.with_name(f".{out.name}-{uuid.uuid4().hex[:12]}")
    build(version)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxret-replace-folder")
    if jax.process_index() == 0:
        previous = out.resolve() if out.is_symlink() else None
        if out.exists() and not out.is_symlink():  # a plain folder: moved aside, then linked
            previous = out.with_name(f".{out.name}-old-{uuid.uuid4().hex[:12]}")
            os.rename(out, previous)
        link = out.with_name(f".{out.name}-link-{uuid.uuid4().hex[:12]}")
        os.symlink(version.name, link)
        os.replace(link, out)
        if previous is not None and previous.exists() and previous != version:
            shutil.rmtree(previous, ignore_errors=True)


def cmd_encode(cfg: Any, args: argparse.Namespace) -> None:
    explicit = args.explicit
    from jaxret.eval import evaluate as ev

    if not (args.data or args.corpus):
        raise SystemExit("jaxret encode: give --data DIR or --corpus FILE")
    from jaxret.data.readers import find_corpus, read_corpus

    out = _writable(args.out, "--out")
    corpus_path = Path(args.corpus) if args.corpus else find_corpus(args.data)
    corpus = read_corpus(corpus_path)
    mesh = _mesh(cfg)
    encoder, params, tokenizer = load_model(cfg, explicit)
    params = _place_params(cfg, params, mesh)
    index = ev.dense_index(
        encoder,
        params,
        tokenizer,
        corpus,
        mesh,
        cfg.encode.batch_size,
        cfg.encode.index_dtype,
        args.store,
    )
    source = {
        "corpus": str(corpus_path.absolute()),
        "model": str(cfg.model.name),
        "spec": vars(encoder.spec),
    }

    def build(folder: Path) -> None:
        index.save(folder)
        (folder / "source.json").write_text(json.dumps(source, indent=2))

    _replace_folder(out, build)
    print(f"wrote {index.num_rows} × {index.dim} {cfg.encode.index_dtype} index to {out}")


def cmd_search(cfg: Any, args: argparse.Namespace) -> None:
    explicit = args.explicit
    import numpy as np

    from jaxret.data.readers import read_corpus
    from jaxret.eval import evaluate as ev
    from jaxret.index.sharded import ShardedIndex, params_fingerprint

    index_dir = Path(args.index)
    if not (index_dir / "source.json").is_file():
        raise FileNotFoundError(f"{index_dir} is not an index written by `jaxret encode`")
    source = json.loads((index_dir / "source.json").read_text())
    built = source["spec"]
    # Queries must be embedded the way the index's passages were.
    passage_side = (
        "pooling",
        "projection",
        "normalize",
        "similarity",
        "passage_format",
        "max_passage_length",
        "shared",
    )
    conflicts = [
        f"{k}={cfg.model[k]!r} (index: {built[k]!r})"
        for k in passage_side
        if k in explicit and k in built and cfg.model[k] != built[k]
    ]
    if conflicts:
        raise ValueError(f"{index_dir} was encoded differently: {', '.join(conflicts)}")
    with cfg.unlocked():
        if args.model is None:
            cfg.model.name = source["model"]
        for k, v in built.items():
            if k in cfg.model and k not in explicit:
                cfg.model[k] = v
    mesh = _mesh(cfg)
    encoder, params, tokenizer = load_model(cfg, explicit | set(built))
    corpus = read_corpus(Path(source["corpus"]))
    expect = {
        "corpus_hash": corpus.content_hash(),
        "encoder": params_fingerprint(encoder.tower_params(params, "passage"), 0),
    }
    index = ShardedIndex.load(index_dir, mesh, expect=expect)
    q = ev.encode_queries(encoder, params, tokenizer, args.query, mesh, progress=False)
    k = min(args.k, index.num_rows)
    scores, rows = index.search_batched(q, k)
    extra: dict[str, Any] = {}
    if args.backend == "scann":
        from jaxret.index.scann_index import ScannIndex, recall_at_k

        scann_dir = index_dir / "scann"
        if (scann_dir / "jaxret_scann.json").is_file():
            scann = ScannIndex.load(scann_dir)
        else:
            scann = ScannIndex.build(index.rows(), k=max(k, 100))
            scann.save(scann_dir)
        exact_rows = rows
        scores, rows = scann.search(q, k)
        extra[f"recall@{k}_vs_exact"] = recall_at_k(rows, exact_rows)
    results = [
        [
            {
                "rank": j + 1,
                "id": corpus.ids[r],
                "score": float(s),
                "title": corpus.titles[r],
                "text": corpus.texts[r],
            }
            for j, (s, r) in enumerate(zip(srow, rrow))
            if r >= 0
        ]
        for srow, rrow in zip(np.asarray(scores), np.asarray(rows))
    ]
    if args.json:
        print(json.dumps({"backend": args.backend, **extra, "results": results}))
        return
    for query, hits in zip(args.query, results):
        print(f"query: {query}")
        for h in hits:
            title, text = h["title"][:40], h["text"][:80]
            print(f"  {h['rank']:>3}. {h['score']:8.4f}  {h['id']}  {title}  {text}")
    for key, value in extra.items():
        print(f"{key}: {value:.3f}")


def cmd_export(cfg: Any, args: argparse.Namespace) -> None:
    explicit = args.explicit
    from jaxret.models import dual_encoder as de

    encoder, params, tokenizer = load_model(cfg, explicit)
    folders = de.export(encoder, params, args.out, tokenizer)
    for tower, folder in folders.items():
        print(f"{tower}: {folder}")


def cmd_generate(cfg: Any, args: argparse.Namespace) -> None:
    from jaxret.data.readers import find_corpus, read_corpus
    from jaxret.methods.qgen import generation
    from jaxret.models.seq2seq import load_generator
    from jaxret.parallel import initialize_distributed

    if not (args.data or args.corpus):
        raise SystemExit("jaxret generate: give --data DIR or --corpus FILE")
    flag = lambda key: "--" + key.replace("_", "-")
    spec = generation.generation_spec(
        vars(args), args.max_input_length, args.prefix, args.seed, name=flag
    )
    initialize_distributed(cfg.get("distributed"))
    corpus_path = Path(args.corpus) if args.corpus else find_corpus(args.data)
    corpus = read_corpus(corpus_path)
    generator, params, tokenizer, _ = load_generator(args.generator, args.dtype)
    out = generation.generate_queries(
        generator, params, tokenizer, corpus, corpus_path, args.out, spec, progress=True
    )
    count = sum(1 for _ in open(out / "queries.jsonl")) if (out / "queries.jsonl").exists() else 0
    print(f"wrote {count} queries for {len(corpus)} passages to {out}")


def cmd_convert_megatron(cfg: Any, args: argparse.Namespace) -> None:
    from jaxret.models import megatron_convert as mc

    if args.vocab:
        tokenizer = mc.bert_tokenizer(args.vocab, lowercase=not args.cased)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    out = mc.convert(args.checkpoint, args.out, tokenizer, args.num_heads, args.trust_pickle)
    print(f"wrote {out} (towers: {out / 'query_encoder'}, {out / 'passage_encoder'})")


def main(argv: list[str] | None = None) -> int:
    from jaxret.configlib import ConfigError, load_config, split_config_args
    from jaxret.errors import RunError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere: show the traceback of an expected failure too
    argv = [a for a in argv if a != "--debug"]
    _cpu_devices_per_core()
    # transformers' "PyTorch was not found" advice at import: jaxret runs its own Flax models
    # and needs torch only to read PyTorch pickles (it says so when it does).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        spec, overrides, rest = split_config_args(argv)
        args = _parser().parse_args(rest)
        cfg = load_config(spec or args.config, overrides) if args.config else None
        if getattr(args, "model_flags", False):
            _apply_flags(cfg, args)
        args.explicit = _explicit_spec_fields(args, overrides)
        args.func(cfg, args)
    except (ConfigError, ValueError, OSError, RunError) as e:
        # Expected failures (bad input, a config to fix, a path that cannot be read or
        # written): one line naming what to fix. Anything else keeps its traceback.
        if debug or (isinstance(e, OSError) and not e.filename):
            raise
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            print(f"jaxret: error: {e.filename}: {e.strerror}", file=sys.stderr)
        else:
            print(f"jaxret: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
