"""Many hosts: settings from flags or environment, and 2 processes x 4 CPU devices giving
the losses of 1 process x 8 (jax's CPU collectives over gloo, on localhost)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from jmamba.config import DistConfig
from jmamba.distributed import settings

REPO = __file__.rsplit("/tests/", 1)[0]


def test_settings_from_flags_env_and_slurm():
    assert settings(DistConfig(), env={}) is None
    flags = DistConfig(coordinator="h:1234", num_processes=2, process_id=1)
    assert settings(flags, env={}) == {"coordinator_address": "h:1234", "num_processes": 2,
                                       "process_id": 1}
    env = {"JMAMBA_COORDINATOR": "h:1", "JMAMBA_NUM_PROCESSES": "4", "JMAMBA_PROCESS_ID": "3"}
    assert settings(DistConfig(process_id=0), env)["process_id"] == 0  # flags win
    assert settings(DistConfig(), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}) == {}
    assert settings(DistConfig(), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    with pytest.raises(ValueError, match="process_id"):
        settings(DistConfig(coordinator="h:1", num_processes=2, process_id=2), {})
    with pytest.raises(ValueError, match="coordinator"):
        settings(DistConfig(num_processes=2), {})


def losses(log_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(log_dir, "metrics.jsonl"))]


def last_eval(log_dir):
    return [json.loads(l) for l in open(os.path.join(log_dir, "metrics.jsonl"))][-1]["eval_loss"]


def test_two_processes_match_one_and_stop_together(tmp_path):
    """~1.5 minutes on 2 cores: five train.py processes compile at once.

    pp=2 x ep=4 puts a pipeline stage on each process (each reads the whole batch), started
    by hand with --coordinator/--process_id; pp=1 x ep=8 splits the batch rows across the
    processes (each reads only its half), started by `--nproc_per_node 2`. With no token
    dropped (capacity factor 8) both layouts give the same losses as one process, so the
    pp=1 pair also checks train.py's pp=2 run against pp=1 over several optimizer steps.

    The pp=2 pair runs on until SIGTERM reaches its process 1 only (a scheduler or a user
    may signal one task): both processes stop after the same step and save it together
    (jmamba.distributed.AgreedStop); acting alone, process 1 would leave process 0 waiting
    in a collective."""
    import re
    import signal
    import time
    # a constant learning rate (no warmup, no decay), so that the run stopped by the signal
    # and the 3-step runs take the same steps
    args = ["--log_every", "1", "--warmup_steps", "0", "--train.min_lr_ratio", "1",
            "--batch_size", "8",
            "--d_model", "16", "--n_layer", "2", "--headdim", "8", "--d_state", "8",
            "--d_expert", "16", "--n_experts", "8", "--ep_capacity_factor", "8"]
    pipeline = ["--pp", "2", "--ep", "4", "--microbatches", "2"]
    experts = ["--pp", "1", "--ep", "8"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
           # the conftest's fast compile, but not its 8 devices
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    run = lambda extra, log: subprocess.Popen(
        [sys.executable, "train.py", *args, "--log_dir", str(tmp_path / log), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    dist = ["--coordinator", f"localhost:{port}", "--num_processes", "2"]
    until_stopped = ["--steps", "100000", "--eval_every", "0", "--ckpt_dir",
                     str(tmp_path / "ckpt"), "--ckpt_every", "100000"]
    pipes = [run(pipeline + until_stopped + dist + ["--process_id", str(i)], f"pipe{i}")
             for i in (0, 1)]
    # The ep pair is started by train.py itself (jmamba/launch.py), as a user would.
    others = [run(pipeline + ["--steps", "3"], "single"),
              run(experts + ["--steps", "3", "--nproc_per_node", "2"], "ep0")]
    metrics = tmp_path / "pipe0" / "metrics.jsonl"
    outs = {}
    try:
        deadline = time.monotonic() + 400
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline, "no third step within 400 s"
            assert all(p.poll() is None for p in pipes), "a process ended before the signal"
            time.sleep(0.5)
        pipes[1].send_signal(signal.SIGTERM)
        for name, p in zip(("pipe0", "pipe1", "single", "ep0"), pipes + others):
            try:
                outs[name] = p.communicate(timeout=400)[0]
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} did not stop (for the pair: the stop was not "
                                     "agreed)")
    finally:
        for p in pipes + others:  # never leave one waiting in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p in zip(("pipe0", "pipe1", "single", "ep0"), pipes + others):
        assert p.returncode == 0, name + ": " + outs[name][-2000:]
    # gloo's all-reduce may add in another order than one process does: fp32 rounding only
    single = losses(tmp_path / "single")
    assert len(single) == 3
    assert losses(tmp_path / "pipe0")[:3] == pytest.approx(single, rel=1e-5)
    assert losses(tmp_path / "ep0") == pytest.approx(single, rel=1e-5)
    # Validation at the last step (default), with each process placing its own rows.
    assert last_eval(tmp_path / "ep0") == pytest.approx(last_eval(tmp_path / "single"),
                                                        rel=1e-5)
    assert not os.path.exists(tmp_path / "pipe1" / "metrics.jsonl")  # only process 0 writes
    step = int(re.search(r"stopped cleanly after step (\d+)", outs["pipe0"]).group(1))
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step
    assert str(step) in os.listdir(tmp_path / "ckpt")  # saved by both, at that step


def test_launcher_shares_gpus_and_stops_everyone_when_one_fails():
    """--nproc_per_node: each child gets its block of the GPUs; the first failure stops the
    others at once and becomes the parent's exit status (no child left in a collective)."""
    import time
    from jmamba import launch
    assert launch.gpu_shares(2, 2, ["3", "5", "6", "7"]) == ["3,5", "6,7"]
    assert launch.gpu_shares(2, 1, None) == [None, None]  # a CPU host: nothing to set
    for hidden in ({"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"},
                   {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0"}):
        assert launch.host_gpus(hidden) is None
    with pytest.raises(ValueError, match="needs 4 GPUs; this host offers 2"):
        launch.gpu_shares(2, 2, ["0", "1"])
    envs = launch.child_envs(2, 1, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3"]
    assert [e["JMAMBA_PROCESS_ID"] for e in envs] == ["0", "1"]
    assert envs[0]["JMAMBA_COORDINATOR"] == envs[1]["JMAMBA_COORDINATOR"]
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    t0 = time.monotonic()
    assert launch.wait_all([slow, failing], forwarded=[]) == 3
    assert slow.poll() is not None and time.monotonic() - t0 < 30
    killed = subprocess.Popen([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    assert launch.wait_all([killed], forwarded=[]) == 137


def test_launcher_flag_checks(capsys):
    from jmamba.cli import parse_config
    with pytest.raises(SystemExit):
        parse_config(["--ep", "2", "--nproc_per_node", "3"])
    assert "'dist.nproc_per_node'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--ep", "2", "--nproc_per_node", "2", "--coordinator", "h:1"])
    assert "drop --coordinator" in capsys.readouterr().err
