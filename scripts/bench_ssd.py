"""Times the Pallas SSD kernel against the chunked XLA SSD: forward and forward+backward.

Run from the repo root on a GPU: PYTHONPATH=. python3 scripts/bench_ssd.py
Each time is the median of sync'd calls after warm-up. The floor is the larger of
bytes moved / 4.8 TB/s and FLOPs / 790 TFLOP/s (H200 HBM; measured bf16 matmul rate).
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from jmamba.kernels.ssd_pallas import ssd_pallas
from jmamba.ssd import ssd_chunked
from scripts.check_ssd_gpu import make_inputs

HBM, MATMUL = 4.8e12, 790e12


def timeit(f, args, warmup=3, repeats=20):
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def floors_ms(Bsz, L, H, P, G, N, Q):
    """(forward, forward+backward) floors in ms for bf16 inputs and no initial state."""
    io = 2 * (2 * Bsz * L * H * P + Bsz * L * H + 2 * Bsz * L * G * N) + 4 * Bsz * H * P * N
    flops = 2 * Bsz * L * H * (Q * P + 2 * P * N) + 2 * Bsz * L * G * Q * N  # paper's count
    fwd = max(io / HBM, flops / MATMUL)
    # The backward reads the inputs and dy and writes a gradient per input: ~2x the bytes;
    # it does ~2x the forward's matmuls.
    both = max(3 * io / HBM, 3 * flops / MATMUL)
    return fwd * 1e3, both * 1e3


def fns(impl, Q, **kw):
    if impl == "kernel":
        f = functools.partial(ssd_pallas, chunk_size=Q, **kw)
    else:
        f = functools.partial(ssd_chunked, chunk_size=Q)

    def loss(*a):
        y, s = f(*a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
    grad = jax.grad(loss, argnums=range(7))
    return jax.jit(f), jax.jit(lambda *a: grad(*a))


def row(shape, Q, impl, **kw):
    args = make_inputs(*shape, with_state=False)[:7]
    fwd, both = fns(impl, Q, **kw)
    try:
        return timeit(fwd, args), timeit(both, args)
    except Exception as e:  # a tuning that does not compile should not end the table
        print(f"  {impl} {kw} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return float("nan"), float("nan")


def main():
    Q = 256
    print(jax.devices()[0].device_kind, flush=True)
    record = (4, 4096, 32, 64, 1, 128)
    print("tuning at the shape of record (block_t, num_warps): fwd ms, fwd+bwd ms", flush=True)
    best, best_t = {}, float("inf")
    for bt, nw in [(64, 4), (64, 8), (128, 8)]:
        f, b = row(record, Q, "kernel", block_t=bt, num_warps=nw)
        print(f"  block_t={bt} num_warps={nw}: {f:.3f} {b:.3f}", flush=True)
        if f + b < best_t:
            best, best_t = dict(block_t=bt, num_warps=nw), f + b
    print(f"using {best}\n", flush=True)
    shapes = [record] + [(4, L, 32, 64, 1, 128) for L in (2048, 8192, 16384)] + \
             [(4, 4096, H, 64, 1, 128) for H in (64, 128)]
    print("| B | L | H | P | N | G | kernel fwd ms | XLA fwd ms | floor fwd ms "
          "| kernel fwd+bwd ms | XLA fwd+bwd ms | floor fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        kf, kb = row(shape, Q, "kernel", **best)
        xf, xb = row(shape, Q, "chunked")
        ff, fb = floors_ms(*shape, Q)
        Bsz, L, H, P, G, N = shape
        print(f"| {Bsz} | {L} | {H} | {P} | {N} | {G} | {kf:.3f} | {xf:.3f} | {ff:.3f} "
              f"| {kb:.3f} | {xb:.3f} | {fb:.3f} |", flush=True)


if __name__ == "__main__":
    main()
