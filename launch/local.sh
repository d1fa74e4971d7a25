#!/usr/bin/env bash
# One machine, all its devices (GPUs, TPU cores, or one CPU device per core).
#   launch/local.sh configs/art.py:nq_t0_3b runs/nq --config.data.dir=/data/nq
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG[:variant] WORKDIR [--config.x=y ...]}
workdir=${2:?usage: launch/local.sh CONFIG[:variant] WORKDIR [--config.x=y ...]}
shift 2
cd "$(dirname "$0")/.."
exec .venv/bin/python -m jaxret.cli train --config="$config" --workdir="$workdir" "$@"
