"""The grouped-matmul kernel on the group layouts expert parallelism makes, against
lax.ragged_dot, and against itself on a second call.

    python scripts/check_gmm_edges.py          # one Hopper GPU
    python scripts/check_gmm_edges.py --small  # CPU smoke run (xla path only; no kernel)
    python scripts/check_gmm_edges.py --small --interpret  # the kernels on the CPU, in
        # Mosaic GPU's interpret mode with its race detector (small shapes, ~1-2 minutes)
    python scripts/check_gmm_edges.py --mlp --repeats 30   # the whole expert MLP (one GPU,
        # then 2 GPUs in shard_map beside an all_to_all); --small for a CPU smoke run

Why: at ep=2 on H100s the train step's gradients differed between two calls on the same
inputs (scripts/ep_repeat.py: expert weights up to 1.6e-2 of their largest entry) with the
kernel, not with lax.ragged_dot. The ep receive buffer differs from the ep=1 input in two
ways: rows past sum(group_sizes) (the buffer is larger than what arrives) and empty groups
(a later round carries a few rows for a few experts). Each case below isolates one.

For each case: forward y, dX and dW of grouped_matmul(impl='auto') against impl='xla'
(max abs diff / max abs of the reference) and the kernel against its own second call
(bitwise). Exits 1 if any differs by more than --tol or is not repeatable.

--mlp: the expert MLP (three grouped matmuls, SwiGLU, and their backward) on one buffer
shaped like moe_1b's ep=2 receive buffer (--rows, --kept of them in 8 groups, one empty),
called --repeats times: per output (y, dx, dw_gate, dw_up, dw_down), how many calls differ
from the first and by how much, then the kernel against lax.ragged_dot; then the same on 2
devices in shard_map, each with its own inputs and an all_to_all of other data in the same
program (as the step overlaps them); then rows sent by all_to_all through the MLP and back,
with and without a lax.switch around it (the exchange's second round runs in one). Exits 1
if any call differs from the first.
"""

from __future__ import annotations

import argparse
import os
import sys

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--small", action="store_true")
ARGS.add_argument("--tol", type=float, default=2e-2)
ARGS.add_argument("--repeats", type=int, default=4)
ARGS.add_argument("--interpret", action="store_true",
                  help="run the Hopper kernels in Mosaic GPU's interpreter (CPU), detecting races")
ARGS.add_argument("--mlp", action="store_true", help="the expert MLP check (see above)")
ARGS.add_argument("--rows", type=int, default=40960,
                  help="--mlp: buffer rows (moe_1b ep=2: 1.25 S)")
ARGS.add_argument("--kept", type=float, default=0.8, help="--mlp: share of rows in a group")
args = ARGS.parse_args()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from jmamba.kernels.grouped_matmul import grouped_matmul, kernel_usable  # noqa: E402
from jmamba.kernels.mosaic_interpret import interpreted_kernels  # noqa: E402
from jmamba.moe import swiglu_ragged  # noqa: E402

D, F = (256, 256) if args.small else (1024, 1024)
ROWS = 448 if args.small else 20480  # moe_1b ep=2 first-round buffer: 1.25 x 16384


