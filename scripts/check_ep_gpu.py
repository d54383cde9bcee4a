"""Checks and times expert parallelism and the grouped-matmul kernel on the GPUs present.

    python scripts/check_ep_gpu.py            # 1-2 GPUs: ep = number of GPUs
    python scripts/check_ep_gpu.py --small    # tiny shapes; runs on CPU (2 host devices)

(a) impl='ragged' equals impl='dense' (values, dropped counts, gradients), dropless and
    with overflow; both equal moe_dropless when dropless; grouped_matmul's kernel path
    equals lax.ragged_dot (forward, dX, dW).
(b) times the EP experts_fn forward+backward with each exchange.
(c) expert-MLP forward and forward+backward, E=8, top-2, d_model 2048, F 4096, 16k tokens,
    bf16, balanced and skewed group sizes: grouped_matmul kernel vs lax.ragged_dot vs one
    dense matmul of the same FLOPs, as a TFLOP/s table.
Exits 1 if a check fails. Every timed call is synced; each is warmed up first.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
ARGS.add_argument("--iters", type=int, default=20)
ARGS.add_argument("--blocks", default="128,128,64,4,1",
                  help="kernel tiles: block_m,block_n,block_k,max_concurrent_steps,grid_block_n")
args = ARGS.parse_args()
if args.small:  # two host devices so the CPU run exchanges something
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402

from jmamba.kernels.grouped_matmul import Blocks, grouped_matmul, kernel_usable  # noqa: E402
from jmamba.moe import moe_dropless, route, swiglu_ragged  # noqa: E402
from jmamba.parallel.ep import make_ep_experts_fn  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 checks: no TF32
E, K = 8, 2
ON_GPU = jax.default_backend() == "gpu"
EP = len(jax.devices())
BLOCKS = Blocks(*map(int, args.blocks.split(",")))
FAILED = []


def check(name, ok, detail=""):
    print(f"  [{'ok' if ok else 'FAIL'}] {name} {detail}")
    if not ok:
        FAILED.append(name)


def timed(fn, *a):
    """Median seconds per call, each call synced, after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*a))
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def problem(T, D, F, skew, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (T, D), dtype)
    w, e, _ = route(jax.random.normal(k[1], (T, E)).at[:, :2].add(skew), K, True)
    ws = tuple(jax.random.normal(kk, s, jnp.float32) / np.sqrt(s[1]) for kk, s in
               zip(k[2:], [(E, D, F), (E, D, F), (E, F, D)]))
    return x, w, e, ws


def ep_step(impl, cf, dtype, x, w, e, ws):
    """Jitted (y, dropped per rank, grads w.r.t. x, router weights, expert weights)."""
    fn = make_ep_experts_fn(E, EP, capacity_factor=cf, impl=impl)

    def body(x, w, e, *ws):
        y, dropped = fn(x, w, e, *ws, dtype)
        return y, dropped[None]

    run = jax.shard_map(body, mesh=jax.make_mesh((EP,), ("ep",), axis_types=(AxisType.Auto,)),
                        in_specs=(P("ep"),) * 6, out_specs=(P("ep"), P("ep")))

    def loss(x, w, ws):
        y, dropped = run(x, w, e, *ws)
        return jnp.sum(y.astype(jnp.float32) ** 2), (y, dropped)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    return lambda: step(x, w, ws)


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(jnp.asarray(p, jnp.float32) - jnp.asarray(q, jnp.float32))))
               for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def part_a(T, D, F):
    print(f"(a) correctness, ep={EP}, {T} tokens, d_model {D}, F {F}, fp32")
    impls = ["ragged", "dense"] if ON_GPU else ["dense"]
    if not ON_GPU:
        print("  ragged: skipped (XLA:CPU has no ragged-all-to-all)")
    for label, skew, cf in [("dropless", 3.0, None), ("overflow", 3.0, 0.5)]:
        x, w, e, ws = problem(T, D, F, skew, jnp.float32)
        out = {i: ep_step(i, cf, jnp.float32, x, w, e, ws)() for i in impls}
        drops = {i: np.asarray(o[0][1][1]) for i, o in out.items()}
        print(f"  {label}: dropped per rank {drops}")
        if len(impls) == 2:
            diff = max_diff(out["ragged"], out["dense"])
            check(f"{label}: ragged == dense (y, grads)", diff <= 1e-5, f"max |diff| {diff:.2e}")
            check(f"{label}: same dropped copies", (drops["ragged"] == drops["dense"]).all())
        if cf is None:
            y_ref, _ = moe_dropless(x, w, e, *ws, jnp.float32)
            for i in impls:
                check(f"{label}: {i} == moe_dropless", max_diff(out[i][0][1][0], y_ref) < 1e-4,
                      f"max |diff| {max_diff(out[i][0][1][0], y_ref):.2e}")
        else:
            check(f"{label}: copies were dropped", drops[impls[-1]].sum() > 0)
    # Grouped matmul: kernel vs lax.ragged_dot in bf16, odd S, an empty group, spare rows.
    gs = jnp.array([T, 0, T // 2, T, 3 * T // 2, 7, T - 7, 20], jnp.int32)
    S = int(gs.sum()) + 37
    kx, kw, kc = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (S, D), jnp.bfloat16)
    wt = (jax.random.normal(kw, (E, D, F)) / np.sqrt(D)).astype(jnp.bfloat16)
    ct = jax.random.normal(kc, (S, F), jnp.bfloat16)
    if not kernel_usable(x, wt, BLOCKS):
        print(f"  grouped_matmul kernel: not usable here ({jax.default_backend()}); skipped")
        return
    f = lambda impl: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(
        grouped_matmul(x, w, gs, impl, BLOCKS).astype(jnp.float32) * ct), (0, 1)))(x, wt)
    got, ref = f("kernel"), f("xla")
    y_k, y_x = grouped_matmul(x, wt, gs, "kernel", BLOCKS), grouped_matmul(x, wt, gs, "xla")
    scale = float(jnp.max(jnp.abs(y_x.astype(jnp.float32))))
    check("grouped_matmul kernel forward == lax.ragged_dot", max_diff(y_k, y_x) <= 2e-2 * scale,
          f"max |diff| {max_diff(y_k, y_x):.3g} (max |y| {scale:.3g})")
    check("kernel rows past sum(group_sizes) are zero", bool((y_k[int(gs.sum()):] == 0).all()))
    for name, a, b in [("dX", got[1][0], ref[1][0]), ("dW", got[1][1], ref[1][1])]:
        s = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        check(f"grouped_matmul kernel {name}", max_diff(a, b) <= 2e-2 * s,
              f"max |diff| {max_diff(a, b):.3g} (max {s:.3g})")


