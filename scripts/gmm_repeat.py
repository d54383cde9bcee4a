"""Are the grouped-matmul kernels repeatable on their own? Calls the expert MLP (three grouped
matmuls and their backward) many times on fixed inputs shaped like moe_1b's ep=2 receive
buffer and compares every answer with the first, bit for bit.

    python3 scripts/gmm_repeat.py                    # one GPU, then 2 GPUs in shard_map
    python3 scripts/gmm_repeat.py --rows 512 --d 128 --f 128 --calls 3   # CPU smoke (xla)

Why: at ep=2 on GPUs the step's gradients differ call to call (docs/benchmarks.md, "Seventh
session"), most in the expert weights, and not with --ep_matmul xla. This separates the
kernels from the exchange: same inputs, the kernel alone, with rows past the kept ones (as
in the receive buffer) and an empty expert.

Cases: `impl` kernel or xla; `where` one device, or each GPU its own inputs inside
shard_map with an all_to_all of other data in the same program (as the step overlaps them).
Prints: calls whose y / dx / dw differ from the first call, the largest such difference
relative to the output's largest entry, and the difference from lax.ragged_dot.
"""

from __future__ import annotations

import argparse
import os
import sys

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--rows", type=int, default=40960, help="buffer rows C (moe_1b ep=2: 1.25 S)")
ARGS.add_argument("--kept", type=float, default=0.8, help="share of rows in a group")
ARGS.add_argument("--experts", type=int, default=8)
ARGS.add_argument("--d", type=int, default=1024)
ARGS.add_argument("--f", type=int, default=1024)
ARGS.add_argument("--calls", type=int, default=30)
args = ARGS.parse_args()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from jmamba.kernels.grouped_matmul import grouped_matmul, kernel_usable  # noqa: E402
from jmamba.moe import swiglu_ragged  # noqa: E402


def inputs(seed: int):
    rng = np.random.default_rng(seed)
    kept = int(args.rows * args.kept)
    cuts = np.sort(rng.integers(0, kept, args.experts - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [kept]])).astype(np.int32)
    sizes[args.experts // 2] += sizes[args.experts // 2 - 1]  # one empty expert
    sizes[args.experts // 2 - 1] = 0
    x = rng.standard_normal((args.rows, args.d), np.float32)
    x[kept:] = 0.0  # the receive buffer's unused rows are zero
    w = [rng.standard_normal((args.experts, a, b), np.float32) / np.sqrt(a)
         for a, b in ((args.d, args.f), (args.d, args.f), (args.f, args.d))]
    dy = rng.standard_normal((args.rows, args.d), np.float32)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    return bf(x), sizes, [bf(v) for v in w], bf(dy)


def mlp_and_grads(impl, x, sizes, wg, wu, wd, dy):
    mm = functools.partial(grouped_matmul, impl=impl)
    f = lambda x, wg, wu, wd: swiglu_ragged(x, sizes, wg, wu, wd, jnp.bfloat16, mm)
    y, vjp = jax.vjp(f, x, wg, wu, wd)
    return (y, *vjp(dy.astype(y.dtype)))


def compare(name, outs):
    first = [np.asarray(a, np.float32) for a in outs[0]]
    parts = []
    for k, label in enumerate(("y", "dx", "dw_gate", "dw_up", "dw_down")):
        diffs = [float(np.max(np.abs(np.asarray(o[k], np.float32) - first[k]))) for o in outs[1:]]
        scale = max(float(np.max(np.abs(first[k]))), 1e-30)
        parts.append(f"{label}: {sum(d > 0 for d in diffs)}/{len(diffs)} calls differ, "
                     f"max {max(diffs, default=0.0) / scale:.1e}")
    print(f"| {name} | " + " | ".join(parts) + " |", flush=True)
    return first


def main():
    x, sizes, (wg, wu, wd), dy = inputs(0)
    impls = ["kernel", "xla"] if kernel_usable(x, wg) else ["xla"]
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; rows {args.rows}, kept "
          f"{int(sum(sizes))}, group sizes {sizes.tolist()}, D {args.d}, F {args.f}, "
          f"{args.calls} calls; impls {impls}")
    ref = None
    for impl in reversed(impls):  # xla first: the reference
        fn = jax.jit(functools.partial(mlp_and_grads, impl, sizes=jnp.asarray(sizes)))
        outs = [jax.device_get(fn(x, wg=wg, wu=wu, wd=wd, dy=dy)) for _ in range(args.calls)]
        first = compare(f"one device, {impl}", outs)
        if ref is None:
            ref = first
        else:
            print("    vs xla: " + ", ".join(
                f"{np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30):.1e}"
                for a, b in zip(first, ref)), flush=True)
    if jax.device_count() < 2:
        return
    n = 2
    mesh = Mesh(np.array(jax.devices()[:n]), ("ep",))
    per = [inputs(s) for s in range(n)]
    stack = lambda i: jnp.stack([p[i] for p in per]) if i != 2 else None
    xs, dys = stack(0), stack(3)
    sizes_s = jnp.stack([jnp.asarray(p[1]) for p in per])
    ws = [jnp.stack([p[2][j] for p in per]) for j in range(3)]
    other = jnp.ones((n * n, 4096, 1024), jnp.bfloat16)
    for impl in impls:
        def body(x, s, wg, wu, wd, dy, o):
            outs = mlp_and_grads(impl, x[0], s[0], wg[0], wu[0], wd[0], dy[0])
            moved = jax.lax.all_to_all(o, "ep", 0, 0, tiled=True)  # overlaps, like the step
            return tuple(a[None] for a in outs) + (moved,)
        sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 7,
                                   out_specs=(P("ep"),) * 6))
        outs = [jax.device_get(sm(xs, sizes_s, *ws, dys, other)[:5]) for _ in range(args.calls)]
        compare(f"2 GPUs in shard_map + all_to_all, {impl}", outs)


if __name__ == "__main__":
    main()
