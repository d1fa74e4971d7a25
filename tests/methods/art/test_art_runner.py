"""The ART loop end to end on the tiny config: refresh, eval, checkpoints, resume, multi-host."""

import json
import math
import socket
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_killed_and_resumed, train_command
from safetensors.numpy import load_file

from jaxret.configlib import load_config
from jaxret.methods.art.runner import train
from jaxret.train.checkpoint import Manager

ROOT = Path(__file__).resolve().parents[3]


def config(tiny_bert, **overrides):
    return load_config(
        "configs/art.py:tiny",
        [("model.name", str(tiny_bert))] + [(k, str(v)) for k, v in overrides.items()],
    )


def train_losses(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def dev_rows(workdir):
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "dev"]


def test_tiny_config_runs_the_whole_loop(tiny_bert, tmp_path):
    summary = train(config(tiny_bert), tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["kind"] == "dev"] == [0, 3, 6]
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
    assert (tmp_path / "best" / "best.json").is_file()
    assert (tmp_path / "export" / "encoder" / "model.safetensors").is_file()
    assert (tmp_path / "training.png").stat().st_size > 10_000
    assert any((tmp_path / "tensorboard").iterdir())
    assert {"top20", "recall@100"} <= set(summary["test_after"])


def test_refreshed_index_equals_fresh_encoding(tiny_bert, tmp_path):
    from jaxret.data.corpus_store import TokenTable
    from jaxret.models import dual_encoder as de

    cfg = config(
        tiny_bert,
        **{
            "train.steps": 3,
            "train.checkpoint_every": 1,
            "train.keep_checkpoints": 3,
            "eval.test_at_end": False,
        },
    )
    summary = train(cfg, tmp_path)
    index = summary["index"]
    assert index.meta["encoder"]["step"] == 2  # refreshed at step 2 (refresh_every = 2)
    mgr = Manager(tmp_path / "checkpoints", 3)
    encoder, params, _ = de.from_pretrained(tiny_bert, de.EncoderSpec.from_config(cfg.model))
    template = jax.tree.map(jax.numpy.asarray, params)
    from jaxret.train import state as train_state
    from jaxret.train.optim import make_optimizer

    state_like = train_state.init_state(template, make_optimizer(cfg.optimizer, 3), 0)
    state2, _, _ = mgr.restore(2, state_like, template["shared"])
    _, index_params3, meta3 = mgr.restore(3, state_like, template["shared"])
    assert meta3["index_step"] == 2
    # The index parameters are the parameters after 2 steps (not the initial ones) ...
    jax.tree.map(np.testing.assert_array_equal, index_params3, state2.params["shared"])
    assert not np.array_equal(
        np.asarray(index_params3["layer_0"]["output"]["kernel"]),
        params["shared"]["layer_0"]["output"]["kernel"],
    )
    # ... and the index is exactly a fresh encoding of every passage with them.
    (folder,) = (tmp_path / "store").glob("passages-*")
    table = TokenTable(folder)
    fresh = jax.jit(lambda p, t: encoder.embed(p, "passage", t))(
        {"shared": index_params3}, table.rows(0, len(table))
    )
    np.testing.assert_allclose(index.rows(), np.asarray(fresh), atol=2e-5)


def test_oracle_teacher_learns_on_real_data(tiny_bert, tmp_path):
    """retrieve → score → KL → refresh really learns: held-out top-20 and Recall@100 rise."""
    cfg = config(
        tiny_bert,
        **{
            "model.pooling": "mean",
            "data.max_docs": 200,
            "data.max_eval_queries": 200,
            "art.top_k": 16,
            "optimizer.lr": 3e-3,
            "train.steps": 40,
            "train.refresh_every": 10,
            "train.eval_every": 1000,
            "train.checkpoint_every": 1000,
            "eval.at_start": False,
        },
    )
    s = train(cfg, tmp_path)
    before, after = s["test_before"], s["test_after"]
    assert before["num_queries"] >= 50
    assert after["top20"] > before["top20"] + 0.03, (before, after)
    assert after["recall@100"] > before["recall@100"], (before, after)


def test_t5_teacher_path_end_to_end(tiny_bert, tmp_path):
    from conftest import T5_TEXTS, save_tiny_t5

    t5 = save_tiny_t5(tmp_path / "t5", T5_TEXTS, gated=True)
    cfg = config(
        tiny_bert,
        **{
            "teacher.kind": "t5",
            "teacher.model": str(t5),
            "teacher.dtype": "bfloat16",
            "train.steps": 3,
            "train.eval_every": 3,
            "eval.test_at_end": False,
        },
    )
    train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    assert all(
        r["teacher_entropy"] < math.log(4) - 1e-3 for r in steps
    )  # the T5 teacher has opinions
    assert len(list((tmp_path / "run" / "store").glob("teacher-*/manifest.json"))) == 1


def _cli(tiny_bert, workdir, *extra, devices=8):
    return train_command("configs/art.py:tiny", tiny_bert, workdir, *extra, devices=devices)


def _run_killed_and_resumed(tiny_bert, tmp_path, extra):
    """SIGKILLed right after the step-4 checkpoint, then resumed (conftest)."""
    run_killed_and_resumed("configs/art.py:tiny", tiny_bert, tmp_path, extra, 4)


