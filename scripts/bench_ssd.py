"""Times the Pallas SSD kernel (its default settings) against the chunked XLA SSD.

Run from the repo root on a GPU: PYTHONPATH=. python3 scripts/bench_ssd.py [--quick]
Two times per entry, in ms: "batched" = 20 calls dispatched back to back, one sync, divided
by 20 (what the GPU takes; comparable to triton.testing.do_bench, which mamba_ssm's figures
used), and "sync'd" = one call and a host sync (adds the round trip, ~0.1-0.3 ms). Medians.
The floor is the larger of bytes moved / measured HBM bandwidth and FLOPs / measured bf16
matmul rate (both measured at the start, on the same GPU).
"""

import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jmamba.kernels.ssd_pallas import ssd_pallas
from jmamba.ssd import ssd_chunked
from scripts.check_ssd_gpu import make_inputs


def timeit(f, args, warmup=3, repeats=20):
    """Median of sync'd calls, ms."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def timeit_batched(f, args, n=20, repeats=5):
    """Median over `repeats` of (n back-to-back calls, one sync) / n, ms."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready([f(*args) for _ in range(n)])
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times) * 1e3


def measure_rates():
    """(HBM bytes/s from a 2 GiB read+write, bf16 matmul FLOP/s at 8192^3) on this GPU."""
    a = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
    copy = jax.jit(lambda a: a * 2.0)
    hbm = 2 * a.nbytes / (timeit_batched(copy, (a,)) * 1e-3)
    m = jnp.ones((8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    return hbm, 2 * 8192 ** 3 / (timeit_batched(mm, (m, m)) * 1e-3)


def floors_ms(Bsz, L, H, P, G, N, Q, HBM, MATMUL):
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
    """((fwd batched, fwd sync'd), (fwd+bwd batched, fwd+bwd sync'd)) in ms."""
    args = make_inputs(*shape, with_state=False)[:7]
    fwd, both = fns(impl, Q, **kw)
    try:
        return tuple((timeit_batched(f, args), timeit(f, args)) for f in (fwd, both))
    except Exception as e:  # a setting that does not compile should not end the table
        print(f"  {impl} {kw} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return (float("nan"),) * 2, (float("nan"),) * 2


def stages(shape, Q):
    """Times the forward's pallas_calls one by one and the backward alone (batched)."""
    from jmamba.kernels import ssd_pallas as S
    x, dt, A, Bm, Cm, D, dt_bias = make_inputs(*shape, with_state=False)[:7]
    Bsz, L, H, P, G, N = shape
    cfg = S.launch_cfg(Q, P, interpret=False)  # ssd_pallas's defaults
    dt3 = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias).transpose(0, 2, 1)
    a = dt3 * A[:, None]
    acs = S._chunk_cumsum(a, Q)
    init = jnp.zeros((Bsz, H, P, N), jnp.float32)
    s_c = S._chunk_outer(x, Bm, dt3, cfg, S._fine(x.dtype, cfg))
    e = jnp.exp(acs.reshape(Bsz, H, L // Q, Q)[..., -1])
    states = S._state_pass(s_c, e, init, cfg, False)
    core = (x, dt3, a, Bm, Cm, D, init)
    (y, fin), vjp = jax.vjp(lambda *a: S._ssd_core(*a, cfg), *core)
    parts = {
        "chunk states": (lambda *a: S._chunk_outer(*a, cfg, S._fine(x.dtype, cfg)),
                         (x, Bm, dt3)),
        "state pass": (lambda s, e, i: S._state_pass(s, e, i, cfg, False), (s_c, e, init)),
        "chunk scan": (lambda *a: S._chunk_scan(*a, cfg), (x, dt3, acs, Bm, Cm, states, D)),
        "core forward (3 calls)": (lambda *a: S._forward(*a, cfg), core),
        "core backward": (vjp, ((jnp.ones_like(y), jnp.ones_like(fin)),)),
    }
    for name, (f, args) in parts.items():
        print(f"  {name}: {timeit_batched(jax.jit(f), args):.3f} ms", flush=True)


def main():
    quick = "--quick" in sys.argv  # the shape of record only
    Q = 256
    hbm, matmul = measure_rates()
    print(f"{jax.devices()[0].device_kind}: measured HBM {hbm / 1e12:.2f} TB/s, bf16 matmul "
          f"{matmul / 1e12:.0f} TFLOP/s", flush=True)
    record = (4, 4096, 32, 64, 1, 128)
    print("kernel launches at the shape of record:", flush=True)
    stages(record, Q)
    shapes = [record] + ([] if quick else [(4, L, 32, 64, 1, 128) for L in (2048, 8192, 16384)]
                         + [(4, 4096, H, 64, 1, 128) for H in (64, 128)])
    print("\nms, batched (sync'd in brackets):")
    print("| B | L | H | P | N | G | kernel fwd | XLA fwd | floor fwd "
          "| kernel fwd+bwd | XLA fwd+bwd | floor fwd+bwd | kernel / floor fwd, fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        (kf, kfs), (kb, kbs) = row(shape, Q, "kernel")
        (xf, xfs), (xb, xbs) = row(shape, Q, "chunked")
        ff, fb = floors_ms(*shape, Q, hbm, matmul)
        Bsz, L, H, P, G, N = shape
        print(f"| {Bsz} | {L} | {H} | {P} | {N} | {G} | {kf:.3f} ({kfs:.3f}) "
              f"| {xf:.3f} ({xfs:.3f}) | {ff:.3f} | {kb:.3f} ({kbs:.3f}) | {xb:.3f} ({xbs:.3f}) "
              f"| {fb:.3f} | {kf / ff:.1f}x, {kb / fb:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
