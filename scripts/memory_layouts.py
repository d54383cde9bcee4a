"""Per-device memory of the compiled train step, pp=2 with twice the layers against pp=1.

XLA's memory analysis of the step train.py compiles (the numbers train.py writes to
memory.json), nothing run (the state is abstract): the pp=1 model of N layers at batch B
against the pp=2 model of 2N layers at the same batch in M microbatches (or, with --weak,
at M x B: microbatches as large as the pp=1 batch, scripts/scaling.py's shape), per
schedule, --remat and --loss_chunks. Two GPUs hold a model twice the size when the ratio
is <= 1.1.

    python3 scripts/memory_layouts.py                       # CPU, 8 simulated devices
    python3 scripts/memory_layouts.py --preset moe_1b --layers 16 --batch 16 --microbatches 8
    python3 scripts/memory_layouts.py --preset moe_1b --layers 16 --batch 16 --microbatches 8 \
        --weak --schedules 1f1b --remats full --loss_chunks 1,8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu_demo")
    ap.add_argument("--layers", type=int, default=4, help="N: the pp=1 model's layers")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--microbatches", default="4,8")
    ap.add_argument("--schedules", default="1f1b,gpipe")
    ap.add_argument("--remats", default="none,full")
    ap.add_argument("--loss_chunks", default="1", help="model.loss_chunks values, e.g. 1,8")
    ap.add_argument("--pp_stash", default="inputs",
                    help="parallel.pp_stash values for the pp=2 runs, e.g. inputs,residuals "
                    "(residuals is 1F1B's: other schedules run only with inputs)")
    ap.add_argument("--scan_layers", default="auto", choices=["auto", "true", "false"],
                    help="model.scan_layers for every run (auto: the scan on the CPU; on a "
                    "GPU auto unrolls the pp=1 run and scans the pp=2 ones, so pass true or "
                    "false to compare like with like)")
    ap.add_argument("--weak", action="store_true",
                    help="pp=2 at batch M x B (microbatches of the pp=1 batch)")
    args = ap.parse_args()
    from jmamba.cli import simulate_cpu_devices
    simulate_cpu_devices(8)
    import jax
    from jmamba.cli import load_preset
    from jmamba.config import validate
    from jmamba.data import recall_batch
    from jmamba.metrics import compiled_memory
    from jmamba.parallel.setup import build

    base = load_preset(args.preset)

    scan = {"auto": None, "true": True, "false": False}[args.scan_layers]

    def total_gb(n_layer, pp, M, schedule, remat, chunks, stash="inputs"):
        B = args.batch * (M if args.weak and pp > 1 else 1)
        cfg = validate(dataclasses.replace(
            base, model=dataclasses.replace(base.model, n_layer=n_layer, loss_chunks=chunks,
                                         scan_layers=scan),
            train=dataclasses.replace(base.train, batch_size=B, warmup_steps=0),
            parallel=dataclasses.replace(base.parallel, pp=pp, microbatches=M,
                                         pp_schedule=schedule, remat=remat,
                                         pp_stash=stash)))
        t = cfg.train
        run = build(cfg, abstract=True)
        one_row = recall_batch(0, 0, 1, t.seq_len, cfg.model.vocab_size, t.n_pairs)
        batch = {k: jax.ShapeDtypeStruct((B,) + v.shape[1:], v.dtype,
                                         sharding=run.batch_sharding)
                 for k, v in one_row.items()}
        mem = compiled_memory(run.step_fn.lower(run.state, batch).compile())
        return mem["total_bytes"] / 2**30

    N = args.layers
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; preset "
          f"{args.preset}, batch {args.batch}{' (pp=2: M x batch)' if args.weak else ''}\n")
    print("| remat | loss_chunks | schedule | pp_stash | pp=1, N layers, GB | pp=2, 2N layers | "
          "M | GB per device | ratio |\n|---|---|---|---|---|---|---|---|---|")
    for remat in args.remats.split(","):
        for chunks in (int(c) for c in args.loss_chunks.split(",")):
            one = total_gb(N, 1, 1, "1f1b", remat, chunks)
            for schedule in args.schedules.split(","):
                for stash in args.pp_stash.split(","):
                    if stash != "inputs" and schedule != "1f1b":
                        continue  # the residual stash is a 1F1B stash
                    for M in (int(x) for x in args.microbatches.split(",")):
                        two = total_gb(2 * N, 2, M, schedule, remat, chunks, stash)
                        print(f"| {remat} | {chunks} | {schedule} | {stash} | {one:.3f} | "
                              f"{2 * N} | {M} | {two:.3f} | {two / one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
