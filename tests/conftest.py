"""8 simulated CPU devices for every test (must be set before jax is imported).

Compiling dominates the CPU suite: LLVM optimisation level 0 cuts a train.py run's CPU time
by ~40% (62.7 -> 36.7 s for the 2-process test's model) and leaves its losses unchanged.
Subprocesses inherit these flags (test_distributed sets its own, without the 8 devices).
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture
def mosaic_standin(monkeypatch):
    """Stand-ins for the Mosaic GPU grouped-matmul kernels (Hopper only) that return what the
    real ones return under shard_map: per-device values typed as the same on every device
    (JAX runs Mosaic kernels with the vma check off), with rows outside every group left
    unwritten (7 here), the real keyword signatures and row blocks. A missing per-device
    re-typing in jmamba then shows up as wrong gradients on the CPU, as it would on GPUs.
    Any shape and dtype are taken (kernel_usable says yes; tiles of 16)."""
    import inspect

    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    from jmamba.kernels import grouped_matmul as gm
    from jmamba.kernels.vma import untyped
    real_rd = ragged_dot_mgpu.ragged_dot
    real_trd = transposed_ragged_dot_mgpu.transposed_ragged_dot

    def ragged_dot(lhs, rhs, *, group_sizes, transpose_rhs=False, **blocks):
        inspect.signature(real_rd).bind(lhs, rhs, group_sizes=group_sizes,
                                        transpose_rhs=transpose_rhs, **blocks)
        assert lhs.shape[0] % blocks["block_m"] == 0
        rhs = jax.numpy.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        y = jax.lax.ragged_dot(lhs, rhs, group_sizes)
        written = jax.numpy.arange(lhs.shape[0])[:, None] < jax.numpy.sum(group_sizes)
        return untyped(jax.numpy.where(written, y, 7.0).astype(lhs.dtype))

    def transposed_ragged_dot(lhs, rhs, *, group_sizes, **blocks):
        inspect.signature(real_trd).bind(lhs, rhs, group_sizes=group_sizes, **blocks)
        dims = jax.lax.RaggedDotDimensionNumbers((((0,), (0,)), ((), ())), [0], [])
        return untyped(jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims))

    monkeypatch.setattr(ragged_dot_mgpu, "ragged_dot", ragged_dot)
    monkeypatch.setattr(transposed_ragged_dot_mgpu, "transposed_ragged_dot",
                        transposed_ragged_dot)
    monkeypatch.setattr(gm, "kernel_usable", lambda *a, **k: True)
    monkeypatch.setattr(gm, "default_blocks", lambda *a: gm.Blocks(16, 16, 16, 2, 1))


@pytest.fixture
def counted_kernels(mosaic_standin, monkeypatch):
    """The stand-in kernels, each call recorded as its product ('fwd', 'dx' or 'dw') in the
    list this fixture returns."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    calls = []
    for mod, name in ((ragged_dot_mgpu, "ragged_dot"),
                      (transposed_ragged_dot_mgpu, "transposed_ragged_dot")):
        def counted(*a, f=getattr(mod, name), **kw):
            calls.append("dw" if "transposed" in f.__name__ else
                         "dx" if kw.get("transpose_rhs") else "fwd")
            return f(*a, **kw)
        monkeypatch.setattr(mod, name, counted)
    return calls
