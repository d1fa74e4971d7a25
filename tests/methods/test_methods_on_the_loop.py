"""SPAR's Λ and LaPraDoR end to end on their tiny configs: the shared loop's logs, export and
exact resumption hold for them too."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_killed_and_resumed
from safetensors.numpy import load_file

from jaxret.configlib import load_config
from jaxret.models import dual_encoder as de

ROOT = Path(__file__).resolve().parents[2]


def rows(workdir, kind):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_spar_tiny_trains_evaluates_and_exports(tiny_bert, tmp_path, monkeypatch):
    """`jaxret prepare` builds SPAR's store (passage tokens, sentences, BM25 labels); the
    training run then labels nothing (BM25 labelling made to fail) and trains, evaluates and
    exports. Fails if prepare skips the labels or the run's label key differs from prepare's."""
    from jaxret import cli
    from jaxret.lexical import labels as labels_module
    from jaxret.methods.spar import runner as spar

    assert cli.main(
        [
            "prepare",
            "--config=configs/spar.py:tiny",
            f"--config.model.name={tiny_bert}",
            "--workdir",
            str(tmp_path),
            "--workers",
            "2",
        ]
    ) in (0, None)

    def no_labelling(*a, **k):
        raise AssertionError("the training run labelled queries itself")

    monkeypatch.setattr(labels_module, "bm25_labels", no_labelling)
    cfg = load_config("configs/spar.py:tiny", [("model.name", str(tiny_bert))])
    summary = spar.train(cfg, tmp_path)
    train = rows(tmp_path, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["candidates"] == 16 for r in train)  # 8 queries × (positive + 1 hard negative)
    dev = rows(tmp_path, "dev")
    assert [r["step"] for r in dev] == [0, 3, 6] and all(0 < r["mrr"] <= 1 for r in dev)
    assert {"rbo_bm25", "ndcg@10"} <= set(summary["test_after"])
    encoder, params, _ = de.from_pretrained(tmp_path / "export")
    assert encoder.spec.pooling == "cls" and encoder.spec.shared
    (queries,) = (tmp_path / "store").glob("sentences-*.jsonl")
    assert len(list((tmp_path / "store").glob("labels-*.npz"))) == 1
    first = json.loads(queries.read_text().splitlines()[0])
    assert "#s" in first["_id"] and first["passage"] == first["_id"].split("#s")[0]


@pytest.mark.slow  # ~2 minutes; LaPraDoR's queue and steps are tested in tests/methods/lapradoor
def test_lapradoor_resumes_exactly_after_sigkill(tiny_bert, tmp_path):
    """The cache queue, the phase and both towers come back bit-identical."""
    extra = (
        "--config.train.steps=10",
        "--config.train.checkpoint_every=3",
        "--config.eval.test_at_end=false",
    )
    run_killed_and_resumed("configs/lapradoor.py:tiny", tiny_bert, tmp_path, extra, 3)
    loss = lambda w: [(r["step"], r["loss"], r["negatives"], r["phase"]) for r in rows(w, "train")]
    assert loss(tmp_path / "a") == loss(tmp_path / "b")
    assert len(loss(tmp_path / "b")) == 10
    negatives = [n for _, _, n, _ in loss(tmp_path / "a")]
    assert negatives[:4] == [7, 15, 7, 15]  # the queue grows, and is cleared at each switch
    a = load_file(str(tmp_path / "a" / "export" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "export" / "encoder" / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    "config,module,runner",
    [
        ("configs/spar.py:tiny", "spar", "SparRun"),
        ("configs/qgen.py:tiny", "qgen", "RetrieverRun"),
        ("configs/lapradoor.py:tiny", "lapradoor", "LapradoorRun"),
    ],
)
def test_training_scores_with_the_models_similarity_scale(
    tiny_bert, data_dir, tmp_path, monkeypatch, config, module, runner
):
    """One scale per model: a cosine model with model.scale 7 trains its contrastive loss on
    7 · cos, the similarity evaluation ranks with (issue 20: the QGen demo trained cosine at
    scale 1 while evaluating at 20). Fails if a runner builds its step config without the
    model's scale (e.g. `ContrastiveConfig(dropout=...)`: scale 1)."""
    import importlib

    from jaxret.methods import contrastive

    seen = []
    original = contrastive.make_train_step
    monkeypatch.setattr(
        contrastive,
        "make_train_step",
        lambda encoder, optimizer, cfg, *a, **k: (
            seen.append(cfg.scale) or original(encoder, optimizer, cfg, *a, **k)
        ),
    )
    overrides = [
        ("model.name", str(tiny_bert)),
        ("model.similarity", "cosine"),
        ("model.normalize", "true"),
        ("model.scale", "7.0"),
    ]
    if module == "qgen":  # ICT pairs of a bundled corpus: no generation needed
        overrides += [("qgen.stage", "retriever"), ("qgen.pairs", "ict")]
        overrides.append(("data.train_dir", str(data_dir / "adi")))
    cfg = load_config(config, overrides)
    run = getattr(importlib.import_module(f"jaxret.methods.{module}.runner"), runner)(cfg, tmp_path)
    if module == "lapradoor":
        seen.append(run.icol.scale)
    assert seen == [7.0]


