"""The loop's evaluations spread over steps (Runner.evaluation), on a toy method: which
parameters are evaluated and saved as best, when each part runs, and what a SIGTERM or a
kill in the middle of one leaves."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxret.configlib import train_config
from jaxret.train.loop import Preempted, Runner, run
from jaxret.train.state import init_state


class Counter(Runner):
    """Params w ∈ R^4 grow by 1 per step (the step donates the state). The dev metric of
    the parameters after s steps is −(w₀ − 3)²: best after step 3. Its evaluation reads w
    in its first part and finishes `parts` training steps later."""

    name = "counter"
    metric = "closeness"

    def __init__(self, cfg, parts: int, after=None):
        self.state = init_state({"w": jnp.zeros(4)}, optax.sgd(0.0), 0)
        self.total_steps = cfg.train.steps
        self.parts, self.after = parts, after
        self.trained = 0
        self.part_steps: dict[int, list[int]] = {}  # evaluated step → trained steps of parts
        self.kept_only_params: dict[int, bool] = {}  # evaluated step → handed a kept copy

        def step(state, batch):
            new = state.replace(step=state.step + 1, params={"w": state.params["w"] + 1.0})
            return new, {"loss": jnp.float32(0.0)}

        self.step = jax.jit(step, donate_argnums=0)

    def train_step(self, state, batch):
        self.trained += 1
        return self.step(state, batch)

    def batch_at(self, step):
        return None

    def after_step(self, state, step):
        if self.after is not None:
            self.after(step)

    def evaluation(self, state, step):
        w = float(state.params["w"][0])  # only the first part may read `state`
        self.kept_only_params[step] = state.opt_state is None
        seen = self.part_steps.setdefault(step, [self.trained])
        for _ in range(self.parts):
            yield
            seen.append(self.trained)
        return {"closeness": -((w - 3.0) ** 2), "w": w}


def config(checkpoint_every=3):
    c = ml_collections.ConfigDict()
    c.train = train_config(steps=7, eval_every=3, checkpoint_every=checkpoint_every, progress=False)
    c.eval = ml_collections.ConfigDict(dict(at_start=True))
    return c


def rows(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def best_w(workdir):
    params = ocp.StandardCheckpointer().restore((workdir / "best" / "params").resolve())
    return np.asarray(params["w"])


def test_a_spread_evaluation_scores_and_saves_the_parameters_of_its_step(tmp_path):
    """Evaluations at steps 3 and 6 run one part after each of the next two steps; the dev
    row names the evaluated step and its metric is that step's (w = 3, the best), written
    after later steps' rows; `best/` holds w = 3, although the step that finished the
    evaluation (5) had w = 5; the last evaluation (7) runs at once. With a checkpoint at
    step 3 no part runs beside the save: the evaluation starts after step 4, still on
    step 3's parameters (w = 3). Fails if the loop saves `state.params` when the evaluation
    finishes (best w = 5), if it does not keep a copy of the evaluated parameters (the next
    step donates them: deleted-array error), if the checkpoint step starts its evaluation
    (part_steps[3] == [3, 4, 5]), or if the evaluation started after the next step is handed
    the live state rather than the kept parameters (its opt_state is not None; on CPU the
    save in flight keeps step 3's buffers from being donated, so w alone cannot tell)."""
    # No checkpoint at step 3: a save in flight keeps the step's buffers from being donated.
    runner = Counter(config(checkpoint_every=7), parts=2)
    run(config(checkpoint_every=7), runner, tmp_path)
    dev = [r for r in rows(tmp_path) if r["kind"] == "dev"]
    assert [(r["step"], r["w"]) for r in dev] == [(0, 0.0), (3, 3.0), (6, 6.0), (7, 7.0)]
    assert runner.part_steps == {0: [0, 0, 0], 3: [3, 4, 5], 6: [6, 7, 7], 7: [7, 7, 7]}
    order = [(r["kind"], r["step"]) for r in rows(tmp_path) if r["kind"] in ("train", "dev")]
    assert order.index(("dev", 3)) == order.index(("train", 5)) + 1
    assert all(r["eval_seconds"] >= 0 for r in dev)
    np.testing.assert_array_equal(best_w(tmp_path), np.full(4, 3.0))
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 3
    # With a checkpoint at the evaluated step, the evaluation starts after the next step.
    runner = Counter(config(checkpoint_every=3), parts=2)
    run(config(checkpoint_every=3), runner, tmp_path / "c")
    assert runner.part_steps[3] == [4, 5, 6]
    assert runner.kept_only_params == {0: False, 3: True, 6: True, 7: False}
    dev = [r for r in rows(tmp_path / "c") if r["kind"] == "dev"]
    assert [(r["step"], r["w"]) for r in dev] == [(0, 0.0), (3, 3.0), (6, 6.0), (7, 7.0)]
    np.testing.assert_array_equal(best_w(tmp_path / "c"), np.full(4, 3.0))


def test_sigterm_finishes_an_unfinished_evaluation_and_a_kill_redoes_it_at_resume(tmp_path):
    """SIGTERM after step 4, while step 3's evaluation is half done: the run finishes that
    evaluation (its dev row and `best/` are step 3's), saves step 4 and exits; the resume
    goes on (its warm-up at step 4 is unlogged). A part that stops on the signal itself
    (raises Preempted) is dropped instead, logged. A crash after step 4 (checkpoint 3 is the
    newest): the resumed run starts at step 3, finds no dev row for it and records that
    evaluation then (best = step 3's w). Fails if the loop checkpoints step 4 with the
    evaluation still pending and nothing logged, if it drops an evaluation it could finish
    (no dev row for 3 in the first run), or if the warm-up never records (no dev row for 3
    after the crash)."""

    def sigterm_at_4(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    runner = Counter(config(checkpoint_every=7), 2, sigterm_at_4)
    summary = run(config(checkpoint_every=7), runner, tmp_path / "t")
    assert summary["preempted_at"] == 4
    r = rows(tmp_path / "t")
    assert [(x["step"], x["w"]) for x in r if x["kind"] == "dev"] == [(0, 0.0), (3, 3.0)]
    assert runner.part_steps[3] == [3, 4, 4]  # the second part right after the signal
    assert not [x for x in r if "dev_evaluation_dropped" in x]
    np.testing.assert_array_equal(best_w(tmp_path / "t"), np.full(4, 3.0))
    run(config(checkpoint_every=7), Counter(config(), 2), tmp_path / "t")
    r = rows(tmp_path / "t")
    assert [x["step"] for x in r if x["kind"] == "dev"] == [0, 3, 6, 7]
    assert [x["step"] for x in r if "warm_up_seconds" in x] == [4]

    class Stubborn(Counter):
        """Its parts stop on a SIGTERM (raise Preempted)."""

        def evaluation(self, state, step):
            parts = super().evaluation(state, step)
            yield next(parts)
            while True:
                if self.signalled:
                    raise Preempted
                try:
                    yield next(parts)
                except StopIteration as stop:
                    return stop.value

    stubborn = Stubborn(config(), 2)
    stubborn.signalled = False

    def signal_at_4(step):
        stubborn.signalled = step >= 4
        sigterm_at_4(step)

    stubborn.after = signal_at_4
    run(config(), stubborn, tmp_path / "s")
    r = rows(tmp_path / "s")
    assert [x["step"] for x in r if "dev_evaluation_dropped" in x] == [3]
    assert [x["step"] for x in r if x["kind"] == "dev"] == [0]

    class Crash(Exception):
        pass

    def crash_at_4(step):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        run(config(), Counter(config(), 2, crash_at_4), tmp_path / "k")
    assert [x["step"] for x in rows(tmp_path / "k") if x["kind"] == "dev"] == [0]
    resumed = Counter(config(), 2)
    run(config(), resumed, tmp_path / "k")
    r = rows(tmp_path / "k")
    assert [(x["step"], x["w"]) for x in r if x["kind"] == "dev"][:2] == [(0, 0.0), (3, 3.0)]
    assert resumed.part_steps[3] == [0, 0, 0]  # at the resume, before its first step
    np.testing.assert_array_equal(best_w(tmp_path / "k"), np.full(4, 3.0))
