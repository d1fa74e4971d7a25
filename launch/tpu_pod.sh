#!/usr/bin/env bash
# The same command on every TPU-VM worker of a pod slice; jax.distributed.initialize()
# discovers the slice from the TPU environment. Run from a machine with gcloud:
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/art.py:nq_t0_3b /mnt/shared/runs/nq \
#       --config.data.dir=/mnt/data/nq --config.model.name=/mnt/ckpt/mss-bert-base
#
# WORKDIR must be a file system all workers share (NFS / Filestore).
# Each worker needs the repository at ~/jaxret (set up once with `make demo` or
# `python -m venv .venv && .venv/bin/pip install -r requirements.txt jax[tpu] -e .`).
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG[:variant] WORKDIR [--config.x=y ...]}
zone=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG[:variant] WORKDIR [--config.x=y ...]}
config=${3:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG[:variant] WORKDIR [--config.x=y ...]}
workdir=${4:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG[:variant] WORKDIR [--config.x=y ...]}
shift 4
printf -v extra ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
    "cd ~/jaxret && .venv/bin/python -m jaxret.cli train --config=$config --workdir=$workdir$extra"
