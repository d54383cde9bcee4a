"""Does aux-loss-free balancing even out the expert load, at equal loss? train.py runs side
by side, the same except for the balancing flags.

    python scripts/balance_bias.py --out runs/balance            # cpu_demo on the CPU
    python scripts/balance_bias.py --out $OUT --config moe_1b --steps 60   # a GPU

Rows: no balancing at all (aux loss 0, no bias), the auxiliary loss (the preset's
coefficient), and the router bias at --rates with the aux loss off. Prints the expert load
(per-layer max over mean token copies per expert, averaged over layers: 1.0 is even) over
the first and the last quarter of the steps, and the mean training loss over the last
quarter and the final eval loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(name, flags, args):
    log_dir = os.path.join(args.out, name)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", args.config,
           "--steps", str(args.steps), "--log_every", "1", "--progress", "lines",
           "--eval_every", str(args.steps), "--log_dir", log_dir, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode:
        sys.exit(f"{name}: train.py exited {proc.returncode}\n{proc.stderr[-2000:]}")
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    q = max(len(recs) // 4, 1)
    load = [r["expert_load_max_over_mean"] for r in recs]
    return {"name": name, "flags": " ".join(flags),
            "load_first": statistics.mean(load[:q]), "load_last": statistics.mean(load[-q:]),
            "loss_last": statistics.mean(r["loss"] for r in recs[-q:]),
            "eval_loss": next((r["eval_loss"] for r in reversed(recs) if "eval_loss" in r),
                              float("nan"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="cpu_demo")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rates", default="0.001,0.01")
    ap.add_argument("--extra", default="", help="flags added to every run")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    extra = args.extra.split()
    rows = [run("none", ["--aux_loss_coef", "0", *extra], args),
            run("aux_loss", extra, args)]
    rows += [run(f"bias_{r}", ["--aux_loss_coef", "0", "--router_bias_rate", r, *extra], args)
             for r in args.rates.split(",")]
    lines = [f"{args.config}, {args.steps} steps; load = per-layer max/mean copies per expert "
             "(1.0 even), averaged over layers and over the first / last quarter of steps",
             "", "| balancing | flags | load, first quarter | load, last quarter | "
             "train loss, last quarter | eval loss |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | `{r['flags']}` | {r['load_first']:.3f} | {r['load_last']:.3f}"
              f" | {r['loss_last']:.4f} | {r['eval_loss']:.4f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "balance.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