def _assert_same_exports(a, b):
    for tower in ("query_encoder", "passage_encoder"):
        x = load_file(str(a / "export" / tower / "model.safetensors"))
        y = load_file(str(b / "export" / tower / "model.safetensors"))
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _events(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "event"]


# Dropout on and two separate towers: the hardest case for bit-exact resumption.
RESUME_ARGS = (
    "--config.art.dropout=true",
    "--config.model.shared=false",
    "--config.train.steps=12",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=4",
    "--config.eval.test_at_end=false",
)


@pytest.mark.slow  # ~2 min; exact sync resume is also checked in-process by
# test_sigterm_during_a_refresh_stops_it_and_saves and tests/test_faults.py
def test_resume_after_sigkill_is_exact(tiny_bert, tmp_path):
    _run_killed_and_resumed(tiny_bert, tmp_path, RESUME_ARGS)
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert len(train_losses(tmp_path / "b")) == 12
    # One corpus encoding per refresh (every 2 steps, not after the last), one at the start,
    # and after the kill exactly one more: the index of the resumed checkpoint, rebuilt once.
    events = _events(tmp_path / "b")
    refreshes = sorted(r["index_refresh"] for r in events if "index_refresh" in r)
    resumes = [r["index_resume"] for r in events if "index_resume" in r]
    assert refreshes == [2, 4, 6, 8, 10]
    assert len(resumes) == 1 and resumes[0] % 2 == 0
    assert [r["index_start"] for r in events if "index_start" in r] == [0]
    _assert_same_exports(tmp_path / "a", tmp_path / "b")


# In make test-slow: each SIGKILL test takes ~2 minutes; the fast set checks a rolling
# resume in process (test_a_resumed_run_compiles_its_evaluation_before_the_first_step).
@pytest.mark.slow
@pytest.mark.parametrize("program", ["separate", "fused"])
def test_rolling_resume_after_sigkill_is_exact(tiny_bert, tmp_path, program):
    """The index and its staleness record are in the checkpoint: nothing is re-encoded on
    resume and the losses (which read the index) and parameters are bit-identical."""
    rolling = ("--config.art.refresh=rolling", f"--config.art.rolling_program={program}")
    _run_killed_and_resumed(
        tiny_bert, tmp_path, (*RESUME_ARGS, *rolling, "--config.train.refresh_every=3")
    )
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert len(train_losses(tmp_path / "b")) == 12
    events = _events(tmp_path / "b")
    assert not [r for r in events if "index_resume" in r]  # restored, not re-encoded
    rolled = sorted({r["step"] for r in events if "refresh_encoded" in r})
    assert rolled == list(range(1, 13))
    _assert_same_exports(tmp_path / "a", tmp_path / "b")


