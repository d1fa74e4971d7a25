"""Run logs: metrics.jsonl and TensorBoard events (process 0 only), and the end-of-run plot.

A resumed run first drops what the interrupted run logged after its checkpoint: the JSONL is
rewritten without those rows, and the TensorBoard writer starts with `purge_step`, which makes
TensorBoard discard the earlier events at or after that step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


class Logger:
    def __init__(self, workdir: Path, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.writer = None
        if not self.enabled:
            return
        if self.path.exists():
            kept = [r for r in self.read() if r["step"] <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)  # a kill now leaves the old file or the new one
        from tensorboardX import SummaryWriter

        purge = resume_step + 1 if resume_step > 0 else None
        self.writer = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)

    def read(self) -> list[dict]:
        """The rows logged so far. A last line cut short by a kill (no newline, not JSON) is
        dropped with a warning; a bad line anywhere else is an error naming it."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.splitlines()
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) and not text.endswith("\n"):
                    log.warning("%s:%d: dropped a line cut short by a kill", self.path, i)
                    continue
                raise ValueError(f"{self.path}:{i}: not a JSON row of a jaxret log") from None
        return rows

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            # "time": when the row was written (unix seconds), so that the gaps between steps
            # show every stall, evaluations and checkpoints included.
            row = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            if isinstance(v, int | float) and math.isfinite(v):
                # TensorBoard tags allow [A-Za-z0-9_./-]: "ndcg@10" → "ndcg_at_10".
                self.writer.add_scalar(f"{kind}/{k}".replace("@", "_at_"), v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot(workdir: Path, rows: list[dict], metric: str, loss_label: str = "loss") -> Path:
    """training.png: the per-step loss (and its moving average) and the dev metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["kind"] == "train" and math.isfinite(r.get("loss", math.nan))]
    # (sorted: an evaluation spread over steps is written after later steps' rows)
    dev = sorted((r for r in rows if r["kind"] == "dev" and metric in r), key=lambda r: r["step"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps, loss = [r["step"] for r in train], np.array([r["loss"] for r in train])
    a.plot(steps, loss, lw=0.6, alpha=0.4, label="per step")
    window = max(1, min(20, len(loss) // 5))
    if window > 1:  # per-step losses are noisy at small batches: show a moving average too
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        a.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    a.legend()
    a.set(xlabel="step", ylabel=loss_label, title="training loss")
    b.plot([r["step"] for r in dev], [r[metric] for r in dev], marker="o")
    b.set(xlabel="step", ylabel=metric, title=f"dev {metric}")
    fig.tight_layout()
    out = Path(workdir) / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
