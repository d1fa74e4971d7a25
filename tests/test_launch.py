"""The launch scripts, run against stand-ins for srun and gcloud."""

import os
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_gpu_slurm_drives_every_gpu_and_checks_the_count(tmp_path):
    fake(
        tmp_path,
        "srun",
        'echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"; echo "XLA_FLAGS=$XLA_FLAGS"; '
        'printf "ARG<%s>\\n" "$@"\n',
    )
    # The store is prepared before srun starts the job (a stand-in .venv python records it).
    venv = tmp_path / "repo" / ".venv" / "bin"
    venv.mkdir(parents=True)
    fake(venv, "python", 'printf "PREPARE<%s>\\n" "$@"\n')
    (tmp_path / "repo" / "launch").symlink_to(ROOT / "launch")
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_SUBMIT_DIR": str(tmp_path / "repo"),
        "JAXRET_DETERMINISTIC": "1",
    }
    out = subprocess.run(
        [
            "bash",
            ROOT / "launch" / "gpu_slurm.sh",
            "configs/art.py:nq_t0_3b",
            "/runs/my run",
            "--config.data.dir=/d ir",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in out
    assert "--xla_gpu_deterministic_ops=true" in out
    args = re.findall(r"ARG<(.*)>", out)
    assert "--config=configs/art.py:nq_t0_3b" in args and "--workdir=/runs/my run" in args
    assert "--config.distributed.expected_devices=16" in args
    assert args.index("--config.train.compile_cache=compile_cache") < args.index(
        "--config.data.dir=/d ir"
    )  # the user's flags after it: they can turn it off
    assert "--config.data.dir=/d ir" in args  # one argument, space and all
    prepared = re.findall(r"PREPARE<(.*)>", out)
    assert prepared[:3] == ["-m", "jaxret.cli", "prepare"]
    assert "--workdir=/runs/my run" in prepared and "--config.data.dir=/d ir" in prepared
    assert out.index("PREPARE<") < out.index("JAX_LOCAL_DEVICE_IDS=")  # before the job


def test_tpu_pod_quotes_arguments_and_detaches(tmp_path):
    fake(
        tmp_path,
        "gcloud",
        'printf "%s\\n" "$@" >> "$GCLOUD_LOG"; echo "--END--" >> "$GCLOUD_LOG"\n',
    )
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "GCLOUD_LOG": str(tmp_path / "gcloud.txt"),
    }
    subprocess.run(
        [
            "bash",
            ROOT / "launch" / "tpu_pod.sh",
            "v4",
            "us-central2-b",
            "configs/art.py:nq_t0_3b",
            "/mnt/runs/a b",
            "--config.model.name=/ckpt/x y",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    calls = (tmp_path / "gcloud.txt").read_text().split("--END--\n")[:-1]
    assert len(calls) == 2  # prepare on worker 0, then train on all
    first = calls[0].splitlines()
    assert "--worker=0" in first
    assert "jaxret.cli prepare" in first[first.index("--command") + 1]
    lines = calls[1].splitlines()
    assert "--worker=all" in lines
    remote = lines[lines.index("--command") + 1]
    assert "nohup" in remote and "> ~/jaxret-logs/" in remote and remote.rstrip().endswith("&")
    # The remote shell sees each argument whole.
    python_args = remote.split("jaxret.cli train", 1)[1].split(">", 1)[0]
    assert shlex.split(python_args) == [
        "--config=configs/art.py:nq_t0_3b",
        "--workdir=/mnt/runs/a b",
        "--config.train.compile_cache=compile_cache",
        "--config.model.name=/ckpt/x y",
    ]
