#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node driving all of the node's GPUs.
#
#   sbatch --nodes=2 launch/gpu_slurm.sh configs/art.py:nq_t0_3b /shared/runs/nq \
#       --config.data.dir=/shared/data/nq --config.model.name=/shared/ckpt/mss-jaxret
#
# jax.distributed reads the coordinator, process count and rank from SLURM. Left alone it
# would give each process only GPU SLURM_LOCALID (jax-ml/jax#16788): this script sets
# JAX_LOCAL_DEVICE_IDS to every GPU of the node and asks jaxret to check the global count
# (distributed.expected_devices), so a job can never silently run on fewer GPUs.
#
# Bitwise-exact resumption on GPU needs deterministic XLA kernels (slower scatter/reductions):
#   JAXRET_DETERMINISTIC=1 sbatch ... launch/gpu_slurm.sh ...
#
#SBATCH --job-name=jaxret-art
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@300
set -euo pipefail
usage="usage: sbatch launch/gpu_slurm.sh CONFIG[:variant] WORKDIR [--config.x=y ...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "${gpus:-0}" -lt 1 ]; then
  echo "gpu_slurm.sh: no GPUs found on $(hostname)" >&2
  exit 1
fi
export JAX_LOCAL_DEVICE_IDS
JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
expected=$((${SLURM_JOB_NUM_NODES:-1} * gpus))
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [ "${JAXRET_DETERMINISTIC:-0}" = "1" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
fi
# The workdir (checkpoints, token store, index) must be on a file system every node sees.
# The token store is built first, here on the first node with all its cores (a no-op when it
# is complete; resumed when a build was cut short): training processes never tokenize, so
# none waits in a collective for another. JAXRET_SKIP_PREPARE=1 skips it (built elsewhere).
if [ "${JAXRET_SKIP_PREPARE:-0}" != "1" ]; then
  .venv/bin/python -m jaxret.cli prepare --config="$config" --workdir="$workdir" "$@"
fi
# SLURM sends SIGTERM 300 s before the time limit (--signal above): jaxret saves and exits,
# and the same command resumes, reading its compiled programs from WORKDIR/compile_cache
# (train.compile_cache; a later --config.train.compile_cache= turns it off).
srun --kill-on-bad-exit=1 .venv/bin/python -m jaxret.cli train \
    --config="$config" --workdir="$workdir" \
    --config.distributed.expected_devices="$expected" \
    --config.train.compile_cache=compile_cache "$@"
