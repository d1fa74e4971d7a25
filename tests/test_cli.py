"""`jaxret eval | encode | search | export` end to end, against independent references."""

import json
import os

import numpy as np
import pytest
import pytrec_eval
import torch
import transformers
from conftest import save_tiny_bert

from jaxret import cli
from jaxret.eval import evaluate as ev
from jaxret.eval.qa import has_answer


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def torch_minilm_embed(folder, texts, max_length):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    out = []
    for s in range(0, len(texts), 64):
        enc = tok(
            texts[s : s + 64],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        emb = (hidden * m).sum(1) / m.sum(1)
        out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
    return np.concatenate(out)


@pytest.mark.parametrize(
    "name,max_docs,max_queries", [("cranfield", 250, 40), ("squad-dev-open", 250, 60)]
)
def test_eval_minilm_matches_pytorch_reference(
    capsys, minilm, data_dir, tmp_path, name, max_docs, max_queries
):
    out = run_cli(
        capsys,
        "eval",
        "--data",
        data_dir / name,
        "--model",
        minilm,
        "--pooling",
        "mean",
        "--normalize",
        "--max-length",
        256,
        "--passage-format",
        "join",
        "--batch-size",
        32,
        "--max-docs",
        max_docs,
        "--max-queries",
        max_queries,
        "--store",
        tmp_path,
        "--json",
        # QA data: the answers matched by 2 worker processes (fails if they mismatch rows)
        *(["--answer-workers", 2] if name == "squad-dev-open" else []),
    )
    ours = json.loads(out.strip().splitlines()[-1])

    # Reference: same subset, PyTorch transformers + numpy + pytrec_eval, nothing from jaxret's
    # model, index or metric code.
    data = ev.subsample(ev.load_eval_data(data_dir / name), max_queries, max_docs)
    c = data.corpus
    p = torch_minilm_embed(minilm, [(t + " " + x).strip() for t, x in zip(c.titles, c.texts)], 256)
    q = torch_minilm_embed(minilm, data.query_texts, 64)
    scores = q @ p.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    run = {
        qid: {c.ids[j]: float(scores[i, j]) for j in top[i] if c.ids[j] != qid}
        for i, qid in enumerate(data.query_ids)
    }
    measures = {"ndcg_cut.10", "recall.100", "map"}
    per_q = pytrec_eval.RelevanceEvaluator(data.qrels, measures).evaluate(run)
    top10 = {q: {d: run[q][d] for d in sorted(run[q], key=lambda d: -run[q][d])[:10]} for q in run}
    rr = pytrec_eval.RelevanceEvaluator(data.qrels, {"recip_rank"}).evaluate(top10)
    reference = {
        "ndcg@10": np.mean([v["ndcg_cut_10"] for v in per_q.values()]),
        "recall@100": np.mean([v["recall_100"] for v in per_q.values()]),
        "map": np.mean([v["map"] for v in per_q.values()]),
        "mrr@10": np.mean([v["recip_rank"] for v in rr.values()]),
    }
    for key, value in reference.items():
        assert abs(ours[key] - value) < 0.002, (key, ours[key], value)
    assert ours["num_queries"] == max_queries and ours["docs"] == len(c)
    if data.answers is not None:
        ref_top20 = np.mean(
            [
                any(has_answer(e.answers, c.texts[j]) for j in top[i, :20])
                for i, e in enumerate(data.answers)
            ]
        )
        assert abs(ours["top20"] - ref_top20) <= 1 / max_queries


def test_eval_bm25_table_and_run_file(capsys, data_dir, tmp_path):
    out = run_cli(
        capsys,
        "eval",
        "--data",
        data_dir / "adi",
        "--retriever",
        "bm25",
        "--run-out",
        tmp_path / "run.txt",
    )
    assert "ndcg@10" in out and "adi: 35 queries, 82 docs" in out
    lines = (tmp_path / "run.txt").read_text().splitlines()
    assert lines and len(lines[0].split()) == 6


def test_encode_search_export(capsys, tiny_bert, tmp_path):
    corpus = tmp_path / "data" / "corpus.jsonl"
    corpus.parent.mkdir()
    docs = [
        {"_id": f"d{i}", "title": f"topic {i}", "text": f"text about subject number {i}"}
        for i in range(20)
    ]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    run_cli(
        capsys,
        "encode",
        "--model",
        tiny_bert,
        "--data",
        corpus.parent,
        "--out",
        tmp_path / "idx",
        "--pooling",
        "cls",
        "--no-normalize",
        "--store",
        tmp_path / "store",
        "--config.model.max_passage_length=32",
    )
    out = run_cli(
        capsys,
        "search",
        "--index",
        tmp_path / "idx",
        "--query",
        "subject number 3",
        "-k",
        5,
        "--json",
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["results"][0]) == 5
    s = [h["score"] for h in result["results"][0]]
    assert s == sorted(s, reverse=True)
    out = run_cli(
        capsys,
        "search",
        "--index",
        tmp_path / "idx",
        "--query",
        "subject",
        "-k",
        5,
        "--backend",
        "scann",
        "--json",
    )
    assert 0 <= json.loads(out.strip().splitlines()[-1])["recall@5_vs_exact"] <= 1
    run_cli(capsys, "export", "--model", tiny_bert, "--out", tmp_path / "exp", "--pooling", "cls")
    assert (tmp_path / "exp" / "encoder" / "model.safetensors").is_file()
    # Queries are embedded with the index's spec; a contradicting flag is refused.
    assert (
        cli.main(["search", "--index", str(tmp_path / "idx"), "--query", "x", "--pooling", "mean"])
        == 2
    )
    assert "pooling='mean' (index: 'cls')" in capsys.readouterr().err
    # The exported copy has the same weights: accepted. Other weights: refused, naming why.
    run_cli(
        capsys, "search", "--index", tmp_path / "idx", "--model", tmp_path / "exp", "--query", "x"
    )
    other = save_tiny_bert(tmp_path / "other", seed=1)
    code = cli.main(
        ["search", "--index", str(tmp_path / "idx"), "--model", str(other), "--query", "x"]
    )
    assert code == 2
    assert "encoder" in capsys.readouterr().err


def test_cli_errors_name_the_problem(capsys, tiny_bert):
    assert cli.main(["eval", "--data", "/nonexistent", "--retriever", "bm25"]) == 2
    assert "/nonexistent: no corpus file" in capsys.readouterr().err
    assert cli.main(["eval", "--config.model.poolin=cls", "--data", "x"]) == 2
    assert "model.poolin" in capsys.readouterr().err
    assert cli.main(["train", "--config=configs/art.py:tiny", "--workdir", "/tmp/never"]) == 2
    assert "model.name is empty" in capsys.readouterr().err


def test_ledr_evaluates_at_the_authors_lengths(capsys, minilm, tiny_bert, data_dir, tmp_path):
    """`--retriever ledr` encodes queries and documents up to 350 tokens (LaPraDoR's
    evaluation code) unless a length is given, capped at the model's position table (tiny
    BERT: 128). Fails if ledr keeps the model's own lengths (MiniLM's default 64 / 256 here)."""
    base = ["eval", "--data", data_dir / "adi", "--retriever", "ledr", "--bm25-depth", 20]
    base += ["--max-queries", 5, "--store", tmp_path, "--json", "--model"]
    spec = lambda out: json.loads(out.strip().splitlines()[-1])["retriever"]["ledr"]
    minilm_spec = spec(run_cli(capsys, *base, minilm, "--pooling", "mean"))
    assert (minilm_spec["max_query_length"], minilm_spec["max_passage_length"]) == (350, 350)
    tiny = spec(run_cli(capsys, *base, tiny_bert))
    assert (tiny["max_query_length"], tiny["max_passage_length"]) == (128, 128)


def test_eval_spar_plus_bm25_from_the_cli(capsys, tiny_bert, data_dir, tmp_path):
    """`--lexical-model` with `--retriever hybrid` is SPAR + BM25 (the paper's Table 8): μ
    and the BM25 weight both reach the retrieval (reported), and the ranking differs from
    SPAR's alone. Fails if the CLI runs plain SPAR or the dense + BM25 hybrid."""
    base = ["eval", "--data", data_dir / "adi", "--model", tiny_bert, "--lexical-model"]
    base += [tiny_bert, "--mu", "0.5", "--max-queries", 8, "--store", tmp_path, "--json"]
    out = lambda *extra: json.loads(run_cli(capsys, *base, *extra).strip().splitlines()[-1])
    fused = out("--retriever", "hybrid", "--bm25-weight", "2", "--bm25-depth", 30)
    info = fused["retriever"]["spar+bm25"]
    assert (info["mu"], info["weight"], info["depth"]) == (0.5, 2.0, 30)
    spar = out()
    assert "spar" in spar["retriever"] and spar["ndcg@10"] != fused["ndcg@10"]


def test_lengths_beyond_the_position_table_are_cut_or_refused(tiny_bert, caplog):
    """Tiny BERT has 128 positions; XLA would clamp position 200 silently. Loading cuts the
    length to 128 with a warning; a DualEncoder built with a longer one is refused. Fails
    without `fit_positions` (the spec keeps 200) or the check in DualEncoder.__post_init__."""
    from jaxret.models import dual_encoder as de

    encoder, _, _ = de.from_pretrained(tiny_bert, de.EncoderSpec(max_query_length=200))
    assert encoder.spec.max_query_length == 128 and "using 128" in caplog.text
    with pytest.raises(ValueError, match="max_query_length=200 exceeds the model's 128"):
        de.DualEncoder(encoder.bert, de.EncoderSpec(max_query_length=200))


def test_a_lambda_of_two_hf_folders_keeps_its_towers_and_pooling(tmp_path):
    """A released SPAR Λ is two HF folders (query and context encoders): both towers load,
    each from its own folder, with DPR's [CLS] pooling and dot product whatever the base
    model's flags (--pooling mean --normalize here). Fails if Λ's passage tower is its query
    tower (the earlier `passage_name = ""`) or if Λ inherits the base's pooling."""
    from safetensors.numpy import load_file

    from jaxret.configlib import load_config

    query, context = save_tiny_bert(tmp_path / "q", seed=0), save_tiny_bert(tmp_path / "c", seed=1)
    args = cli._parser().parse_args(
        ["eval", "--data", "x", "--model", "m", "--pooling", "mean", "--normalize"]
        + ["--lexical-model", str(query), "--lexical-passage-model", str(context)]
    )
    cfg = load_config("configs/retrieval.py", [])
    cli._apply_flags(cfg, args)
    encoder, params, _ = cli.load_lexical_model(cfg, args)
    assert (encoder.spec.pooling, encoder.spec.normalize, encoder.spec.shared) == (
        "cls",
        False,
        False,
    )
    for tower, folder in (("query", query), ("passage", context)):
        hf = load_file(folder / "model.safetensors")
        key = next(k for k in hf if k.endswith("word_embeddings.weight"))
        ours = params[tower]["word_embeddings"]["embedding"]
        np.testing.assert_array_equal(np.asarray(ours), hf[key])


def test_every_subcommand_has_a_runnable_example_in_its_help(capsys):
    """Each subcommand's --help ends with an example that its own parser accepts. Fails if a
    subcommand has no EXAMPLES entry (KeyError) or an example uses a flag that does not
    exist (argparse exits 2)."""
    import shlex

    parser = cli._parser()
    names = set(parser._subparsers._group_actions[0].choices)
    assert names == set(cli.EXAMPLES)
    for name, example in cli.EXAMPLES.items():
        words = shlex.split(example.split("  (")[0])
        assert words[:2] == ["jaxret", name]
        spec, overrides, rest = cli_config_args(words[1:])
        args = parser.parse_args(rest)
        assert args.func.__name__ in (f"cmd_{name.replace('-', '_')}", "cmd_train")
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        assert f"example:\n  {example}" in capsys.readouterr().out


def cli_config_args(words):
    from jaxret.configlib import split_config_args

    return split_config_args(words)


def test_no_pytorch_advice_from_jaxret_commands(tiny_bert, tmp_path):
    """Without torch, `import transformers` logs "PyTorch was not found ..."; jaxret's own
    commands do not show it. Fails without the TRANSFORMERS_NO_ADVISORY_WARNINGS default in
    cli.main (the first subprocess proves the line exists to be hidden)."""
    import subprocess
    import sys

    block = "import sys; sys.modules['torch'] = None; "
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    plain = subprocess.run(
        [sys.executable, "-c", block + "import transformers"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "PyTorch was not found" in plain.stderr
    run = block + (
        "from jaxret import cli; "
        f"sys.exit(cli.main(['export', '--model', {str(tiny_bert)!r}, "
        f"'--out', {str(tmp_path / 'x')!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PyTorch was not found" not in out.stderr + out.stdout
