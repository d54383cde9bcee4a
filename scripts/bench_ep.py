"""Expert-parallel training step: ep=2 against ep=1, the all-to-all share, and a tile sweep
of the Hopper grouped matmul.

    python scripts/bench_ep.py            # on 2 GPUs (one H200-x2 machine)
    python scripts/bench_ep.py --small    # CPU smoke test (simulated devices)

(1) Step time of the real train step (jmamba.parallel.setup.build) for the same global batch
at (pp=1, ep=1) on one device and (pp=1, ep=2) with each exchange. (2) The all-to-all share:
one profiled step at ep=2; the time of device ops whose names mention all-to-all / nccl /
send-recv, over the step time (per device). (3) Grouped-matmul kernel tiles for the expert
MLP (E=8, top-2, 16384 tokens, d_model 2048, F 4096, bf16), forward+backward TFLOP/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import time_steps  # noqa: E402 (scripts/timing.py)

# XLA op events (all-to-all.3, ragged-all-to-all) and NCCL kernel events can both appear in
# a GPU trace; they describe the same time, so each kind is summed on its own.
COMM_KINDS = {"xla_op": re.compile(r"all-to-all|all_to_all|alltoall", re.I),
              "nccl_kernel": re.compile(r"^nccl", re.I)}


def comm_share(trace_dir, step_s, n_devices):
    """Sums device-side events whose names look like collectives in a perfetto trace."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return None, []
    with gzip.open(files[0]) as f:
        events = json.load(f).get("traceEvents", [])
    total_us, names = {k: 0.0 for k in COMM_KINDS}, {}
    for ev in events:
        for kind, pattern in COMM_KINDS.items():
            if ev.get("ph") == "X" and pattern.search(ev.get("name", "")):
                total_us[kind] += ev.get("dur", 0.0)
                key = ev["name"][:50]
                names[key] = names.get(key, 0.0) + ev.get("dur", 0.0)
    top = sorted(names.items(), key=lambda kv: -kv[1])[:6]
    shares = {k: round(v / 1e6 / n_devices / step_s, 4) for k, v in total_us.items()}
    return max(shares.values()), {"shares": shares, "top_us": top}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    if args.small:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
    from jmamba.data import recall_batch
    from jmamba.parallel.setup import build

    if args.small:
        model = ModelConfig(d_model=32, n_layer=2, headdim=8, d_state=8, chunk_size=16,
                            n_experts=4, d_expert=32)
        train = TrainConfig(batch_size=8, seq_len=64, n_pairs=4, warmup_steps=0)
    else:
        model = ModelConfig(d_model=1024, n_layer=8, vocab_size=32000, headdim=64,
                            d_state=128, chunk_size=256, n_experts=8, top_k=2, d_expert=2048,
                            dtype="bfloat16")
        train = TrainConfig(batch_size=16, seq_len=2048, n_pairs=64, warmup_steps=0)
    batch = {k: jnp.asarray(v) for k, v in recall_batch(
        0, 0, train.batch_size, train.seq_len, model.vocab_size, train.n_pairs).items()}

    def run_layout(ep, dispatch, profile=False):
        cfg = validate(Config(model=model, train=dataclasses.replace(train, steps=100),
                              parallel=ParallelConfig(ep=ep, ep_dispatch=dispatch,
                                                      remat="full")))
        run = build(cfg)
        metrics, step_s, _ = time_steps(run, batch, args.steps)
        row = {"ep": ep, "dispatch": dispatch, "step_ms": 1e3 * step_s,
               "tokens_per_s": train.batch_size * train.seq_len / step_s,
               "dropped": int(metrics["dropped_tokens"]), "loss": float(metrics["loss"])}
        if profile:
            d = tempfile.mkdtemp()
            with jax.profiler.trace(d, create_perfetto_trace=True):
                jax.block_until_ready(run.step_fn(run.state, batch))
            row["comm_share"], row["comm_top"] = comm_share(d, row["step_ms"] / 1e3, ep)
        print(json.dumps(row), flush=True)
        return row

    rows = [run_layout(1, "auto")]
    dispatches = ("dense",) if jax.default_backend() == "cpu" else ("ragged", "dense")
    rows += [run_layout(2, d, profile=True) for d in dispatches]
    print("\n| layout | exchange | step ms | tokens/s | all-to-all share | dropped |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = f"{r['comm_share']:.3f}" if r.get("comm_share") is not None else "-"
        print(f"| pp=1 ep={r['ep']} | {r['dispatch'] if r['ep'] > 1 else '-'} | "
              f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {share} | {r['dropped']} |")

    if jax.default_backend() != "gpu":
        return
    from jmamba.kernels.grouped_matmul import Blocks, grouped_matmul, kernel_usable
    from jmamba.moe import swiglu_ragged
    S, D, F, E = 32768, 2048, 4096, 8
    x = jax.random.normal(jax.random.key(0), (S, D), jnp.bfloat16)
    ws = [(jax.random.normal(jax.random.key(i), s) / np.sqrt(s[1])).astype(jnp.bfloat16)
          for i, s in enumerate([(E, D, F), (E, D, F), (E, F, D)], 1)]
    gs = jnp.full((E,), S // E, jnp.int32)
    flop = 3 * 6 * S * D * F

    def timed(fn):
        out = fn(x, gs, *ws)
        jax.block_until_ready(out)
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, gs, *ws))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    print("\n| block_m | block_n | block_k | stages | grid_block_n | fwd+bwd ms | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for bm, bn, bk, st, gb in [(128, 128, 64, 4, 1), (128, 128, 64, 4, 2), (128, 128, 64, 4, 4),
                               (64, 256, 64, 4, 2), (64, 128, 64, 4, 2), (128, 128, 64, 5, 2),
                               (64, 256, 64, 3, 2), (128, 128, 64, 3, 2)]:
        blocks = Blocks(bm, bn, bk, st, gb)
        if not kernel_usable(x, ws[0], blocks):
            continue
        mm = functools.partial(grouped_matmul, impl="kernel", blocks=blocks)
        fb = jax.jit(jax.grad(lambda x, gs, *w: jnp.sum(
            swiglu_ragged(x, gs, *w, jnp.bfloat16, mm).astype(jnp.float32)),
            argnums=(0, 2, 3, 4)))
        try:
            t = timed(fb)
            print(f"| {bm} | {bn} | {bk} | {st} | {gb} | {1e3 * t:.3f} | {flop / t / 1e12:.1f} |",
                  flush=True)
        except Exception as e:  # a tile that does not fit shared memory
            print(f"| {bm} | {bn} | {bk} | {st} | {gb} | failed: {type(e).__name__} | - |")
    dense = jax.jit(jax.grad(lambda x, gs, wg, wu, wd: jnp.sum(jnp.dot(
        jax.nn.silu(x @ wg[0]) * (x @ wu[0]), wd[0]).astype(jnp.float32)), argnums=(0, 2, 3, 4)))
    t = timed(dense)
    print(f"| dense matmul, same FLOPs | | | | | {1e3 * t:.3f} | {flop / t / 1e12:.1f} |")


if __name__ == "__main__":
    main()
