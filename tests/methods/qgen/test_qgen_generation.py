"""`jaxret generate`: BEIR output, selection of samples, byte-identical resumption after
SIGKILL, and two processes writing the same queries as one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxret.data.readers import read_corpus
from jaxret.methods.qgen import generation
from jaxret.models.generate import Decoding
from jaxret.models.seq2seq import load_generator

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "data"


def test_select_takes_the_top_k_then_drops_duplicates_as_the_paper():
    """Liang et al.: the top 5 of 10 samples by likelihood, then duplicates removed (so fewer
    than 5 may remain). Fails if duplicates are removed before the top-k is taken (the
    earlier order: "a" -2 would then fill the slot its better copy left, and "c" enter)."""
    texts = ["a", "b", "a", "", "c", "d"]
    loglik = np.array([-1.5, -1.0, -1.2, 0.0, -3.0, -9.0])
    # top 4 by likelihood: "" 0.0, "b" -1.0, "a" -1.2, "a" -1.5; then "" and the copy go.
    assert generation.select(texts, loglik, 4) == [("b", -1.0), ("a", -1.2)]
    # ties keep generation order; everything kept when keep covers all samples
    tied = generation.select(["x", "y", "x"], np.array([-1.0, -1.0, -1.0]), 3)
    assert tied == [("x", -1.0), ("y", -1.0)]
    assert generation.select(texts, loglik, 10)[-1] == ("d", -9.0)


def test_select_length_normalized_ranks_per_token():
    """A long query with a lower sum but a higher per-token log-likelihood wins with
    `lengths`; the sums are what is returned. Fails if the ranking ignores `lengths`."""
    texts, loglik = ["short", "a much longer query"], np.array([-2.0, -4.0])
    assert generation.select(texts, loglik, 1) == [("short", -2.0)]
    per_token = generation.select(texts, loglik, 1, lengths=np.array([2, 8]))
    assert per_token == [("a much longer query", -4.0)]


def test_inputs_are_title_space_text_cut_with_eos(tiny_generator):
    _, _, tok, _ = load_generator(tiny_generator)
    spec = generation.GenerationSpec(max_input_length=6, prefix="q: ")
    ids, mask = generation.encode_inputs(tok, ["T"], ["one two three four five"], spec, 0)
    row = ids[0][mask[0] == 1].tolist()
    assert len(row) == 6 and row[-1] == tok.sep_token_id  # cut, the end token kept
    assert tok.decode(row, skip_special_tokens=True) == "q : t one"  # [CLS] q : t one [SEP]
    assert ids.shape[1] == 6  # the width is a multiple of 32 only up to the limit


def test_writes_a_beir_folder_that_the_readers_take(tiny_generator, tmp_path):
    from jaxret.eval.evaluate import load_eval_data

    gen, params, tok, _ = load_generator(tiny_generator)
    corpus_path = DATA / "adi" / "corpus.jsonl.gz"
    corpus = read_corpus(corpus_path)
    decoding = Decoding("sample", max_new_tokens=6, num_return=4, top_p=0.95)
    spec = generation.GenerationSpec(decoding, keep=2, max_input_length=32, shard_size=16)
    out = generation.generate_queries(
        gen, params, tok, corpus, corpus_path, tmp_path / "gq", spec, progress=False
    )
    data = load_eval_data(out, "train")
    assert len(data.corpus) == len(corpus)  # the linked corpus, not a copy
    assert (out / "corpus.jsonl.gz").is_symlink()
    rows = [json.loads(x) for x in (out / "queries.jsonl").read_text().splitlines()]
    per_passage = {}
    for r in rows:
        doc, rank = r["_id"].split("#q")
        assert doc == r["passage"] and r["text"] == r["text"].strip() and r["text"]
        per_passage.setdefault(doc, []).append((int(rank), r["loglik"], r["text"]))
        assert data.qrels[r["_id"]] == {doc: 1}
    for qs in per_passage.values():
        assert [q[0] for q in qs] == list(range(len(qs))) and len(qs) <= 2
        assert [q[1] for q in qs] == sorted((q[1] for q in qs), reverse=True)
        assert len({q[2] for q in qs}) == len(qs)
    # Another setting in the same folder is refused, not mixed in.
    other = generation.GenerationSpec(decoding, keep=3, max_input_length=32, shard_size=16)
    with pytest.raises(Exception, match="another corpus or setting"):
        generation.generate_queries(gen, params, tok, corpus, corpus_path, out, other, False)


def _generate_cmd(generator, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "jaxret.cli",
        "generate",
        "--generator",
        str(generator),
        "--data",
        str(data),
        "--out",
        str(out),
        "--num-samples",
        "4",
        "--keep",
        "2",
        "--max-length",
        "8",
        "--max-input-length",
        "48",
        "--seed",
        "3",
        *extra,
    ]


def _env(devices=8):
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }


def _outputs(folder):
    return {
        name: (folder / name).read_bytes()
        for name in ("queries.jsonl", "qrels/train.tsv", "generation.json")
    }


def test_killed_run_resumes_to_identical_bytes(tiny_generator, tmp_path):
    data = DATA / "adi"  # 82 passages: 11 shards of 8
    shards = ("--shard-size", "8", "--batch-size", "8")
    whole = subprocess.run(
        _generate_cmd(tiny_generator, data, tmp_path / "whole", *shards),
        env=_env(),
        cwd=ROOT,
        capture_output=True,
    )
    assert whole.returncode == 0, whole.stderr.decode()[-3000:]
    total = len(list((tmp_path / "whole" / "shards").glob("shard-*.jsonl")))
    assert total == 11

    out = tmp_path / "killed"
    victim = subprocess.Popen(
        _generate_cmd(tiny_generator, data, out, *shards),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "shards").glob("shard-*.jsonl"))) < 3:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done = len(list((out / "shards").glob("shard-*.jsonl")))
    assert 3 <= done < total and not (out / "queries.jsonl").exists()
    again = subprocess.run(
        _generate_cmd(tiny_generator, data, out, *shards), env=_env(), cwd=ROOT, capture_output=True
    )
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert _outputs(out) == _outputs(tmp_path / "whole")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _queries(folder):
    rows = [json.loads(x) for x in (folder / "queries.jsonl").read_text().splitlines()]
    return {r["_id"]: r for r in rows}


def test_two_processes_write_the_queries_of_one(tiny_generator, tmp_path):
    data = DATA / "adi"
    shards = ("--shard-size", "8", "--batch-size", "8")
    one = subprocess.run(
        _generate_cmd(tiny_generator, data, tmp_path / "one", *shards),
        env=_env(),
        cwd=ROOT,
        capture_output=True,
    )
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    port = _free_port()
    procs = [
        subprocess.Popen(
            _generate_cmd(
                tiny_generator,
                data,
                tmp_path / "two",
                *shards,
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={pid}",
            ),
            env=_env(devices=4),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for pid in range(2)
    ]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    a, b = _queries(tmp_path / "one"), _queries(tmp_path / "two")
    assert len(a) > 82 and list(a) == list(b)  # same ids in the same (merged) order
    assert [r["text"] for r in a.values()] == [r["text"] for r in b.values()]
    np.testing.assert_allclose(
        [r["loglik"] for r in a.values()], [r["loglik"] for r in b.values()], atol=1e-5
    )
    # each process wrote its own shards: 11 of them, alternating
    assert len(list((tmp_path / "two" / "shards").glob("shard-*.jsonl"))) == 11


def test_cli_refuses_keeping_more_than_it_generates(tiny_generator, tmp_path, capsys):
    from jaxret import cli

    base = _generate_cmd(tiny_generator, DATA / "adi", tmp_path / "x")[3:]
    assert cli.main(base + ["--decoding", "beam", "--num-beams", "2", "--keep", "3"]) == 2
    assert "--keep 3 of --num-beams 2" in capsys.readouterr().err
    assert cli.main(base + ["--num-samples", "2", "--keep", "3"]) == 2
    assert "--keep 3 of --num-samples 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
