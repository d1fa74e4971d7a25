"""The shared loop's guarantees, exercised through ART on the tiny config: non-finite steps are
skipped and never checkpointed, a changed config is refused on resume, SIGTERM leaves an
exact checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_command
from safetensors.numpy import load_file

from jaxret import host_memory
from jaxret.configlib import ConfigError, load_config
from jaxret.methods.art import runner as art_train
from jaxret.train import state as train_state
from jaxret.train.checkpoint import Manager

ROOT = Path(__file__).resolve().parents[2]


def config(tiny_bert, **overrides):
    return load_config(
        "configs/art.py:tiny",
        [("model.name", str(tiny_bert))] + [(k, str(v)) for k, v in overrides.items()],
    )


def rows(workdir, kind):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def poison(monkeypatch, steps):
    original = art_train.ArtRun.batch_at

    def batch_at(self, step):
        batch = original(self, step)
        if step in steps:  # a NaN teacher score: the loss and every gradient become NaN
            batch = {**batch, "teacher_scores": batch["teacher_scores"] * jnp.nan}
        return batch

    monkeypatch.setattr(art_train.ArtRun, "batch_at", batch_at)


def test_nonfinite_step_is_skipped_and_never_checkpointed(tiny_bert, tmp_path, monkeypatch):
    poison(monkeypatch, {2})  # the 3rd step
    cfg = config(
        tiny_bert,
        **{"train.checkpoint_every": 1, "train.keep_checkpoints": 10, "eval.test_at_end": False},
    )
    summary = art_train.train(cfg, tmp_path)
    train = rows(tmp_path, "train")
    assert [r["skipped"] for r in train] == [0, 0, 1, 0, 0, 0]
    assert np.isnan(train[2]["loss"]) and all(
        np.isfinite(r["loss"]) for i, r in enumerate(train) if i != 2
    )
    assert summary["skipped_steps"] == 1
    if host_memory.return_free_heap() is not None:  # glibc: the loop gives back freed heap
        # before the first step and after it, when compiling is over (mutation: no call
        # after the first step → [0], fails).
        trims = [r["step"] for r in rows(tmp_path, "event") if "heap_returned_mb" in r]
        assert trims == [0, 1]
    mgr = Manager(tmp_path / "checkpoints", 10)
    state_like = jax.tree.map(jnp.asarray, summary["state"])
    aux_like = summary["state"].params["shared"]
    at2, _, _ = mgr.restore(2, state_like, aux_like)
    at3, _, _ = mgr.restore(3, state_like, aux_like)
    # The skipped step changed nothing but the step and the counters.
    jax.tree.map(np.testing.assert_array_equal, at3.params, at2.params)
    jax.tree.map(np.testing.assert_array_equal, at3.opt_state, at2.opt_state)
    assert int(at3.step) == 3 and int(at3.skipped) == 1 and int(at3.skipped_in_a_row) == 1
    for step in mgr.all_steps():
        restored, _, _ = mgr.restore(step, state_like, aux_like)
        assert bool(train_state.all_finite(restored.params))
    final = summary["state"].params
    assert not np.array_equal(
        np.asarray(final["shared"]["pooler"]["kernel"]) if "pooler" in final["shared"] else 0, 1
    )


def test_too_many_nonfinite_steps_stop_the_run(tiny_bert, tmp_path, monkeypatch):
    poison(monkeypatch, {2, 3, 4, 5})
    cfg = config(
        tiny_bert,
        **{
            "train.checkpoint_every": 1,
            "train.max_skipped_in_a_row": 3,
            "eval.test_at_end": False,
        },
    )
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss"):
        art_train.train(cfg, tmp_path)
    mgr = Manager(tmp_path / "checkpoints", 2)
    assert max(mgr.all_steps()) == 4  # steps 3 and 4 were skipped and saved (finite); 5 stops


def test_resume_with_a_changed_config_is_refused(tiny_bert, tmp_path, monkeypatch):
    """Refused before the run is built (building it compiles the train step: minutes for a
    3B teacher). Fails if `Runner.train` stops calling `refuse_changed_config` first."""
    cfg = config(tiny_bert, **{"train.steps": 3, "eval.test_at_end": False})
    art_train.train(cfg, tmp_path)
    changed = config(
        tiny_bert,
        **{"train.steps": 3, "optimizer.lr": 5e-4, "art.top_k": 3, "eval.test_at_end": False},
    )
    build = art_train.ArtRun.__init__

    def not_built(*a, **k):
        raise AssertionError("the run was built before the changed config was refused")

    monkeypatch.setattr(art_train.ArtRun, "__init__", not_built)
    with pytest.raises(ConfigError) as err:
        art_train.train(changed, tmp_path)
    monkeypatch.setattr(art_train.ArtRun, "__init__", build)
    # Before the run is built is before `jax.distributed.initialize`: the check must not
    # start JAX's backend (fails if it reads through an Orbax manager, which asks JAX for
    # the process index: the 7M rehearsal's resume died of it, run 4).
    code = (
        "import socket, sys, jax; from jaxret.configlib import load_config, ConfigError\n"
        "from jaxret.train.loop import refuse_changed_config\n"
        "cfg = load_config('configs/art.py:tiny', [('model.name', sys.argv[1]), "
        "('optimizer.lr', '5e-4')])\n"
        "try:\n    refuse_changed_config(cfg, sys.argv[2])\n"
        "except ConfigError as e:\n    print('refused:', str(e).splitlines()[1])\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
        "jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=1, process_id=0)\n"
        "print('initialized')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_bert), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.stdout.split("\n")[:2] == [
        "refused:   optimizer.lr: 0.001 -> 0.0005",
        "initialized",
    ], out.stderr[-1500:]
    message = str(err.value)
    assert "optimizer.lr: 0.001 -> 0.0005" in message and "art.top_k: 4 -> 3" in message
    assert "allow_config_change" in message
    # Reporting and placement settings may change; an explicit override resumes anyway.
    art_train.train(
        config(tiny_bert, **{"train.steps": 3, "train.progress": True, "eval.test_at_end": False}),
        tmp_path,
    )
    changed.train.allow_config_change = True
    art_train.train(changed, tmp_path)


def _cli(tiny_bert, workdir, *extra):
    return train_command("configs/art.py:tiny", tiny_bert, workdir, *extra)


# In make test-slow (~90 s, two CLI runs): the fast set checks SIGTERM → save → exact resume
# in process (tests/methods/art/test_art_runner.py::
# test_sigterm_during_a_refresh_stops_it_and_saves).
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_from_which_resume_is_exact(tiny_bert, tmp_path):
    extra = (
        "--config.art.dropout=true",
        "--config.train.steps=14",
        "--config.train.checkpoint_every=100",  # only the SIGTERM and final checkpoints
        "--config.train.eval_every=100",
        "--config.eval.test_at_end=false",
    )
    cmd, env = _cli(tiny_bert, tmp_path / "a", *extra)
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)

    # Run b keeps its compiled programs (every one, however fast it compiled): the restart
    # reads them back, and its losses and parameters are still run a's to the bit.
    cmd, env = _cli(tiny_bert, tmp_path / "b", *extra, "--config.train.compile_cache=cc")
    env = {**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(rows(tmp_path / "b", "train")) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM after step" in out
    saved = Manager(tmp_path / "b" / "checkpoints", 3).latest_step()
    assert 3 <= saved < 14
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
    losses = lambda w: [(r["step"], r["loss"]) for r in rows(w, "train")]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    cache = [r for r in rows(tmp_path / "b", "event") if "compile_cache_read" in r]
    assert [r["step"] for r in cache] == [1, saved + 1]  # after each start's first step
    assert cache[0]["compile_cache_written"] > 0 and cache[0]["compile_cache_read"] == 0
    assert cache[1]["compile_cache_read"] > 0  # the restart read programs back
    assert not [r for r in rows(tmp_path / "a", "event") if "compile_cache_read" in r]
    a = load_file(str(tmp_path / "a" / "export" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "export" / "encoder" / "model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
