"""Why a microbatched step is slower than one big step on one GPU: same model, same tokens.

Rows (moe_1b shape, --remat full, default ssm_impl, one GPU):
  single B        the one-device step (model.loss_fn) at batch B
  single B/M x M  the one-device step at the microbatch size, times M (no pipeline loop)
  pipeline M      the pipeline loop at pp = 1 with M microbatches (what --microbatches M runs)
  ... conds kept  the same with every lax.cond the loop can elide kept (elide_conds=False):
                  a GPU cond copies its predicate to the host and waits for the device

    python3 scripts/bench_microbatch.py --out $OUT            # one GPU
    python3 scripts/bench_microbatch.py --small --out runs/microbatch  # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke test")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--microbatches", default="2,4")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    import jax
    from timing import time_steps
    from jmamba.cli import load_preset
    from jmamba.config import validate
    from jmamba.data import recall_batch
    from jmamba.parallel import pipeline, setup

    base = load_preset("cpu_demo" if args.small else "moe_1b")
    if args.small:
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, n_layer=4))

    def cfg_for(batch, M):
        return validate(dataclasses.replace(
            base, train=dataclasses.replace(base.train, batch_size=batch, steps=100,
                                            warmup_steps=0),
            parallel=dataclasses.replace(base.parallel, remat="full", microbatches=M)))

    def timed(name, batch, M, repeat=1, elide=True):
        cfg = cfg_for(batch, M)
        t = cfg.train
        data = {k: jax.numpy.asarray(v) for k, v in recall_batch(
            0, 0, batch, t.seq_len, cfg.model.vocab_size, t.n_pairs).items()}
        original = setup.make_pipeline_loss
        setup.make_pipeline_loss = functools.partial(original, elide_conds=elide)
        try:
            run = setup.build(cfg)
        finally:
            setup.make_pipeline_loss = original
        metrics, step_s, _ = time_steps(run, data, args.steps)
        row = {"name": name, "batch": batch, "M": M, "step_ms": round(1e3 * step_s * repeat, 1),
               "loss": float(metrics["loss"])}
        print(json.dumps(row), flush=True)
        del run
        return row

    B = args.batch
    rows = [timed(f"single {B}", B, 1)]
    for M in (int(x) for x in args.microbatches.split(",")):
        rows.append(timed(f"single {B // M} x {M}", B // M, 1, repeat=M))
        rows.append(timed(f"pipeline M={M}", B, M))
        rows.append(timed(f"pipeline M={M}, conds kept", B, M, elide=False))
    lines = [f"devices: {jax.devices()}", f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}", "",
             "| run | batch per step | M | step ms | vs single |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['batch']} | {r['M']} | {r['step_ms']} | "
                     f"{r['step_ms'] / rows[0]['step_ms']:.2f} |")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "microbatch.md"), "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
