#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, each seeing all its GPUs.
# jax.distributed.initialize() reads the coordinator, process count and rank from SLURM.
#
#   sbatch --nodes=2 launch/gpu_slurm.sh configs/art.py:nq_t0_3b /shared/runs/nq \
#       --config.data.dir=/shared/data/nq --config.model.name=/shared/ckpt/mss-bert-base
#
#SBATCH --job-name=jaxret-art
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
config=${1:?usage: sbatch launch/gpu_slurm.sh CONFIG[:variant] WORKDIR [--config.x=y ...]}
workdir=${2:?usage: sbatch launch/gpu_slurm.sh CONFIG[:variant] WORKDIR [--config.x=y ...]}
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# The checkpoint and index folders must be on a file system every node sees.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --kill-on-bad-exit=1 .venv/bin/python -m jaxret.cli train \
    --config="$config" --workdir="$workdir" "$@"
