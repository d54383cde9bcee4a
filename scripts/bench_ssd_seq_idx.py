"""The Pallas SSD kernel with packed documents (seq_idx) against the same kernel without, and
its packed result against its twin ssd_chunked on the GPU (issue 19).

    PYTHONPATH=. python3 scripts/bench_ssd_seq_idx.py           # on a GPU
    PYTHONPATH=. python3 scripts/bench_ssd_seq_idx.py --small   # CPU smoke test (interpret)

Timing at the shape of record (B 4, L 4096, 32 heads of 64, d_state 128, chunk 256, bf16),
each row cut into documents at random places (mean length --doc_len): forward and
forward + backward, 20 calls back to back and one sync, medians (bench_ssd.py's method).
Agreement: fp32 inputs at a smaller shape, the kernel with seq_idx against ssd_chunked with
seq_idx: outputs, final state and all gradients, max abs difference over max abs value.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jmamba.kernels.ssd_pallas import ssd_pallas
from jmamba.ssd import ssd_chunked
from scripts.bench_ssd import timeit_batched
from scripts.check_ssd_gpu import loss_grads, make_inputs


def packed_seq_idx(Bsz, L, doc_len, seed=0):
    """[B, L] int32 document indices, boundaries at uniform random places."""
    rng = np.random.default_rng(seed)
    starts = rng.random((Bsz, L)) < 1.0 / doc_len
    starts[:, 0] = False
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def fwd_and_grad(fn):
    def loss(*a):
        y, s = fn(*a)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
    return jax.jit(fn), jax.jit(jax.grad(loss, argnums=range(7)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--doc_len", type=float, default=512.0)
    ap.add_argument("--agreement_only", action="store_true")
    args = ap.parse_args()
    shape, Q = ((1, 64, 4, 16, 1, 16), 16) if args.small else ((4, 4096, 32, 64, 1, 128), 256)
    Bsz, L = shape[:2]
    seq_idx = packed_seq_idx(Bsz, L, args.doc_len if not args.small else 16)
    inputs = make_inputs(*shape, with_state=False)[:7]
    n_docs = int(jnp.sum(seq_idx[:, -1] + 1))
    print(f"{jax.devices()[0].device_kind}: shape {shape}, chunk {Q}, {n_docs} documents",
          flush=True)
    times = {}
    runs = () if args.agreement_only else (("without seq_idx", None), ("with seq_idx", seq_idx))
    for name, idx in runs:
        fn = functools.partial(ssd_pallas, chunk_size=Q, seq_idx_BxL=idx)
        fwd, grad = fwd_and_grad(lambda *a, fn=fn: fn(*a))
        times[name] = (timeit_batched(fwd, inputs), timeit_batched(grad, inputs))
    base = times.get("without seq_idx")
    print("\n| kernel | fwd ms | fwd+bwd ms | vs without, fwd | vs without, fwd+bwd |")
    print("|---|---|---|---|---|")
    for name, (f, b) in times.items():
        print(f"| {name} | {f:.3f} | {b:.3f} | {f / base[0]:.3f} | {b / base[1]:.3f} |")

    # Agreement with the twin, fp32, with an initial state (it reaches the first document).
    # Highest matmul precision: at JAX's default, XLA runs the twin's fp32 einsums in TF32
    # on GPUs (~1e-3 relative), which the first run of this script measured (4.8e-4).
    jax.config.update("jax_default_matmul_precision", "highest")
    small = (2, 1024, 4, 64, 1, 128) if not args.small else shape
    q = Q if not args.small else 16
    x32 = make_inputs(*small, dtype=jnp.float32, with_state=True)
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
    for name, idx in (("with seq_idx", packed_seq_idx(small[0], small[1],
                                                       200 if not args.small else 16, seed=1)),
                      ("without (control)", None)):
        kern = lambda *a, idx=idx: ssd_pallas(*a, chunk_size=q, seq_idx_BxL=idx)
        twin = lambda *a, idx=idx: ssd_chunked(*a, chunk_size=q, seq_idx_BxL=idx)
        (yk, sk), (yt, st) = jax.jit(kern)(*x32), jax.jit(twin)(*x32)
        worst = max(rel(yk, yt), rel(sk, st))
        for gk, gt in zip(loss_grads(kern, x32), loss_grads(twin, x32)):
            worst = max(worst, rel(gk, gt))
        print(f"kernel vs ssd_chunked {name} (fp32, highest precision, shape {small}): max "
              f"rel diff {worst:.2e} over outputs, final state and the 8 gradients",
              flush=True)

if __name__ == "__main__":
    main()
