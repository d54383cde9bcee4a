"""Pipeline benchmark: step time, tokens/s and measured bubble at pp=2 against pp=1.

For each layout it builds the real train step (jmamba.parallel.setup.build), runs warm-up
steps, then times `--steps` steps (blocking on each). The measured bubble is
1 - t_ideal / t_pp with t_ideal = t(pp=1, same microbatches) / pp, so it also counts the
stage-transfer time; the theory column is (p-1)/(v*m+p-1).

    python scripts/bench_pipeline.py                  # on 2 GPUs
    python scripts/bench_pipeline.py --small          # CPU smoke test (simulated devices)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import time_steps  # noqa: E402 (scripts/timing.py)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke test")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--remat", default="full", help="per-layer remat policy for every layout")
    args = ap.parse_args()
    if args.small:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
    from jmamba.data import recall_batch
    from jmamba.parallel.pipeline import bubble_fraction, transfer_bytes
    from jmamba.parallel.setup import build

    if args.small:
        model = ModelConfig(d_model=32, n_layer=4, headdim=8, d_state=8, chunk_size=16,
                            d_expert=32)
        train = TrainConfig(batch_size=16, seq_len=64, n_pairs=4, warmup_steps=0)
        ms = (2, 4)
    else:
        model = ModelConfig(d_model=1024, n_layer=8, vocab_size=32000, headdim=64,
                            d_state=128, chunk_size=256, n_experts=8, top_k=2, d_expert=1024,
                            dtype="bfloat16")
        train = TrainConfig(batch_size=16, seq_len=2048, n_pairs=64, warmup_steps=0)
        ms = (2, 4, 8, 16)
    batch = {k: jax.numpy.asarray(v) for k, v in recall_batch(
        0, 0, train.batch_size, train.seq_len, model.vocab_size, train.n_pairs).items()}

    def time_layout(pp, M, schedule="gpipe", comm="pair"):
        cfg = validate(Config(model=model, train=dataclasses.replace(train, steps=100),
                              parallel=ParallelConfig(pp=pp, microbatches=M,
                                                      pp_schedule=schedule, pp_comm=comm,
                                                      pp_virtual=2, remat=args.remat)))
        run = build(cfg)
        metrics, step_s, compile_s = time_steps(run, batch, args.steps)
        v = 2 if schedule == "circular" else 1
        return {"pp": pp, "M": M, "schedule": schedule, "comm": comm,
                "step_s": step_s, "compile_s": compile_s,
                "loss": float(metrics["loss"]),
                "tokens_per_s": train.batch_size * train.seq_len / step_s,
                "bubble_theory": bubble_fraction(pp, v, M),
                "transfer_MB": transfer_bytes(cfg, train.batch_size // M, train.seq_len) / 1e6}

    rows = []
    print(f"devices: {jax.devices()}", flush=True)
    for M in ms:
        base = time_layout(1, M)
        rows.append(base)
        for schedule in ("gpipe", "circular"):
            r = time_layout(2, M, schedule)
            r["bubble_measured"] = 1 - (base["step_s"] / 2) / r["step_s"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    M = ms[-2]
    r = time_layout(2, M, "gpipe", "sum")
    base = next(x for x in rows if x["pp"] == 1 and x["M"] == M)
    r["bubble_measured"] = 1 - (base["step_s"] / 2) / r["step_s"]
    rows.append(r)
    print("\n| pp | M | schedule | pp_comm | step ms | tokens/s | bubble theory | bubble "
          "measured | MB per transfer | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        meas = f"{r['bubble_measured']:.3f}" if "bubble_measured" in r else "-"
        print(f"| {r['pp']} | {r['M']} | {r['schedule'] if r['pp'] > 1 else '-'} | "
              f"{r['comm'] if r['pp'] > 1 else '-'} | {1e3 * r['step_s']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['bubble_theory']:.3f} | {meas} | "
              f"{r['transfer_MB']:.1f} | {r['loss']:.4f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