def cases(rows, g=8):
    """name -> group sizes (int32, length g)."""
    even = rows // g
    out = {"full, even": [even] * g}
    out["full, uneven"] = [even + (37 if i % 2 else -37) for i in range(g)]
    out["trailing rows (80% used)"] = [int(0.8 * even)] * g
    out["empty first and last"] = [0] + [rows // (g - 2) - 5] * (g - 2) + [0]
    out["empty in the middle, unaligned"] = [even + 13, 0, 0, even - 13, 0, even, even, 0]
    out["round 2: few rows, most empty"] = [0, 3, 0, 0, 17, 0, 0, 1]
    out["all empty"] = [0] * g
    return {k: np.asarray(v, np.int32) for k, v in out.items()}


def fwd_bwd(impl, x, w, gs, dy):
    y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, gs, impl=impl), x, w)
    dx, dw = vjp(dy)
    return y, dx, dw


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def mlp_inputs(seed: int, rows: int, experts: int = 8):
    """A receive buffer: `kept` rows in `experts` random groups (one empty), zero rows after."""
    rng = np.random.default_rng(seed)
    kept = int(rows * args.kept)
    cuts = np.sort(rng.integers(0, kept, experts - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [kept]])).astype(np.int32)
    sizes[experts // 2] += sizes[experts // 2 - 1]  # one empty expert
    sizes[experts // 2 - 1] = 0
    x = rng.standard_normal((rows, D), np.float32)
    x[kept:] = 0.0  # the receive buffer's unused rows are zero
    w = [rng.standard_normal((experts, a, b), np.float32) / np.sqrt(a)
         for a, b in ((D, F), (D, F), (F, D))]
    dy = rng.standard_normal((rows, D), np.float32)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    return bf(x), sizes, [bf(v) for v in w], bf(dy)


def mlp_and_grads(impl, x, sizes, wg, wu, wd, dy):
    mm = functools.partial(grouped_matmul, impl=impl)
    f = lambda x, wg, wu, wd: swiglu_ragged(x, sizes, wg, wu, wd, jnp.bfloat16, mm)  # noqa: E731
    y, vjp = jax.vjp(f, x, wg, wu, wd)
    return (y, *vjp(dy.astype(y.dtype)))


def compare_calls(name, outs) -> tuple[list, bool]:
    """Prints, per output, the calls that differ from the first; returns (first, repeatable)."""
    first = [np.asarray(a, np.float32) for a in outs[0]]
    parts, same = [], True
    for k, label in enumerate(("y", "dx", "dw_gate", "dw_up", "dw_down")):
        diffs = [float(np.max(np.abs(np.asarray(o[k], np.float32) - first[k]))) for o in outs[1:]]
        scale = max(float(np.max(np.abs(first[k]))), 1e-30)
        same &= not any(d > 0 for d in diffs)
        parts.append(f"{label}: {sum(d > 0 for d in diffs)}/{len(diffs)} calls differ, "
                     f"max {max(diffs, default=0.0) / scale:.1e}")
    print(f"| {name} | " + " | ".join(parts) + " |", flush=True)
    return first, same


def check_mlp() -> int:
    rows = 512 if args.small else args.rows
    x, sizes, (wg, wu, wd), dy = mlp_inputs(0, rows)
    impls = ["kernel", "xla"] if kernel_usable(x, wg) else ["xla"]
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; expert MLP, rows {rows}, "
          f"kept {int(sum(sizes))}, group sizes {sizes.tolist()}, D {D}, F {F}, "
          f"{args.repeats} calls; impls {impls}")
    ref, ok = None, True
    for impl in reversed(impls):  # xla first: the reference
        fn = jax.jit(functools.partial(mlp_and_grads, impl, sizes=jnp.asarray(sizes)))
        outs = [jax.device_get(fn(x, wg=wg, wu=wu, wd=wd, dy=dy)) for _ in range(args.repeats)]
        first, same = compare_calls(f"one device, {impl}", outs)
        ok &= same
        if ref is None:
            ref = first
        else:
            print("    vs xla: " + ", ".join(f"{rel(a, b):.1e}" for a, b in zip(first, ref)),
                  flush=True)
    if jax.device_count() < 2:
        return 0 if ok else 1
    n = 2
    mesh = Mesh(np.array(jax.devices()[:n]), ("ep",))
    per = [mlp_inputs(s, rows) for s in range(n)]
    xs, dys = jnp.stack([p[0] for p in per]), jnp.stack([p[3] for p in per])
    sizes_s = jnp.stack([jnp.asarray(p[1]) for p in per])
    ws = [jnp.stack([p[2][j] for p in per]) for j in range(3)]
    other = jnp.ones((n * n, 64 if args.small else 4096, D), jnp.bfloat16)
    for impl in impls:
        def body(x, s, wg, wu, wd, dy, o, impl=impl):
            outs = mlp_and_grads(impl, x[0], s[0], wg[0], wu[0], wd[0], dy[0])
            moved = jax.lax.all_to_all(o, "ep", 0, 0, tiled=True)  # overlaps, like the step
            return tuple(a[None] for a in outs) + (moved,)
        sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 7,
                                   out_specs=(P("ep"),) * 6))
        outs = [jax.device_get(sm(xs, sizes_s, *ws, dys, other)[:5])
                for _ in range(args.repeats)]
        ok &= compare_calls(f"2 devices in shard_map + all_to_all, {impl}", outs)[1]
    # As the dropless exchange's second round runs: rows go out by all_to_all, through the
    # expert MLP, and back, inside a lax.switch on an index the devices agree on at run time
    # (pmax); and the same without the switch.
    for impl in impls:
        for in_switch in (False, True):
            def body(x, s, wg, wu, wd, dy, impl=impl, in_switch=in_switch):
                mm = functools.partial(grouped_matmul, impl=impl)

                def round_(x, wg, wu, wd):
                    buf = jax.lax.all_to_all(x, "ep", 0, 0, tiled=True)
                    y = swiglu_ragged(buf, s[0], wg, wu, wd, jnp.bfloat16, mm)
                    return jax.lax.all_to_all(y, "ep", 0, 0, tiled=True)

                def f(x, wg, wu, wd):
                    if not in_switch:
                        return round_(x, wg, wu, wd)
                    pick = jax.lax.pmax((jnp.sum(s[0]) > 0).astype(jnp.int32), "ep")
                    return jax.lax.switch(pick, [lambda *a: jnp.zeros_like(a[0]), round_],
                                          x, wg, wu, wd)
                y, vjp = jax.vjp(f, x[0], wg[0], wu[0], wd[0])
                return tuple(a[None] for a in (y, *vjp(dy[0].astype(y.dtype))))
            sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("ep"),) * 6,
                                       out_specs=(P("ep"),) * 5))
            outs = [jax.device_get(sm(xs, sizes_s, *ws, dys)) for _ in range(args.repeats)]
            where = "inside lax.switch" if in_switch else "no switch"
            ok &= compare_calls(f"2 devices, all_to_all -> MLP -> all_to_all, {where}, "
                                f"{impl}", outs)[1]
    print("all calls repeat" if ok else "FAILED: a call differs from the first")
    return 0 if ok else 1