# `fused` in make test-slow: the fused program equals the separate one step for step
# (test_art_step.py::test_fused_rolling_step_equals_step_then_separate_refresh).
@pytest.mark.parametrize("program", ["separate", pytest.param("fused", marks=pytest.mark.slow)])
def test_rolling_refresh_in_the_loop(tiny_bert, tmp_path, program, monkeypatch):
    """A cycle of refresh_every steps encodes the corpus exactly once; staleness is logged
    every step and reported by the evaluation, which reads the training index (no corpus
    encoding between the start's and the final test's); the run ends with a fresh test
    index. Fails if evaluation encodes a scratch index (eval.index=training falling back).

    The dev evaluations are spread over steps (eval.slices=3): step 3's queries are
    searched one third per step after step 5 (step 3 carries a checkpoint: its queries are
    encoded after step 4, with step 3's parameters), each in
    the training index of that step (the rolling refresh replaces it every step: a search
    of a captured index fails on its donated buffer); the one at step 0 gives the metrics
    of an evaluation at once.
    Fails if the slices are searched together, or in the first part."""
    from jaxret.methods.art import runner as art_run

    whys = []
    real_encode = art_run.ArtRun._encode
    monkeypatch.setattr(
        art_run.ArtRun,
        "_encode",
        lambda self, params, step, why, donor: (
            whys.append(why) or real_encode(self, params, step, why, donor)
        ),
    )
    trained, searches, at_once = [0], [], {}
    real_step, real_search = art_run.ArtRun.train_step, art_run.ev.search_index
    real_evaluation = art_run.ArtRun.evaluation

    def train_step(self, state, batch):
        trained[0] += 1
        return real_step(self, state, batch)

    def search_index(index, queries, *a, **k):
        searches.append((trained[0], len(queries)))
        return real_search(index, queries, *a, **k)

    def evaluation(self, state, step):
        if step == 0:
            at_once[0] = self.evaluate(state, 0)
            searches.clear()
        return real_evaluation(self, state, step)

    monkeypatch.setattr(art_run.ArtRun, "train_step", train_step)
    monkeypatch.setattr(art_run.ArtRun, "evaluation", evaluation)
    monkeypatch.setattr(art_run.ev, "search_index", search_index)
    cfg = config(
        tiny_bert,
        **{
            "art.refresh": "rolling",
            "art.rolling_program": program,
            "train.steps": 6,
            "train.refresh_every": 3,
            "train.eval_every": 3,
            "eval.test_at_end": True,
            "eval.test_baseline": False,
            "eval.slices": 3,
        },
    )
    summary = train(cfg, tmp_path)
    sizes = [14, 14, 12]  # 40 dev queries in 3 slices (each one program call of 14)
    assert searches[:3] == [(0, n) for n in sizes]  # the start's: at once, in slices
    # step 3's (a checkpoint step): its queries encoded after step 4, slices searched after
    # step 5, then the rest at step 6, where the next evaluation is due
    assert searches[3:9] == [(5, 14), (6, 14), (6, 12)] + [(6, n) for n in sizes]
    assert len(searches) == 10  # and the final test's, at once
    n = summary["index"].layout.num_rows
    events = [r for r in _events(tmp_path) if "refresh_encoded" in r]
    assert [r["step"] for r in events] == [1, 2, 3, 4, 5, 6]
    per_step = [r["refresh_encoded"] for r in events]
    assert sum(per_step[:3]) == n and sum(per_step[3:]) == n  # the corpus, once per cycle
    assert [r["refresh_staleness_max"] for r in events[2:]] == [2, 2, 2, 2]
    dev = [
        json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"dev"' in x
    ]
    assert [r["step"] for r in dev] == [0, 3, 6]
    metrics = {k: v for k, v in dev[0].items() if k not in ("time", "eval_seconds")}
    assert metrics == pytest.approx({"step": 0, "kind": "dev", **at_once[0]}, abs=1e-6)
    at3 = [r for r in dev if r["step"] == 3][0]
    # Ages relative to step 3's parameters of the index its first part read (step 4's: rows
    # of steps 2, 3 and 4; the one of step 4 is newer than the parameters evaluated).
    assert at3["index_staleness_max"] == 1 and -1 < at3["index_staleness_mean"] < 1
    # The test split was searched on a fresh encoding by the final parameters.
    assert summary["index_step"] == 6 and summary["index"].meta["encoder"] == {"step": 6}
    assert "test_after" in summary
    assert whys == ["start", "test"]  # evaluations at 0, 3 and 6 encoded nothing


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tiny_bert, workdir, extra, timeout=600):
    """`jaxret train` as 2 processes × 4 devices on one coordinator: (procs, outputs)."""
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd, env = _cli(
            tiny_bert,
            workdir,
            *extra,
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={pid}",
            devices=4,
        )
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    return procs, outs


