#!/usr/bin/env bash
# The same command on every TPU-VM worker of a pod slice, started in the background on each
# worker (a dropped ssh session does not stop the run); jax.distributed discovers the slice
# from the TPU environment. Run from a machine with gcloud:
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/art.py:nq_t0_3b /mnt/shared/runs/nq \
#       --config.data.dir=/mnt/data/nq --config.model.name=/mnt/ckpt/mss-jaxret
#
# WORKDIR must be a file system all workers share (NFS / Filestore). Each worker needs the
# repository at ~/jaxret (once: `python -m venv .venv && .venv/bin/pip install -r
# requirements.txt 'jax[tpu]' && .venv/bin/pip install --no-deps -e .`). Logs go to
# ~/jaxret-logs/<run>.log on each worker:
#   gcloud compute tpus tpu-vm ssh TPU --zone ZONE --worker=0 --command 'tail -f ~/jaxret-logs/*.log'
set -euo pipefail
usage="usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG[:variant] WORKDIR [--config.x=y ...]"
tpu=${1:?$usage}
zone=${2:?$usage}
config=${3:?$usage}
workdir=${4:?$usage}
shift 4
run="jaxret-$(date +%Y%m%d-%H%M%S)"
# Every argument is quoted for the remote shell: paths and values with spaces survive.
printf -v args ' %q' --config="$config" --workdir="$workdir" "$@"
# The token store first, on worker 0 (all its cores; a no-op when complete): training
# processes never tokenize, so none waits in a collective for another.
if [ "${JAXRET_SKIP_PREPARE:-0}" != "1" ]; then
  gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=0 \
      --command "cd ~/jaxret && .venv/bin/python -m jaxret.cli prepare${args}"
fi
# A restart reads its compiled programs from WORKDIR/compile_cache (train.compile_cache; a
# later --config.train.compile_cache= turns it off).
printf -v train_args ' %q' --config="$config" --workdir="$workdir" \
    --config.train.compile_cache=compile_cache "$@"
remote="mkdir -p ~/jaxret-logs && cd ~/jaxret && nohup .venv/bin/python -m jaxret.cli train${train_args} \
> ~/jaxret-logs/${run}.log 2>&1 < /dev/null &"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote"
echo "started ${run} on every worker of ${tpu}; logs: ~/jaxret-logs/${run}.log"
