"""The grouped-matmul kernels on the CPU, through Mosaic GPU's interpreter.

jax ships an interpreter for Mosaic GPU kernels that simulates their threads, shared memory
and TMA copies on the CPU and detects races. Inside `interpreted_kernels()` the Hopper path
of jmamba/kernels/grouped_matmul.py runs that way: tests compare it with lax.ragged_dot on
the CPU, and scripts/check_gmm_edges.py --interpret checks it for races. Slow (seconds per
call at a few hundred rows); for tests and debugging only.

jax's kernels call `plgpu.kernel` with a fixed SM grid and ask the device for its SM count,
so both are swapped in their modules for the duration, and restored after.
"""

from __future__ import annotations

import contextlib
import types

import jax


@contextlib.contextmanager
def interpreted_kernels(n_sms: int = 8, detect_races: bool = True):
    """Yields a function that says whether a race was seen so far."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    from jmamba.kernels import grouped_matmul as gm

    def kernel(*args, **kwargs):
        params = plgpu.InterpretGPUParams(detect_races=detect_races)
        return plgpu.kernel(*args, **{**kwargs, "grid": (n_sms,), "interpret": params})

    shim = types.SimpleNamespace(**{n: getattr(plgpu, n) for n in dir(plgpu)
                                    if not n.startswith("__")})
    shim.kernel = kernel
    fake_jax = types.SimpleNamespace(**{n: getattr(jax, n) for n in dir(jax)
                                        if not n.startswith("__")})
    fake_jax.devices = lambda *a: [types.SimpleNamespace(core_count=n_sms)]
    saved = (ragged_dot_mgpu.plgpu, transposed_ragged_dot_mgpu.plgpu,
             transposed_ragged_dot_mgpu.jax, gm._on_hopper)
    ragged_dot_mgpu.plgpu = transposed_ragged_dot_mgpu.plgpu = shim
    transposed_ragged_dot_mgpu.jax = fake_jax
    gm._on_hopper = lambda: True
    try:
        yield lambda: bool(interpret_pallas_call.get_races().races_found)
    finally:
        (ragged_dot_mgpu.plgpu, transposed_ragged_dot_mgpu.plgpu,
         transposed_ragged_dot_mgpu.jax, gm._on_hopper) = saved