# `jaxret prepare` whose tokenizing waits for a file: a store build that takes as long as
# the test wants (at the paper's size it takes an hour).
_SLOW_PREPARE = """
import sys, time
from pathlib import Path
from jaxret.data import corpus_store
real = corpus_store._tokenize_shard
def slow(*a, **k):
    while not Path(sys.argv[1]).exists():
        time.sleep(0.05)
    return real(*a, **k)
corpus_store._tokenize_shard = slow
from jaxret.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _two_processes_refuse_while_the_store_is_built(tiny_bert, workdir, extra, prepare, env):
    """While `jaxret prepare` is still tokenizing (its shards folder exists, its table does
    not), both processes of a 2-process run stop at once naming `jaxret prepare`: neither
    tokenizes, and neither waits in a device collective for the store — a wait would
    outlast the short deadline (on GPU, NCCL's first collective times out after 10
    minutes; here the processes must be gone well inside 240 s, while the build is held).
    Before issue 19 process 1 waited in a barrier while process 0 tokenized; fails if a
    missing table is built inline again or waited for. → the finished prepare (Popen)."""
    import sys
    import time

    release = workdir / "release-prepare"
    workdir.mkdir(parents=True, exist_ok=True)
    slow = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PREPARE, str(release), *prepare[3:]],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    while not list(workdir.glob("store/.passages-*.shards")) and time.time() < deadline:
        assert slow.poll() is None, slow.communicate()[0].decode()[-2000:]
        time.sleep(0.1)
    t0 = time.time()
    procs, outs = _two_processes(tiny_bert, workdir, extra, timeout=240)
    assert [p.returncode for p in procs] == [2, 2], outs
    for out in outs:
        assert "jaxret prepare" in out and "Traceback" not in out, out[-2000:]
    assert time.time() - t0 < 240
    assert not list(workdir.glob("store/passages-*"))  # nothing was built by them
    assert slow.poll() is None  # the build was in progress all along
    release.touch()
    out = slow.communicate(timeout=300)[0].decode()
    assert slow.returncode == 0, out[-2000:]


@pytest.mark.parametrize("refresh", ["sync", pytest.param("rolling", marks=pytest.mark.slow)])
def test_two_processes_match_one_process(tiny_bert, tmp_path, refresh):
    extra = (
        f"--config.art.refresh={refresh}",
        "--config.train.steps=3",
        "--config.eval.at_start=false",
        "--config.eval.test_at_end=false",
    )
    cmd, env = _cli(tiny_bert, tmp_path / "single", *extra)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)

    cmd, env = _cli(tiny_bert, tmp_path / "multi", *extra)
    prepare = [*cmd[:3], "prepare", *cmd[4:], "--workers", "2"]  # the same config, no train
    if refresh == "sync":  # the refusal does not depend on the refresh mode: checked once
        _two_processes_refuse_while_the_store_is_built(
            tiny_bert, tmp_path / "multi", extra, prepare, env
        )
    else:
        subprocess.run(prepare, env=env, cwd=ROOT, check=True, capture_output=True)
    # Each process matches the dev answers in a worker and waits, polling, until every
    # process's worker is done (one flag gathered per poll: all take the same branch).
    workers = "--config.eval.answer_workers=1"
    procs, outs = _two_processes(tiny_bert, tmp_path / "multi", (*extra, workers))
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    single, multi = train_losses(tmp_path / "single"), train_losses(tmp_path / "multi")
    dev = [dev_rows(tmp_path / run) for run in ("single", "multi")]
    assert [r["step"] for r in dev[1]] == [3]
    for k in ("top1", "top5", "top20", "top100"):  # a near tie may flip one of 40 questions
        assert abs(dev[0][0][k] - dev[1][0][k]) <= 1 / 40 + 1e-9, (k, dev)
    assert [s for s, _ in multi] == [1, 2, 3]
    # Each process sealed the checkpoint files it wrote (no process hashes the others').
    step = tmp_path / "multi" / "checkpoints" / "3"
    sealed = {p.name: json.loads(p.read_text()) for p in step.glob("jaxret_checksums.*.json")}
    assert sorted(sealed) == ["jaxret_checksums.0.json", "jaxret_checksums.1.json"]
    assert sealed["jaxret_checksums.1.json"]
    assert all("ocdbt.process_1" in name for name in sealed["jaxret_checksums.1.json"])
    if refresh == "rolling":  # each process wrote its own devices' rows of the index
        rows = tmp_path / "multi" / "checkpoints" / "rows-3"
        blocks = [
            json.loads((rows / f"manifest.process_{p}.json").read_text())["blocks"]
            for p in range(2)
        ]
        assert sorted(blocks[0] + blocks[1]) == list(range(8)) and all(len(b) == 4 for b in blocks)
    np.testing.assert_allclose(
        [loss for _, loss in multi], [loss for _, loss in single], rtol=1e-5, atol=1e-7
    )


def test_cli_evaluates_a_training_run_and_its_best(tiny_bert, tmp_path, capsys):
    from jaxret import cli

    train(config(tiny_bert), tmp_path / "run")
    data = ROOT / "data" / "squad-dev-open"
    results = {}
    for model in ("run", "run/best", "run/export"):
        code = cli.main(
            [
                "eval",
                "--data",
                str(data),
                "--model",
                str(tmp_path / model),
                "--max-queries",
                "20",
                "--max-docs",
                "60",
                "--json",
                "--store",
                str(tmp_path / "store"),
            ]
        )
        assert code == 0
        results[model] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["run"]["ndcg@10"] == results["run/export"]["ndcg@10"]
    assert results["run"]["retriever"]["pooling"] == "cls"  # the run's spec, not the default
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dev = {r["step"]: r["top20"] for r in rows if r["kind"] == "dev"}
    assert set(dev) == {0, 3, 6}  # the starting point counts: best may be "no training"
    assert best["value"] == max(dev.values()) and dev[best["step"]] == best["value"]
    assert (tmp_path / "run" / "best").is_symlink()  # swapped atomically


@pytest.mark.parametrize("refresh", ["sync", pytest.param("rolling", marks=pytest.mark.slow)])
def test_start_and_resume_each_encode_the_corpus_once(tiny_bert, tmp_path, monkeypatch, refresh):
    """Real corpus encodings (calls of the device encoding `refresh_in_slices`) up to the end
    of the first train step of each run: one on a fresh start (stopped by SIGTERM after step
    3); on a resume from that newest checkpoint one with sync (its step's index) and none with
    rolling (the index is in the checkpoint); on a resume from an older checkpoint (step 3
    once step 6 is saved and then lost) one in both modes — rolling keeps the index in the
    newest checkpoint only. Before issue 19 a sync resume encoded twice (the start index,
    then the resumed one); fails if `__init__` encodes eagerly again, or (rolling) if the
    newest checkpoint's index is not restored."""
    import os
    import shutil
    import signal

    from jaxret.methods.art import runner as art_run

    calls, before_first_step, stop_after = [], [], [3]
    real_refresh, real_step = art_run.refresh_in_slices, art_run.ArtRun.train_step
    monkeypatch.setattr(
        art_run, "refresh_in_slices", lambda *a, **k: calls.append(1) or real_refresh(*a, **k)
    )

    def step(self, state, batch):  # counts up to the end of the first step (which encodes
        out = real_step(self, state, batch)  # a pending index first)
        if not self.__dict__.get("_stepped"):
            self._stepped = True
            before_first_step.append(len(calls))
        if stop_after and int(jax.device_get(out[0].step)) == stop_after[0]:
            stop_after.clear()
            os.kill(os.getpid(), signal.SIGTERM)  # seen after this step: step 3 is saved
        return out

    monkeypatch.setattr(art_run.ArtRun, "train_step", step)
    cfg = config(tiny_bert, **{"art.refresh": refresh, "eval.test_at_end": False})
    assert train(cfg, tmp_path)["preempted_at"] == 3
    assert before_first_step == [1]
    calls.clear()
    assert "preempted_at" not in train(cfg, tmp_path)  # from step 3, the newest
    assert before_first_step == [1, 1 if refresh == "sync" else 0]
    # From step 3 again, now older than step 6 (lost), whose save dropped step 3's index.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    calls.clear()
    train(cfg, tmp_path)
    assert before_first_step == [1, 1 if refresh == "sync" else 0, 1]


def test_sigterm_during_a_refresh_stops_it_and_saves(tiny_bert, tmp_path, monkeypatch):
    """A SIGTERM in the middle of a sync refresh (8 slices of one call) is seen at the next
    slice: the refresh stops, the step is saved, and the resumed run equals an uninterrupted
    one. Before issue 19 the flag was read only after the refresh and the evaluation (an
    8-minute stall at the paper's size); fails if `refresh_in_slices` stops calling check."""
    import os
    import signal

    from jaxret.methods.art import runner as art_run

    overrides = {
        "encode.device_batch": 2,
        "encode.calls_per_slice": 1,  # 16 rows per device: 8 slices per encoding
        "eval.test_at_end": False,
    }
    cfg = config(tiny_bert, **overrides)
    reference = train(cfg, tmp_path / "a")
    checks = []
    real_bind = art_run.ArtRun.bind_stop

    def bind(self, check):
        def checking():
            checks.append(self.refresh.done)
            if checks.count(2) == 3:  # the third slice of the step-2 refresh
                os.kill(os.getpid(), signal.SIGTERM)
            check()

        real_bind(self, checking)

    monkeypatch.setattr(art_run.ArtRun, "bind_stop", bind)
    stopped = train(cfg, tmp_path / "b")
    assert stopped["preempted_at"] == 2 and checks.count(2) == 3  # no slice after the signal
    assert (tmp_path / "b" / "checkpoints" / "2").is_dir()
    monkeypatch.setattr(art_run.ArtRun, "bind_stop", real_bind)
    resumed = train(cfg, tmp_path / "b")
    assert "preempted_at" not in resumed
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert reference["final_step_loss"] == resumed["final_step_loss"]
    exported = sorted((tmp_path / "a" / "export").rglob("*.safetensors"))
    assert exported
    for path in exported:
        a, b = (
            load_file(str(path)),
            load_file(str(tmp_path / "b" / path.relative_to(tmp_path / "a"))),
        )
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# In make test-slow (~30 s each): the fast set checks that rolling evaluations encode nothing
# in test_rolling_refresh_in_the_loop[separate].
@pytest.mark.slow
@pytest.mark.parametrize("refresh", ["sync", "rolling"])
def test_dev_evaluation_reads_the_training_index(tiny_bert, tmp_path, monkeypatch, refresh):
    """eval.index=training (the default): dev evaluations at steps 3 and 6 encode nothing
    (the run's only corpus encoding is the start's) and report the index's age relative to
    the evaluated parameters — step 3 is a checkpoint step, so its evaluation starts after
    step 4, whose sync refresh made the index one step newer (age −1) and whose rolling
    slice replaced the oldest rows (staleness max 2); "fresh" encodes a scratch index per
    evaluation. Before issue 19 every evaluation off a refresh step encoded the corpus into
    a second index; fails if "training" falls back to it."""
    from jaxret.methods.art import runner as art_run

    calls = []
    real_refresh = art_run.refresh_in_slices
    monkeypatch.setattr(
        art_run, "refresh_in_slices", lambda *a, **k: calls.append(k) or real_refresh(*a, **k)
    )
    base = {"art.refresh": refresh, "eval.test_at_end": False, "train.refresh_every": 4}
    train(config(tiny_bert, **base), tmp_path / "training")
    rows = [
        json.loads(x)
        for x in (tmp_path / "training" / "metrics.jsonl").read_text().split("\n")
        if x
    ]
    dev = {r["step"]: r for r in rows if r["kind"] == "dev"}
    assert sorted(dev) == [0, 3, 6]
    if refresh == "sync":  # encodings: start, refresh after step 4 (not after the last)
        assert len(calls) == 2
        assert [dev[s]["index_age"] for s in (0, 3, 6)] == [0, -1, 2]
    else:
        assert len(calls) == 1
        assert dev[3]["index_staleness_max"] == 2 and dev[6]["index_staleness_max"] <= 3
    calls.clear()
    train(config(tiny_bert, **base, **{"eval.index": "fresh"}), tmp_path / "fresh")
    assert len(calls) == (4 if refresh == "sync" else 3)  # + a scratch index at 3 and 6


def test_dev_answers_are_matched_by_workers_beside_training(tiny_bert, tmp_path, monkeypatch):
    """eval.answer_workers=2 with the search in 2 slices: DPR's answer matching runs in 2
    spawned processes while the next steps run, and every dev row (steps 1 and 2) is the
    one the calling thread's matching gives (answer_workers=0). Fails if ART's evaluation
    matches in the training thread whatever the setting (no worker ever started), or if
    a slice's answers are matched against another slice's passages."""
    from jaxret.eval import qa

    made = []

    class Recording(qa.AnswerMatcher):
        def __init__(self, workers):
            super().__init__(workers)
            made.append(self)

    monkeypatch.setattr(qa, "AnswerMatcher", Recording)
    base = {
        "train.steps": 2,
        "train.eval_every": 1,
        "eval.at_start": False,
        "eval.test_at_end": False,
        "eval.slices": 2,
    }
    dev = {}
    for workers in (0, 2):
        workdir = tmp_path / str(workers)
        train(config(tiny_bert, **base, **{"eval.answer_workers": workers}), workdir)
        dev[workers] = [
            {k: v for k, v in r.items() if k not in ("eval_seconds", "time")}
            for r in dev_rows(workdir)
        ]
    try:
        assert [m.workers for m in made] == [0, 2]
        assert made[0]._pool is None and len(made[1]._pool._processes) == 2
    finally:
        made[1].close()
    assert [r["step"] for r in dev[2]] == [1, 2] and "top20" in dev[2][0]
    assert dev[2] == dev[0]


def test_rolling_index_is_kept_in_the_newest_checkpoint_only(tiny_bert, tmp_path, monkeypatch):
    """Rolling refresh checkpoints its index (32 GB at the paper's size) beside the newest
    step only: `rows-6/` is complete and `rows-3/` gone once it is, and the Orbax steps
    hold no index. A resume from step 3 (step 6 removed) encodes the index once with step
    3's parameters, removes `rows-6/` (a later step's) and trains to the end. Fails if
    older row snapshots are kept (the first assert) or a resume uses another step's rows."""
    import shutil

    from jaxret.methods.art import runner as art_run
    from jaxret.train import row_snapshot

    cfg = config(
        tiny_bert,
        **{"art.refresh": "rolling", "eval.test_at_end": False, "train.keep_checkpoints": 3},
    )
    train(cfg, tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert sorted(row_snapshot.snapshot_steps(ckpts)) == [6]
    assert row_snapshot.complete(ckpts / "rows-6")
    assert not list((ckpts / "6").rglob("*embedding*"))  # the index is not in Orbax's step
    shutil.rmtree(ckpts / "6")
    calls = []
    real_refresh = art_run.refresh_in_slices
    monkeypatch.setattr(
        art_run, "refresh_in_slices", lambda *a, **k: calls.append(1) or real_refresh(*a, **k)
    )
    train(cfg, tmp_path)
    assert len(calls) == 1  # the index of step 3's parameters, once
    assert not list(ckpts.glob("*.damaged-*"))
    steps = [s for s, _ in train_losses(tmp_path)]
    assert steps == [1, 2, 3, 4, 5, 6]  # (the log is cut back to step 3 on resume)
    events = _events(tmp_path)
    assert [r["index_resume"] for r in events if "index_resume" in r] == [3]
    assert sorted(row_snapshot.snapshot_steps(ckpts)) == [6]  # the new step 6's


def test_a_resumed_run_compiles_its_evaluation_before_the_first_step(
    tiny_bert, tmp_path, monkeypatch
):
    """A rolling run stopped by SIGTERM at step 3 resumes exactly (the losses of an
    uninterrupted run), and after the resume its evaluation programs (query encoder,
    search) compile in the loop's warm-up, before training: the first scheduled dev
    evaluation compiles nothing. Before, it compiled mid-training, the rehearsal's largest
    step-to-step gap (4.1 × p50, docs/scaling.md). The stopped run evaluates nothing and its
    query batch (24) is used by no other test, so nothing is compiled for it in advance.
    Fails without `warm_up(start)` in loop._run (the step-6 evaluation then compiles), or if
    the rolling index or its staleness record is not restored exactly (losses differ)."""
    import os
    import signal

    from jaxret.methods.art import runner as art_run

    cfg = config(
        tiny_bert,
        **{
            "art.refresh": "rolling",
            "train.refresh_every": 3,
            "train.eval_every": 6,
            "eval.at_start": False,
            "eval.test_at_end": False,
            "encode.batch_size": 24,
        },
    )
    real_after_step = art_run.ArtRun.after_step

    def stop_at_3(self, state, done):
        out = real_after_step(self, state, done)
        if done == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(art_run.ArtRun, "after_step", stop_at_3)
    assert train(cfg, tmp_path / "b")["preempted_at"] == 3
    monkeypatch.setattr(art_run.ArtRun, "after_step", real_after_step)

    compiles: list[str] = []

    def count(event: str, seconds: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    per_call: dict[int, int] = {}
    real_evaluate = art_run.ArtRun.evaluate

    def evaluate(self, state, step):
        before = len(compiles)
        out = real_evaluate(self, state, step)
        per_call[step] = len(compiles) - before
        return out

    monkeypatch.setattr(art_run.ArtRun, "evaluate", evaluate)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        train(cfg, tmp_path / "b")
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert per_call[6] == 0  # the scheduled evaluation compiled nothing
    assert per_call[3] > 0  # the warm-up at the resume step compiled them
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "warm_up_seconds" in r] == [3]
    assert [r["step"] for r in rows if r["kind"] == "dev"] == [6]  # the warm-up is unlogged
    train(cfg, tmp_path / "a")  # uninterrupted
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert len(train_losses(tmp_path / "b")) == 6


def test_rolling_index_saved_as_bf16_does_not_restore_into_bits(tmp_path, caplog):
    """A rolling index whose rows are bf16 values (saved on GPU/TPU) is not restored by a run
    that stores them as bits (CPU), and the other way round (the index is encoded again
    instead of bits and values being read as each other); the same storage restores bit for
    bit. Fails if the row snapshot is read whatever the saved dtype (tried: no dtype check
    and one key for both: the bits come back as bf16 values)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxret.index.mips import BF16_BITS, to_storage
    from jaxret.methods.art.refresh import _rows_key
    from jaxret.train.row_snapshot import Rows

    mesh = jax.make_mesh((8,), ("rows",))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    values = jnp.asarray(np.linspace(-3, 3, 64 * 8, dtype=np.float32).reshape(64, 8))
    values = jax.device_put(values.astype(jnp.bfloat16), rows)
    bits = jax.device_put(to_storage(values, BF16_BITS), rows)
    stale = jax.device_put(jnp.zeros((64,), jnp.int32), rows)
    state = {"w": jnp.arange(4.0)}
    for saved, resumed in ((values, bits), (bits, values)):
        mgr = Manager(tmp_path / str(saved.dtype), keep=2)
        mgr.save(1, state, None, {}, Rows({_rows_key(saved): saved, "stale": stale}, 4, 2, 0), True)
        mgr.wait()
        assert (
            mgr.restore_rows(1, Rows({_rows_key(resumed): resumed, "stale": stale}, 4, 2, 0))
            is None
        )
        donor = {_rows_key(saved): jnp.zeros_like(saved), "stale": jnp.zeros_like(stale)}
        back = mgr.restore_rows(1, Rows(donor, 4, 2, 0))  # written into the donor
        np.testing.assert_array_equal(np.asarray(back[_rows_key(saved)]), np.asarray(saved))
    assert "its row state is not used" in caplog.text


@pytest.mark.slow  # four tiny runs (~45 s)
def test_a_resume_prefers_the_step_whose_index_is_whole(tiny_bert, tmp_path, monkeypatch):
    """A kill while step 6's row snapshot is being written leaves it without its manifest
    while step 3's is still whole (older snapshots go only once a newer one is complete):
    the resume starts from step 3 — its index restored, nothing encoded — sets step 6
    aside as superseded, and trains 4–6 to the uninterrupted run's losses. From step 6 the
    index would be encoded again and the run would not continue exactly. Fails if
    `step_with_rows` keeps the newest step (tried: no step is set aside, the index is
    encoded once)."""
    import os
    import shutil
    import signal

    from jaxret.methods.art import runner as art_run

    cfg = config(tiny_bert, **{"art.refresh": "rolling", "eval.test_at_end": False})
    train(cfg, tmp_path / "a")
    real_step = art_run.ArtRun.train_step

    def step(self, state, batch):
        out = real_step(self, state, batch)
        if int(jax.device_get(out[0].step)) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # step 3 saved, its rows at once
        return out

    monkeypatch.setattr(art_run.ArtRun, "train_step", step)
    b = tmp_path / "b"
    assert train(cfg, b)["preempted_at"] == 3
    monkeypatch.setattr(art_run.ArtRun, "train_step", real_step)
    ckpts = b / "checkpoints"
    shutil.copytree(ckpts / "rows-3", tmp_path / "rows-3")
    train(cfg, b)  # to step 6; rows-3 is removed once rows-6 is complete
    shutil.copytree(tmp_path / "rows-3", ckpts / "rows-3")
    (ckpts / "rows-6" / "manifest.process_0.json").unlink()  # as if killed mid-write
    calls = []
    real_refresh = art_run.refresh_in_slices
    monkeypatch.setattr(
        art_run, "refresh_in_slices", lambda *a, **k: calls.append(1) or real_refresh(*a, **k)
    )
    train(cfg, b)
    assert calls == []  # step 3's index restored
    assert len(list(ckpts.glob("6.superseded-*"))) == 1
    assert train_losses(b) == train_losses(tmp_path / "a")


def test_a_rolling_run_resumes_on_fewer_devices(tiny_bert, tmp_path, monkeypatch):
    """A rolling run saved on 8 devices (16 rows per device) resumes on 4 (32 per device):
    its row snapshot is read into the new layout — nothing encoded, the index and each row's
    step what the uninterrupted 8-device run holds after step 3, every row where it was —
    and trains to the end. (Its later losses are not the 8-device run's: a refresh slice is
    a share of each device's rows, so steps 4–6 refresh other rows first.) Fails if the
    snapshot is refused on another layout (tried: `check` returning a reason when the rows
    per device differ → one encoding), or if rows are read by the new rows per device."""
    import os
    import signal

    from jaxret.methods.art import runner as art_run
    from jaxret.parallel import mesh as mesh_mod

    cfg = config(
        tiny_bert,
        **{
            "art.refresh": "rolling",
            "train.refresh_every": 3,
            "train.steps": 4,
            "train.eval_every": 100,
            "eval.test_at_end": False,
        },
    )
    real_step = art_run.ArtRun.train_step
    held: dict[str, tuple] = {}  # run → (devices, rows on the host) before step 4
    run = ["a"]

    def step(self, state, batch):
        if int(jax.device_get(state.step)) == 3:
            arrays = self.rows().arrays
            held[run[0]] = (
                len(arrays["stale"].sharding.device_set),
                {k: np.asarray(v)[:120] for k, v in arrays.items()},  # the 120 passages
            )
        out = real_step(self, state, batch)
        if run[0] == "b" and "b" not in held:
            if int(jax.device_get(out[0].step)) == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # step 3 saved, its rows with it
        return out

    monkeypatch.setattr(art_run.ArtRun, "train_step", step)
    train(cfg, tmp_path / "a")
    b, run[0] = tmp_path / "b", "b"
    assert train(cfg, b)["preempted_at"] == 3
    real_fit = mesh_mod.fit_devices
    monkeypatch.setattr(mesh_mod, "fit_devices", lambda *a: real_fit(*a)[:4])  # a 4-device host
    calls = []
    real_refresh = art_run.refresh_in_slices
    monkeypatch.setattr(
        art_run, "refresh_in_slices", lambda *a, **k: calls.append(1) or real_refresh(*a, **k)
    )
    train(cfg, b)
    assert calls == []  # the saved index restored, nothing encoded
    (devices_a, rows_a), (devices_b, rows_b) = held["a"], held["b"]
    assert (devices_a, devices_b) == (8, 4)
    assert rows_a.keys() == rows_b.keys()
    for key in rows_a:
        np.testing.assert_array_equal(rows_b[key], rows_a[key])
    assert len(np.unique(rows_a["stale"])) > 1  # rows of several steps: their places matter
    assert [s for s, _ in train_losses(b)] == [1, 2, 3, 4]


def test_the_train_step_compiles_before_the_index_exists(tiny_bert, tmp_path):
    """A constructed run holds its train step compiled and its index not yet allocated: the
    compiler's host memory never adds to the index's (the start's peak in the rehearsal,
    docs/scaling.md). Fails if the refresh allocates its index at construction again, or if
    the step is left to compile at its first call."""
    from jaxret.index.encode import is_allocated
    from jaxret.methods.art.runner import ArtRun

    for refresh in ("sync", "rolling"):
        run = ArtRun(config(tiny_bert, **{"art.refresh": refresh}), tmp_path / refresh)
        assert isinstance(run.step_fn, jax.stages.Compiled)
        assert not is_allocated(run.refresh.index)


def test_rows_found_damaged_while_read_are_rebuilt(tiny_bert, tmp_path, caplog):
    """A rolling run's row snapshot with a flipped bit: `restore_rows` reads it into the
    run's index (one pass, its CRC32s checked as read), says why it is not used and returns
    None; the run then allocates its index again (the one read into was consumed) and
    encodes it: the same rows as before the save. Fails if a consumed index counts as
    allocated (tried: `is_allocated` without `is_deleted`: the encode's donor is deleted)."""
    from jaxret.methods.art.runner import ArtRun
    from jaxret.train.checkpoint import Manager

    run = ArtRun(config(tiny_bert, **{"art.refresh": "rolling"}), tmp_path / "run")
    run.refresh.ensure(run.state)
    before = {k: np.asarray(v) for k, v in run.rows().arrays.items()}
    mgr = Manager(tmp_path / "ckpt", keep=2)
    mgr.save(1, run.state, None, {}, run.rows(), True)
    mgr.wait()
    (data,) = (tmp_path / "ckpt" / "rows-1").glob("embedding*.process_0.bin")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    assert mgr.restore_rows(1, run.rows()) is None
    assert "its row state is not used" in caplog.text and "CRC32 differs" in caplog.text
    run.restore_aux(None, {"step": 1})
    run.refresh.ensure(run.state)
    after = {k: np.asarray(v) for k, v in run.rows().arrays.items()}
    np.testing.assert_array_equal(after.pop("stale"), np.ones_like(before.pop("stale")))
    for k in before:
        np.testing.assert_allclose(after[k], before[k], rtol=1e-6)


def test_a_train_step_that_cannot_fit_a_device_is_refused_before_any_encoding(
    tiny_bert, tmp_path, monkeypatch, capsys
):
    """On a device that holds less than the compiled step needs (a GPU's `bytes_limit`,
    here 1 MB), `jaxret train` stops with one line naming the config keys to change, before
    the corpus is encoded once; fails if the limit is not checked (the run trains) or is
    checked only at the first step (after the start's encoding)."""
    from jaxret import cli
    from jaxret.methods.art import runner as art_run
    from jaxret.train import state as st

    calls = []
    real = art_run.refresh_in_slices
    monkeypatch.setattr(
        art_run, "refresh_in_slices", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    monkeypatch.setattr(st, "device_bytes_limit", lambda: 10**6)
    argv = ["train", "--config=configs/art.py:tiny", f"--config.model.name={tiny_bert}"]
    assert cli.main([*argv, "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # (with the store's progress bars, built inline)
    (line,) = [x for x in err.splitlines() if x.startswith("jaxret: error:")]
    assert "the ART train step needs" in line and "Traceback" not in err
    assert "device can hold 0.00 GB" in line and "train.batch_size" in line
    assert calls == []