def _bare_corpus_config(module, tiny_bert, data_dir, tmp_path, as_file):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    (source,) = (data_dir / "adi").glob("corpus.jsonl*")
    shutil.copy(source, bare / source.name)
    overrides = [
        ("model.name", str(tiny_bert)),
        ("data.dir", str(bare / source.name) if as_file else str(bare)),
        ("train.steps", "2"),
    ]
    if module == "lapradoor":
        overrides.append(("data.eval_dir", ""))
    return load_config(f"configs/{module}.py:tiny", overrides)


@pytest.mark.parametrize(
    "module,runner,as_file",
    [
        ("lapradoor", "LapradoorRun", False),
        ("lapradoor", "LapradoorRun", True),
        ("spar", "SparRun", False),
        ("spar", "SparRun", True),
    ],
)
def test_a_bare_corpus_is_enough_to_train(tiny_bert, data_dir, tmp_path, module, runner, as_file):
    """A corpus with no queries or qrels (C4, Wikipedia) sets up a run: a folder holding only
    corpus.jsonl.gz, or the corpus file itself. Fails if a runner loads its training corpus
    as an evaluation set again (`load_eval_data` raises on a folder without queries.jsonl,
    and on a file)."""
    import importlib

    cfg = _bare_corpus_config(module, tiny_bert, data_dir, tmp_path, as_file)
    run = getattr(importlib.import_module(f"jaxret.methods.{module}.runner"), runner)(
        cfg, tmp_path / "r"
    )
    assert len(run.corpus) == 82  # adi's documents
    assert not (run.eval_sets if module == "lapradoor" else run.eval_data)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["lapradoor", "spar"])
def test_pretraining_on_a_bare_corpus_end_to_end(tiny_bert, data_dir, tmp_path, module):
    """The same, trained two steps and exported through the loop."""
    import importlib

    cfg = _bare_corpus_config(module, tiny_bert, data_dir, tmp_path, as_file=False)
    importlib.import_module(f"jaxret.methods.{module}.runner").train(cfg, tmp_path / "run")
    assert [r["step"] for r in rows(tmp_path / "run", "train")] == [1, 2]
    assert (tmp_path / "run" / "export" / "jaxret.json").exists()


def test_spar_validates_on_dev_questions_as_the_paper(tiny_bert, data_dir, tmp_path):
    """queries.dev_questions: Λ's model-selection MRR is on real questions whose positive is
    BM25's top-1 (SPAR §4.1, n_p = 1 for validation) in a mini-index of ≤ 2 passages per
    question; the held-out-sentence MRR stays as `sentence_mrr`. Fails if the dev questions
    are ignored (no question_mrr, mrr from sentences) or labelled with several positives."""
    from jaxret.data.readers import read_questions
    from jaxret.methods.spar.runner import SparRun

    questions = data_dir / "adi" / "queries.jsonl.gz"
    cfg = load_config(
        "configs/spar.py:tiny",
        [("model.name", str(tiny_bert)), ("queries.dev_questions", str(questions))],
    )
    run = SparRun(cfg, tmp_path)
    tokens, labels, keep = run.dev_questions
    texts = read_questions(questions)
    _, top1 = run.bm25.retrieve([texts[i] for i in keep], 1)
    np.testing.assert_array_equal(labels.positives[keep, 0], top1[:, 0])
    assert (labels.positives[keep, 1:] < 0).all()  # one positive per question
    out = run.evaluate(run.state, 0)
    assert out["mrr"] == out["question_mrr"] and "sentence_mrr" in out
    assert out["questions"] == len(keep) and out["pool"] <= 2 * len(keep)


@pytest.mark.parametrize(
    "config, step, extra",
    [
        ("spar", "the SPAR train step", ()),
        # ~30-40 s each (their stores built inline): in make test-slow; the mechanism is
        # tested fast in tests/train/test_compile_ahead.py
        pytest.param("lapradoor", "the LaPraDoR train step", (), marks=pytest.mark.slow),
        ("qgen", "the QGen generator's train step", ("generator.tokenizer",)),
        pytest.param(
            "qgen",
            "the QGen retriever's train step",
            ("qgen.stage=retriever", "qgen.pairs=ict", f"data.train_dir={ROOT / 'data' / 'adi'}"),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_each_train_step_is_compiled_at_start_and_refused_if_it_cannot_fit(
    tiny_bert, tmp_path, monkeypatch, capsys, config, step, extra
):
    """Every method's step is compiled while its run is built: on a device holding less
    than it needs (a GPU's `bytes_limit`, here 1 MB) `jaxret train` stops before step 1 in
    one line naming the step and what to change. Fails for a method whose runner leaves its
    step to compile at the first call (then it trains: exit 0)."""
    from jaxret import cli
    from jaxret.train import state as st

    monkeypatch.setattr(st, "device_bytes_limit", lambda: 10**6)
    flags = [f"--config.{x}" if "=" in x else f"--config.{x}={tiny_bert}" for x in extra]
    argv = ["train", f"--config=configs/{config}.py:tiny", f"--config.model.name={tiny_bert}"]
    assert cli.main([*argv, *flags, "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # (with the store's progress bars, built inline)
    (line,) = [x for x in err.splitlines() if x.startswith("jaxret: error:")]
    assert f"{step} needs" in line and "train.batch_size" in line and "Traceback" not in err
    assert not list(tmp_path.rglob("metrics.jsonl"))  # no step logged, no evaluation