def main():
    if args.mlp:
        return check_mlp()
    if args.interpret:
        with interpreted_kernels() as races:
            return check(races)
    return check(None)


def check(races):
    impls = ["kernel"] if args.interpret else ["xla"] if args.small else ["auto"]
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (ROWS, D), jnp.bfloat16)
    w = (jax.random.normal(kw, (8, D, F), jnp.float32) / np.sqrt(D)).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (ROWS, F), jnp.bfloat16)
    ref_fn = jax.jit(lambda x, w, gs, dy: fwd_bwd("xla", x, w, gs, dy))
    bad = []
    print(f"{jax.devices()[0].device_kind}{' (Mosaic GPU interpreter)' if races else ''}: "
          f"rows {ROWS}, D {D}, F {F}, 8 groups, bf16")
    print("| case | y vs xla | dX vs xla | dW vs xla | kernel repeatable (y, dX, dW) |")
    print("|---|---|---|---|---|")
    for name, gs in cases(ROWS).items():
        gs = jnp.asarray(gs)
        # rows past sum(gs) hold nonzero values, as any buffer may: they must not count
        ref = ref_fn(x, w, gs, dy)
        for impl in impls:
            fn = jax.jit(lambda x, w, gs, dy: fwd_bwd(impl, x, w, gs, dy))
            first = jax.device_get(fn(x, w, gs, dy))
            same = [True, True, True]
            for _ in range(args.repeats - 1):
                again = jax.device_get(fn(x, w, gs, dy))
                same = [s and bool(np.array_equal(np.asarray(a), np.asarray(b)))
                        for s, a, b in zip(same, again, first)]
            diffs = [rel(a, b) for a, b in zip(first, ref)]
            ok = all(d <= args.tol for d in diffs) and all(same)
            if not ok:
                bad.append(name)
            raced = races() if races else None
            if raced:
                bad.append(f"{name} (race)")
            print(f"| {name} | {diffs[0]:.1e} | {diffs[1]:.1e} | {diffs[2]:.1e} | "
                  f"{same} |" + ("" if races is None else f" race seen: {raced} |"),
                  flush=True)
    print("FAILED: " + "; ".join(bad) if bad else "all cases ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
