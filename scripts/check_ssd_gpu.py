"""Checks the Pallas SSD kernel at full size on GPU: bf16 outputs and gradients vs fp32 twins,
and fp32 (the default preset's dtype) vs the same twins at a tight tolerance.

Run from the repo root: PYTHONPATH=. python3 scripts/check_ssd_gpu.py
"""

import functools
import sys

import jax
import jax.numpy as jnp

from jmamba.kernels.ssd_pallas import ssd_pallas
from jmamba.ssd import ssd_chunked, ssd_reference

NAMES = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]


def make_inputs(Bsz, L, H, P, G, N, dtype=jnp.bfloat16, with_state=True, seed=0):
    """Mamba-2-like inputs; x, dt, B, C in `dtype`, the per-head parameters in fp32."""
    k = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(k[0], (Bsz, L, H, P)).astype(dtype)
    dt = (jax.random.normal(k[1], (Bsz, L, H)) - 1.0).astype(dtype)
    A = -jnp.exp(jax.random.uniform(k[2], (H,), minval=-1.0, maxval=2.0))
    Bm = (jax.random.normal(k[3], (Bsz, L, G, N)) / N ** 0.5).astype(dtype)
    Cm = (jax.random.normal(k[4], (Bsz, L, G, N)) / N ** 0.5).astype(dtype)
    D = jax.random.normal(k[5], (H,))
    dt_bias = jax.random.normal(k[6], (H,)) * 0.5
    s0 = jax.random.normal(k[7], (Bsz, H, P, N)) if with_state else None
    return x, dt, A, Bm, Cm, D, dt_bias, s0


def loss_grads(fn, args, seed=1):
    """Gradients of <y, w_y> + <final, w_s> for all 8 inputs (both cotangents flow)."""
    y, s = jax.eval_shape(fn, *args)
    w_y = jax.random.normal(jax.random.key(seed), y.shape)
    w_s = jax.random.normal(jax.random.key(seed + 1), s.shape)

    def loss(*a):
        y, s = fn(*a)
        return jnp.sum(y.astype(jnp.float32) * w_y) + jnp.sum(s * w_s)
    return jax.jit(jax.grad(loss, argnums=range(8)))(*args)


def rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def check(shape, chunk, tol=1e-2, with_reference=False, dtype=jnp.bfloat16, **kernel_kw):
    Bsz, L, H, P, G, N = shape
    # The twins get the same bf16 inputs: they compute in fp32 and round y to bf16 as the
    # kernel does, so dy is rounded alike and only the kernel's bf16 matmul operands differ.
    args = make_inputs(*shape, dtype=dtype)
    kern = jax.jit(functools.partial(ssd_pallas, chunk_size=chunk, **kernel_kw))
    with jax.default_matmul_precision("highest"):
        twins = {"chunked": functools.partial(ssd_chunked, chunk_size=chunk)}
        if with_reference:
            twins["reference"] = ssd_reference
        outs = {k: jax.jit(f)(*args) for k, f in twins.items()}
        g_twin = loss_grads(twins["chunked"], args)
    y, s = kern(*args)
    g = loss_grads(kern, args)
    errs = {}
    for k, (y_t, s_t) in outs.items():
        errs[f"y~{k}"], errs[f"final~{k}"] = rel(y, y_t), rel(s, s_t)
    for name, a, b in zip(NAMES, g, g_twin):
        errs[f"d{name}"] = rel(a, b)
    finite = all(bool(jnp.all(jnp.isfinite(a))) for a in [y, s, *g])
    bad = {k: v for k, v in errs.items() if not v < tol}
    print(f"{jnp.dtype(dtype).name} shape (B,L,H,P,G,N)={shape} chunk={chunk} {kernel_kw}: finite={finite} "
          + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return finite and not bad


def main():
    print(jax.devices(), flush=True)
    if "--fp32" in sys.argv:  # only the fp32 checks
        return 0 if fp32_checks() else 1
    ok = check((4, 4096, 32, 64, 1, 128), 256)
    for kw in ({"fine": "tf32", "rect": "tf32", "block_t": 128, "num_warps": 8},):  # record
        try:
            check((4, 4096, 32, 64, 1, 128), 256, **kw)
        except Exception as e:  # noqa: BLE001
            print(f"{kw} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    ok &= check((1, 1000, 8, 64, 2, 64), 256, with_reference=True)  # L % chunk != 0, G > 1
    ok &= check((2, 512, 4, 32, 4, 16), 64, with_reference=True)
    ok &= check((1, 16384, 8, 64, 1, 128), 256)  # a long sequence
    ok &= fp32_checks()
    print("ALL OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


def fp32_checks():
    """fp32 end to end (matmuls at HIGHEST precision): the default preset trains this way."""
    ok = check((2, 1000, 8, 64, 2, 128), 256, tol=1e-4, dtype=jnp.float32,
               with_reference=True)
    ok &= check((2, 512, 4, 16, 1, 16), 32, tol=1e-4, dtype=jnp.float32,
                with_reference=True)  # the default preset's head, state and chunk sizes
    print("fp32 OK" if ok else "fp32 FAILED", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
