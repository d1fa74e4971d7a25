"""Faults and bad input (issue 21): each is refused in one line naming the file, line, flag or
workdir to fix, and nothing a kill interrupts blocks the next run."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from jaxret import cli
from jaxret.data.readers import DataError, read_beir_corpus, read_qrels


def _beir(tmp_path: Path, data_dir: Path) -> Path:
    """A copy of the bundled adi set (corpus gzipped) to damage."""
    folder = tmp_path / "adi"
    shutil.copytree(data_dir / "adi", folder)
    return folder


def _gz_corpus(folder: Path) -> Path:
    """The folder's corpus as corpus.jsonl.gz only."""
    plain = folder / "corpus.jsonl"
    data = (
        plain.read_bytes()
        if plain.exists()
        else gzip.decompress((folder / "corpus.jsonl.gz").read_bytes())
    )
    plain.unlink(missing_ok=True)
    (folder / "corpus.jsonl.gz").write_bytes(gzip.compress(data))
    return folder / "corpus.jsonl.gz"


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not_gzip"])
def test_damaged_gzip_names_the_file(tmp_path, data_dir, damage, capsys):
    """A truncated, corrupt or non-gzip corpus.jsonl.gz is a DataError naming the file and
    the line reached, and `jaxret eval` prints it in one line with exit 2. Fails if
    iter_lines stops catching EOFError / zlib.error / BadGzipFile (a raw traceback)."""
    folder = _beir(tmp_path, data_dir)
    path = _gz_corpus(folder)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "corrupt":
        path.write_bytes(raw[:20] + bytes(b ^ 0xFF for b in raw[20:60]) + raw[60:])
    else:
        path.write_bytes(b"this is not gzip at all\n" * 10)
    with pytest.raises(DataError, match=rf"{path.name}:\d+: cannot decompress"):
        read_beir_corpus(path)
    code = cli.main(["eval", "--retriever", "bm25", "--data", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(DataError):  # --debug: the traceback, for a bug report
        cli.main(["eval", "--retriever", "bm25", "--data", str(folder), "--debug"])


@pytest.mark.parametrize("content", ["", "query-id\tcorpus-id\tscore\n"])
def test_empty_qrels_are_refused(tmp_path, content):
    """Before issue 21: 'not enough values to unpack' deep in the metrics. Fails if
    read_qrels returns an empty judgement set."""
    path = tmp_path / "test.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{path}: no judgements"):
        read_qrels(path)


@pytest.mark.parametrize("bad_id", ["", "two words", "tab\there"])
def test_ids_a_trec_run_cannot_carry_are_refused_at_read_time(tmp_path, bad_id):
    """An empty id or one with whitespace would give a run file that trec_eval (and our own
    read_run) cannot parse; refused with file:line. Fails without _check_id."""
    path = tmp_path / "corpus.jsonl"
    rows = [{"_id": "d1", "title": "", "text": "a"}, {"_id": bad_id, "title": "", "text": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{path.name}:2: id .* empty or contains whitespace"):
        read_beir_corpus(path)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["eval", "--k", "0"], "--k"),
        (["search", "--index", "x", "--query", "q", "-k", "-3"], "-k"),
        (["eval", "--max-queries", "0"], "--max-queries"),
        (["eval", "--max-length", "0"], "--max-length"),
        (["eval", "--mu", "abc"], "--mu"),
        (["eval", "--hash-split", "1.5"], "--hash-split"),
        (["eval", "--batch-size", "-1"], "--batch-size"),
        (["generate", "--out", "x", "--top-p", "0"], "--top-p"),
        (["prepare", "--workdir", "x", "--workers", "0"], "--workers"),
    ],
)
def test_number_flags_are_range_checked_naming_the_flag(argv, flag, capsys):
    """Before issue 21 `--k 0` gave all-zero metrics with exit 0 and `--max-queries 0`
    evaluated every query. Fails if a flag goes back to type=int."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert f"argument {flag}: expected" in capsys.readouterr().err


def test_config_as_the_last_argument_is_a_usage_error(capsys):
    assert cli.main(["eval", "--config"]) == 2
    assert "--config needs a value" in capsys.readouterr().err


def test_a_torn_last_log_line_is_dropped_and_a_bad_middle_line_named(tmp_path, caplog):
    """A kill mid-write leaves half a JSON row without a newline: the resume drops it (and
    keeps the rows up to the restored step, rewritten atomically). Fails if Logger.read
    parses every line strictly (the resume dies with JSONDecodeError)."""
    from jaxret.train.logs import Logger

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "kind": "tr')
    logger = Logger(tmp_path, resume_step=2)
    logger.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert "cut short by a kill" in caplog.text
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON row"):
        Logger(tmp_path, resume_step=2)


HOLD = """
import sys, time
from jaxret.train.loop import WorkdirLock
lock = WorkdirLock(sys.argv[1])  # kept: a collected lock closes its file
lock.acquire()
print("HELD", flush=True)
time.sleep(600)
"""


def test_one_run_per_workdir(tmp_path, tiny_bert):
    """While a run holds the workdir, `jaxret train` on it refuses at once, naming the holder
    and touching nothing; once the holder is SIGKILLed the lock is free (the kernel releases
    a dead process's flock: no stale lock). Fails without WorkdirLock in loop.run (the
    second run trains into the first one's checkpoints)."""
    from jaxret.configlib import ConfigError, load_config
    from jaxret.methods.art.runner import train

    workdir = tmp_path / "run"
    workdir.mkdir()
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "HELD"
        cfg = load_config("configs/art.py:tiny", [("model.name", str(tiny_bert))])
        with pytest.raises(ConfigError, match=rf"{workdir} is in use by another jaxret run"):
            train(cfg, workdir)
        assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    from jaxret.train.loop import WorkdirLock

    lock = WorkdirLock(workdir)
    lock.acquire()  # free again after the holder died
    lock.release()


def test_encode_replaces_an_index_atomically(tmp_path, tiny_bert, data_dir, monkeypatch, capsys):
    """`jaxret encode --out` into an existing index: killed while writing the new one, the
    old index stays searchable; completed, `out` is the new index and the old one is gone.
    Before issue 21 the old index was deleted first. Fails if _replace_folder writes into
    `out` directly."""
    from jaxret.index.sharded import ShardedIndex

    out = tmp_path / "index"
    args = ["encode", "--model", str(tiny_bert), "--data", str(data_dir / "adi"), "--out", str(out)]
    assert cli.main([*args, "--max-length", "16"]) == 0
    first = ShardedIndex.load(out)

    class Killed(BaseException):  # not an Exception: nothing catches it, as with a kill
        pass

    real_save = ShardedIndex.save

    def save_then_die(self, directory):
        real_save(self, directory)
        raise Killed

    monkeypatch.setattr(ShardedIndex, "save", save_then_die)
    with pytest.raises(Killed):
        cli.main([*args, "--max-length", "24"])
    monkeypatch.setattr(ShardedIndex, "save", real_save)
    kept = ShardedIndex.load(out)
    assert (kept.rows() == first.rows()).all()
    assert cli.main(["search", "--index", str(out), "--query", "indexing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["results"][0]
    assert cli.main([*args, "--max-length", "24"]) == 0
    assert not (ShardedIndex.load(out).rows() == first.rows()).all()
    versions = [p for p in tmp_path.iterdir() if p.name.startswith(".index-")]
    assert [p.name for p in versions if p.name.startswith(".index-link")] == []
    assert out.resolve() in versions  # the live version; the old one was deleted after the swap
    assert len(versions) == 2  # + the killed build's unfinished folder (never linked)


def test_unwritable_outputs_fail_before_any_work(tmp_path, tiny_bert, data_dir, capsys):
    """--out and --run-out under a path that cannot hold a folder are refused in one line
    before anything is read or encoded. Fails without the _writable checks (a traceback
    after the whole encode)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    bad = blocker / "sub" / "index"
    common = ["--model", str(tiny_bert), "--data", str(data_dir / "adi")]
    assert cli.main(["encode", *common, "--out", str(bad)]) == 2
    assert f"--out {bad}: cannot write" in capsys.readouterr().err
    assert cli.main(["eval", "--retriever", "bm25", *common, "--run-out", str(bad)]) == 2
    assert f"--run-out {bad}: cannot write" in capsys.readouterr().err
    train = ["train", "--config=configs/art.py:tiny", f"--config.model.name={tiny_bert}"]
    assert cli.main([*train, "--workdir", str(bad)]) == 2
    assert f"--workdir {bad}: cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flipped", pytest.param("truncated", marks=pytest.mark.slow)])
def test_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
    tmp_path, tiny_bert, damage, caplog
):
    """The newest checkpoint's largest file gets flipped bytes (or is cut in half): the next
    run names it, renames it aside (kept), resumes from the checkpoint before it and logs
    the same losses as the first run. Before issue 21 flipped bytes were loaded without a
    word (NaN steps); fails if verify() stops comparing the CRCs (flipped) or sizes."""
    from jaxret.configlib import load_config
    from jaxret.methods.art.runner import train

    cfg = load_config(
        "configs/art.py:tiny", [("model.name", str(tiny_bert)), ("eval.test_at_end", "false")]
    )
    train(cfg, tmp_path)
    rows = lambda: [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = lambda: [(r["step"], r["loss"]) for r in rows() if r["kind"] == "train"]
    first = losses()
    step6 = tmp_path / "checkpoints" / "6"
    assert (step6 / "jaxret_checksums.0.json").is_file()  # sealed when the run ended
    victim = max((p for p in step6.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = victim.read_bytes()
    if damage == "flipped":
        victim.write_bytes(raw[:100] + bytes(b ^ 0x5A for b in raw[100:164]) + raw[164:])
    else:
        victim.write_bytes(raw[: len(raw) // 2])
    train(cfg, tmp_path)
    (aside,) = (tmp_path / "checkpoints").glob("6.damaged-*")
    assert (aside / victim.relative_to(step6)).is_file()  # set aside, never deleted
    assert "checkpoint 6 is damaged" in caplog.text and "resumed from step 3" in caplog.text
    assert losses() == first  # steps 4-6 retrained from step 3: the same numbers
    assert (tmp_path / "checkpoints" / "6" / "jaxret_checksums.0.json").is_file()


def _kill_during_save_of_6_then_resume(config: str, model: Path, workdir: Path) -> str:
    import time

    from conftest import train_command

    cmd, env = train_command(config, model, workdir, "--config.train.keep_checkpoints=1")
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt, deadline = workdir / "checkpoints", time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if ckpt.is_dir() and any(
            p.name.startswith("6.orbax-checkpoint-tmp") for p in ckpt.iterdir()
        ):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.0005)
    assert proc.wait() == -signal.SIGKILL, "the save of step 6 was not caught in progress"
    assert (ckpt / "3").is_dir()  # keep_checkpoints=1: 3 goes only once 6 is complete
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


@pytest.mark.parametrize(
    "config",
    ["configs/art.py:tiny", pytest.param("configs/lapradoor.py:tiny", marks=pytest.mark.slow)],
)
def test_a_kill_during_a_background_save_keeps_the_previous_checkpoint(tmp_path, tiny_bert, config):
    """SIGKILL while Orbax writes checkpoint 6 (keep_checkpoints=1): checkpoint 3 survives
    and the same command resumes from it. Fails if old checkpoints were removed before the
    new one is complete."""
    err = _kill_during_save_of_6_then_resume(config, tiny_bert, tmp_path)
    assert "resumed from step 3" in err


def test_an_expected_run_failure_is_one_line(tmp_path, tiny_bert, capsys):
    """A job that expected 16 devices but sees 8 stops with one line naming the setting (exit
    2); --debug shows the traceback. Fails if the CLI stops catching RunError."""
    from jaxret.errors import RunError

    argv = [
        "train",
        "--config=configs/art.py:tiny",
        f"--config.model.name={tiny_bert}",
        "--config.distributed.expected_devices=16",
        "--workdir",
        str(tmp_path),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "distributed.expected_devices=16 but JAX sees 8" in err and "Traceback" not in err
    with pytest.raises(RunError):
        cli.main([*argv, "--debug"])
