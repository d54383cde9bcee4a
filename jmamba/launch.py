"""One process per group of GPUs on this host: `train.py --nproc_per_node N`, as torchrun's.

The parent starts N copies of the same command, process i with JMAMBA_COORDINATOR (a free
localhost port), JMAMBA_NUM_PROCESSES=N, JMAMBA_PROCESS_ID=i (jmamba/distributed.py reads
them) and CUDA_VISIBLE_DEVICES naming its share of the host's GPUs: pp * ep / N each, in
order. The children find those variables set and train; the parent only waits. On a CPU
host each child simulates its pp * ep / N devices (cli.main).

Failure rules: a child that exits with a nonzero status stops the rest (SIGTERM, then
SIGKILL after GRACE_S) and its status becomes the parent's, so a crash never leaves the
others waiting in a collective. SIGINT/SIGTERM/SIGHUP to the parent go to every child
(each saves and stops the way one process does, jmamba/guard.py), and the parent exits as
they do; children get SIGTERM if the parent dies (Linux). A signal that reaches one child
only stops all of them after the same step (jmamba.distributed.AgreedStop), also one that
arrives while the step compiles (guard.hold_early_sigterm, after the second step); docs/launch.md.

Why by hand: jax has no launcher of its own (jax.distributed.initialize expects the
processes to exist), and torchrun would bring torch into a JAX install.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

CHILD_ENV = "JMAMBA_PROCESS_ID"
GRACE_S = 30.0
POLL_S = 0.2


def is_child() -> bool:
    return CHILD_ENV in os.environ


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


NVIDIA_GPUS = "/proc/driver/nvidia/gpus"  # one entry per GPU the driver sees (Linux)


def host_gpus(env=os.environ) -> list[str] | None:
    """The GPU ids this process may hand out: its CUDA_VISIBLE_DEVICES, else every GPU the
    NVIDIA driver lists; None on a host without one (the children then run on the CPU).
    Read without starting CUDA, which would take memory on every GPU in the parent."""
    if env.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        return None  # told to run on the CPU: the children simulate devices
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = [v.strip() for v in env["CUDA_VISIBLE_DEVICES"].split(",") if v.strip()]
        return None if ids in ([], ["-1"]) else ids  # the usual ways of hiding every GPU
    if os.path.isdir(NVIDIA_GPUS):
        return [str(i) for i in range(len(os.listdir(NVIDIA_GPUS)))]
    return None


def gpu_shares(n_procs: int, per_proc: int, gpus: list[str] | None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each child: consecutive blocks of per_proc of `gpus`
    (None: a CPU host, nothing to set)."""
    if gpus is None:
        return [None] * n_procs
    if len(gpus) < n_procs * per_proc:
        raise ValueError(f"--nproc_per_node {n_procs} with {per_proc} GPU(s) each needs "
                         f"{n_procs * per_proc} GPUs; this host offers {len(gpus)} "
                         "(CUDA_VISIBLE_DEVICES or the driver's list): lower pp * ep")
    return [",".join(gpus[i * per_proc:(i + 1) * per_proc]) for i in range(n_procs)]


def child_envs(n_procs: int, per_proc: int, env=os.environ) -> list[dict]:
    port = free_port()
    shares = gpu_shares(n_procs, per_proc, host_gpus(env))
    out = []
    for i, share in enumerate(shares):
        e = dict(env, JMAMBA_COORDINATOR=f"localhost:{port}",
                 JMAMBA_NUM_PROCESSES=str(n_procs), JMAMBA_PROCESS_ID=str(i))
        if share is not None:
            e["CUDA_VISIBLE_DEVICES"] = share
        out.append(e)
    return out


def run_children(argv: list[str], n_procs: int, per_proc: int) -> int:
    """Starts the children (this script with argv), waits, returns the exit status."""
    # Own process groups: a terminal's Ctrl-C reaches the parent only, which forwards it
    # once (a second SIGINT would cut a child's final checkpoint short).
    procs = [subprocess.Popen([sys.executable, os.path.abspath(sys.argv[0]), *argv], env=e,
                              process_group=0, preexec_fn=die_with_parent)
             for e in child_envs(n_procs, per_proc)]
    forwarded = []

    def forward(sig, _frame):
        forwarded.append(sig)
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)
    old = {s: signal.signal(s, forward)
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        status = wait_all(procs, forwarded)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return status


def die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies, so a killed launcher
    (kill -9, a closed ssh session) leaves no run training on without it."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the parent's own signal handlers are all there is


def _status(code: int) -> int:
    return code if code >= 0 else 128 - code  # killed by signal s: 128 + s, as a shell says


def wait_all(procs, forwarded: list) -> int:
    """0 when all succeed; else the first failure's status. After a forwarded signal every
    child is stopping by itself: wait for all of them instead of cutting any short."""
    while True:
        codes = [p.poll() for p in procs]
        if None not in codes:
            return next((_status(c) for c in codes if c != 0), 0)
        failed = [c for c in codes if c not in (None, 0)]
        if failed and not forwarded:
            _stop(procs)
            return _status(failed[0])
        time.sleep(POLL_S)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
