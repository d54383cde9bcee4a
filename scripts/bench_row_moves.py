"""The MoE's row moves, gathers both ways (default) against their plain twins (a gather whose
backward is a scatter-add, and the unsort as a scatter), in the moe_1b train step.

Same process, same data, one variant after the other; step ms is the median of --steps
steps after 2 warm-up steps.

    python3 scripts/bench_row_moves.py --out $OUT                  # one GPU, batch 16
    python3 scripts/bench_row_moves.py --out $OUT --ep 2 --n_experts 32 --batch 32
    python3 scripts/bench_row_moves.py --small                     # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--small", action="store_true", help="cpu_demo shapes (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--n_experts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if args.small and args.ep > 1:
        from jmamba.cli import simulate_cpu_devices
        simulate_cpu_devices(args.ep)
    import jax
    from timing import time_steps
    from jmamba import moe
    from jmamba.cli import load_preset
    from jmamba.config import validate
    from jmamba.data import recall_batch
    from jmamba.parallel import ep as ep_mod
    from jmamba.parallel import setup

    base = load_preset("cpu_demo" if args.small else "moe_1b")
    n_experts = base.model.n_experts if args.small else args.n_experts
    cfg = validate(dataclasses.replace(
        base, model=dataclasses.replace(base.model, n_experts=n_experts),
        train=dataclasses.replace(base.train, batch_size=args.batch, steps=100,
                                  warmup_steps=0),
        parallel=dataclasses.replace(base.parallel, ep=args.ep)))
    t = cfg.train
    data = {k: jax.numpy.asarray(v) for k, v in recall_batch(
        0, 0, args.batch, t.seq_len, cfg.model.vocab_size, t.n_pairs).items()}
    variants = {"gathers both ways": (moe.sorted_copies, moe.combine),
                "plain twins": (moe.sorted_copies_plain, moe.combine_plain)}
    rows = []
    for name, (copies, comb) in variants.items():
        for mod in (moe, ep_mod):  # ep.py imported the names
            mod.sorted_copies, mod.combine = copies, comb
        run = setup.build(cfg)
        batch = data if run.batch_sharding is None else jax.device_put(data, run.batch_sharding)
        metrics, step_s, _ = time_steps(run, batch, args.steps)
        rows.append({"variant": name, "step_ms": round(1e3 * step_s, 1),
                     "loss": float(metrics["loss"])})
        print(json.dumps(rows[-1]), flush=True)
        del run
    for mod in (moe, ep_mod):
        mod.sorted_copies, mod.combine = variants["gathers both ways"]
    lines = [f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
             f"ep {args.ep}, experts {n_experts}, batch {args.batch}", "",
             "| variant | step ms | vs plain |", "|---|---|---|"]
    plain = rows[-1]["step_ms"]
    lines += [f"| {r['variant']} | {r['step_ms']} | {plain / r['step_ms']:.2f}x |" for r in rows]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "row_moves.md"), "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