def part_b(T, D, F):
    print(f"(b) EP experts_fn forward+backward, ep={EP}, {T} tokens, d_model {D}, F {F}, bf16")
    for impl in (["ragged", "dense"] if ON_GPU else ["dense"]):
        for label, skew, cf in [("balanced-ish", 0.0, 1.25), ("skewed", 3.0, 1.25)]:
            x, w, e, ws = problem(T, D, F, skew, jnp.bfloat16)
            t = timed(ep_step(impl, cf, jnp.bfloat16, x, w, e, ws))
            print(f"  {impl:6s} {label:12s} {t * 1e3:9.3f} ms")


def part_c(T, D, F):
    S = T * K
    print(f"(c) expert MLP, E={E}, top-{K}, {T} tokens ({S} copies), d_model {D}, F {F}, bf16")
    loads = {"balanced": np.full(E, S // E),
             "skewed": np.array([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0])}
    loads["skewed"] = np.floor(loads["skewed"] * S).astype(int)
    loads["skewed"][0] += S - loads["skewed"].sum()
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (S, D), jnp.bfloat16)
    ws = [(jax.random.normal(k, s) / np.sqrt(s[1])).astype(jnp.bfloat16) for k, s in
          zip(jax.random.split(kw, 3), [(E, D, F), (E, D, F), (E, F, D)])]
    # The same FLOPs as one expert over all S copies: [S, D] x [D, F] matmuls, no groups.
    dense = lambda x, gs, wg, wu, wd: jnp.dot(jax.nn.silu(x @ wg) * (x @ wu), wd)
    mms = {"grouped_matmul kernel": functools.partial(grouped_matmul, impl="kernel",
                                                      blocks=BLOCKS),
           "lax.ragged_dot": jax.lax.ragged_dot}
    flop_fwd = 6 * S * D * F  # three [S, D] x [D, F]-sized matmuls; backward is twice that
    print(f"  {'path':24s} {'load':9s} {'fwd ms':>9s} {'TFLOP/s':>8s} "
          f"{'fwd+bwd ms':>11s} {'TFLOP/s':>8s}")
    for name in [*mms, "dense matmul"]:
        for load, sizes in loads.items():
            if name == "dense matmul" and load == "skewed":
                continue  # no groups
            if name == "grouped_matmul kernel" and not kernel_usable(x, ws[0], BLOCKS):
                print(f"  {name:24s} {load:9s} n/a (kernel not usable on "
                      f"{jax.default_backend()})")
                continue
            mlp = (dense if name == "dense matmul" else functools.partial(
                lambda mm, x, gs, *w: swiglu_ragged(x, gs, *w, jnp.bfloat16, mm), mms[name]))
            gs = jnp.asarray(sizes, jnp.int32)
            w_args = [w[0] for w in ws] if name == "dense matmul" else ws
            fwd = jax.jit(mlp)
            fb = jax.jit(jax.grad(lambda x, gs, *w: jnp.sum(mlp(x, gs, *w).astype(jnp.float32)),
                                  argnums=(0, 2, 3, 4)))
            t_f, t_fb = timed(fwd, x, gs, *w_args), timed(fb, x, gs, *w_args)
            print(f"  {name:24s} {load:9s} {t_f * 1e3:9.3f} {flop_fwd / t_f / 1e12:8.1f} "
                  f"{t_fb * 1e3:11.3f} {3 * flop_fwd / t_fb / 1e12:8.1f}")


if __name__ == "__main__":
    print(f"devices: {EP} x {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"kernel tiles {BLOCKS}")
    if args.small:
        part_a(64, 32, 64), part_b(256, 64, 128), part_c(256, 64, 128)
    else:
        part_a(1024, 256, 512), part_b(16384, 2048, 4096), part_c(16384, 2048, 4096)
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)
