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


class AgreedStop:
    """A stop that every process takes after the same step (docs/launch.md).

    With one process a received signal stops the run after the step it arrives in. With
    many, a process acting alone would save and leave while the others wait in the next
    step's collectives (or in the save, which needs them all). So each process adds its
    signal (0: none) to a max over processes, issued after a step is dispatched and read
    one step later, when that step's metrics are read anyway (no extra wait); every process
    reads the same value after the same step and stops there.

    Why by hand: jax's preemption sync point (multihost_utils.reached_preemption_sync_point)
    covers SIGTERM only, through a handler that Python's signal handlers replace.
    """

    def __init__(self, signals):
        import jax
        self.signals = signals
        self.many = jax.process_count() > 1
        self.pending = None
        if self.many:
            import jax.numpy as jnp
            import numpy as np
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
            mesh = Mesh(np.asarray(jax.devices()), ("all",))
            self._each = NamedSharding(mesh, P("all"))
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
            self._n_local = len(mesh.local_devices)

    def finish(self) -> None:
        """After the last step (many processes): take the last agreed value as this
        process's signal, so all leave with one exit code; a signal that came after it
        is dropped (the run is complete, and saved if it saves at the end)."""
        if self.many:
            agreed = self._read()
            self.signals.received = agreed
            self.pending = None

    def _read(self) -> int | None:
        import numpy as np
        if self.pending is None:
            return None
        return int(np.asarray(self.pending.addressable_shards[0].data)) or None

    def after_dispatch(self) -> int | None:
        """Called once per step, after it is dispatched and before its save: the signal to
        stop on after this step (the same on every process), or None to go on. With many
        processes a signal stops the run one or two steps after it arrives (the second
        step for one held since start-up)."""
        if not self.many:
            return self.signals.received
        import jax
        import numpy as np
        agreed = self._read()  # the previous step's max over processes
        mine = np.full((self._n_local,), self.signals.received or 0, np.int32)
        self.pending = self._max(jax.make_array_from_process_local_data(self._each, mine))
        return agreed
