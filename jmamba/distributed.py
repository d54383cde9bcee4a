"""Many hosts: jax.distributed.initialize from flags or the environment (docs/launch.md).

Precedence: --coordinator/--num_processes/--process_id, then JMAMBA_COORDINATOR /
JMAMBA_NUM_PROCESSES / JMAMBA_PROCESS_ID, then a SLURM job of more than one task (jax
reads SLURM_* itself). With none of these, nothing is initialized: one process.
"""

from __future__ import annotations

import os

from jmamba.config import DistConfig


def settings(dist: DistConfig, env=os.environ) -> dict | None:
    """The keyword arguments for jax.distributed.initialize, or None for one process."""
    coordinator = dist.coordinator or env.get("JMAMBA_COORDINATOR", "")
    n = dist.num_processes if dist.num_processes >= 0 else int(
        env.get("JMAMBA_NUM_PROCESSES", -1))
    pid = dist.process_id if dist.process_id >= 0 else int(env.get("JMAMBA_PROCESS_ID", -1))
    if coordinator:
        if n < 1 or not 0 <= pid < n:
            raise ValueError(f"dist: coordinator {coordinator!r} needs --num_processes >= 1 "
                             f"and 0 <= --process_id < num_processes (got {n}, {pid})")
        return {"coordinator_address": coordinator, "num_processes": n, "process_id": pid}
    if n > 1 or pid >= 0:
        raise ValueError("dist: --num_processes/--process_id need --coordinator host:port")
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return {}  # jax's SLURM cluster detection fills in all three
    return None


def initialize(dist: DistConfig) -> None:
    kwargs = settings(dist)
    if kwargs is not None:
        import jax
        jax.distributed.initialize(**kwargs)
