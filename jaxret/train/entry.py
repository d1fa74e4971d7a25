"""`jaxret train` and `jaxret demo`."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from jaxret.configlib import ConfigError, load_config


def _print_accuracy(title: str, result: dict) -> None:
    names = ("top1", "top5", "top20", "top100", "ndcg@10", "recall@100", "rbo_bm25")
    keys = [k for k in names if k in result]
    print(f"{title:>10}: " + "  ".join(f"{k} {result[k]:.3f}" for k in keys))


def main(command: str, spec: str | None, overrides: list[tuple[str, str]], workdir: str) -> int:
    default = "configs/art.py:demo" if command == "demo" else "configs/art.py"
    cfg = load_config(spec or default, overrides)
    recipe = cfg.get("recipe", "art")
    trainers = {
        "art": "jaxret.train.art",
        "spar": "jaxret.train.spar",
        "lapradoor": "jaxret.train.lapradoor",
        "qgen": "jaxret.train.qgen",
    }
    if recipe not in trainers:
        raise ConfigError(f"recipe={recipe!r}; known: {', '.join(sorted(trainers))}")
    summary = importlib.import_module(trainers[recipe]).train(cfg, workdir)
    if "preempted_at" in summary:
        print(f"stopped by SIGTERM after step {summary['preempted_at']}: checkpoint saved")
        return 0
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
    (out / "summary.json").exists() and json.loads((out / "summary.json").read_text())
    return 0
