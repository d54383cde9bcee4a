"""Attention layers on GPUs: cuDNN's flash attention against the plain twin, and a hybrid
model's pipeline and expert-parallel layouts against one device with it inside shard_map.

    python3 scripts/check_attention_gpu.py                 # on the 2-GPU kind
    python3 scripts/check_attention_gpu.py --cpu_devices 2 --impl xla --small   # CPU smoke

Part 1, one device, bf16 at Bamba-9B's attention shape (32 query heads, 8 key/value heads
of 128, rotary 64) unless --small: forward and input gradients of `attend(impl)` against
`attention_reference` (fp32 inside), with and without packed documents, relative to the
largest entry; and the forward+backward time of each implementation.
Part 2: the hybrid_demo preset in --dtype (attention at layer 1 of 4) at (pp, ep) = (2, 1)
and (1, 2) with the default schedule: loss and gradients against the one-device model on
the same parameters and batch: the gradient as one vector (|g - g1| / |g1| over all leaves)
and, for information, the worst leaf (relative to its largest entry; in bf16 a token whose
top-k flips between layouts moves one expert's leaf by up to ~10%, 2026-11-26).
At ep > 1, --attn_impl auto runs xla attention (XLA crashed compiling cuDNN there:
jmamba.parallel.setup.attention_for_layout).
Prints two tables; exits 1 if the loss or the whole-gradient difference exceeds --tol.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--impl", default="auto", help="attention impl under test (auto: cudnn on GPU)")
ARGS.add_argument("--small", action="store_true", help="small shapes (CPU smoke run)")
ARGS.add_argument("--dtype", default="bfloat16")
ARGS.add_argument("--tol", type=float, default=2e-2)
ARGS.add_argument("--cpu_devices", type=int, default=0)
ARGS.add_argument("--layouts", default="2,1,2/1,2,1", help="part 2's pp,ep,M triples, /-separated")
ARGS.add_argument("--no_part1", action="store_true", help="skip part 1 (cuDNN against the twin)")
args = ARGS.parse_args()
if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.cpu_devices}")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jmamba import attention, model  # noqa: E402
from jmamba.cli import parse_config  # noqa: E402
from jmamba.data import recall_batch  # noqa: E402
from jmamba.parallel import layout as lay  # noqa: E402
from jmamba.parallel.mesh import make_mesh  # noqa: E402
from jmamba.parallel.setup import attention_for_layout, pipeline_loss  # noqa: E402


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def timed(f, *xs, n=5) -> float:
    jax.block_until_ready(f(*xs))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*xs)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


def part1(dtype) -> bool:
    B, L, Q, R, A = (2, 64, 4, 2, 16) if args.small else (2, 4096, 32, 8, 128)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, L, Q, A), dtype)
    k = jax.random.normal(ks[1], (B, L, R, A), dtype)
    v = jax.random.normal(ks[2], (B, L, R, A), dtype)
    ct = jax.random.normal(ks[3], (B, L, Q, A), dtype)
    docs = jnp.asarray(np.repeat(np.arange(4), L // 4)[None].repeat(B, 0))
    impl = attention.pick_impl(args.impl, dtype)
    print(f"\n{jax.devices()[0].device_kind}: attend(impl={impl}) against the twin, {dtype}, "
          f"B {B} L {L} Q {Q} R {R} A {A}")
    print("| documents | forward | dq | dk | dv | impl ms (fwd+bwd) | twin ms | xla ms |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for seq in (None, docs):
        def run(which):
            def f(q, k, v):
                out, pull = jax.vjp(lambda *a: attention.attend(*a, seq, impl=which), q, k, v)
                return out, pull(ct)
            return jax.jit(f)
        (o1, g1), (o2, g2) = run(impl)(q, k, v), run("reference")(q, k, v)
        diffs = [rel(o1, o2)] + [rel(a, b) for a, b in zip(g1, g2)]
        ok &= max(diffs) <= args.tol
        ms = [timed(run(w), q, k, v) for w in (impl, "reference", "xla")]
        print(f"| {'4 a row' if seq is not None else 'none'} | "
              + " | ".join(f"{d:.1e}" for d in diffs) + " | "
              + " | ".join(f"{t:.2f}" for t in ms) + " |", flush=True)
    return ok


def part2(dtype) -> bool:
    print(f"\nhybrid_demo in {dtype} (attn_impl {args.impl}): layouts against one device")
    print("| pp,ep,M | attention | loss rel diff | gradient rel diff (all leaves) "
          "| worst leaf (rel to its max) |")
    print("|---|---|---|---|---|")
    ok = True
    base = ["--config", "hybrid_demo", "--dtype", dtype, "--attn_impl", args.impl,
            "--batch_size", "8"]
    cfg1 = parse_config(base)
    m, t = cfg1.model, cfg1.train
    params = model.init_params(m, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in
             recall_batch(0, 0, t.batch_size, t.seq_len, m.vocab_size, t.n_pairs).items()}
    (loss1, _), grads1 = jax.jit(jax.value_and_grad(
        lambda p: model.loss_fn(p, batch, m), has_aux=True))(params)
    for pp, ep, M in (map(int, spec.split(",")) for spec in args.layouts.split("/")):
        cfg = parse_config(base + ["--pp", str(pp), "--ep", str(ep), "--microbatches", str(M)])
        layout = lay.StageLayout.from_config(cfg)
        f = jax.value_and_grad(pipeline_loss(cfg, layout, make_mesh(pp, ep)), has_aux=True)
        (loss, _), grads = jax.jit(f)(lay.to_stage(params, layout), batch)
        grads = lay.to_canonical(lay.tie_gradients(grads, layout), layout)
        worst = max((rel(g, g1), jax.tree_util.keystr(path)) for (path, g1), g in zip(
            jax.tree_util.tree_flatten_with_path(grads1)[0], jax.tree.leaves(grads)))
        flat = lambda tree: np.concatenate([np.asarray(x, np.float64).ravel()
                                            for x in jax.tree.leaves(tree)])
        g, g1 = flat(grads), flat(grads1)
        whole = float(np.linalg.norm(g - g1) / np.linalg.norm(g1))
        d = rel(loss, loss1)
        ok &= d <= args.tol and whole <= args.tol
        used = attention.pick_impl(attention_for_layout(cfg).model.attn_impl, m.dtype)
        print(f"| {pp},{ep},{M} | {used} | {d:.1e} | {whole:.1e} | {worst[0]:.1e} {worst[1]} |",
              flush=True)
    return ok


if __name__ == "__main__":
    dtype = jnp.dtype(args.dtype)
    good = True if args.no_part1 else part1(dtype)
    good &= part2(args.dtype)
    sys.exit(0 if good else 1)
