"""Whole training step of a plain Mamba2 LM through train.py: ssm_impl=kernel (Pallas SSD)
against chunked (XLA), on the shapes of the mamba_ssm reference in ../shared/FACTS.md
(MambaLMHeadModel, d_model 1024, 24 layers, vocab 50288, batch 8 x 2048, bf16):
162.6 ms/step without MLP and 200.2 ms/step with a 2048 gated MLP on one H200.

    python3 scripts/bench_model_step.py --out $OUT            # one GPU
    python3 scripts/bench_model_step.py --out runs/x --small  # CPU smoke test

Each variant is a `python train.py` subprocess; the table reads its metrics.jsonl (median
step time after the first 3 steps, peak memory of the device, loss of the first steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_flags(small: bool, mlp: str) -> list[str]:
    if small:
        return ["--d_model", "32", "--n_layer", "2", "--headdim", "8", "--d_state", "8",
                "--chunk_size", "16", "--vocab_size", "64", "--batch_size", "2",
                "--seq_len", "64", "--mlp", mlp, "--d_intermediate", "64"]
    return ["--d_model", "1024", "--n_layer", "24", "--headdim", "64", "--d_state", "128",
            "--chunk_size", "256", "--vocab_size", "50277", "--pad_vocab_size_multiple", "16",
            "--batch_size", "8", "--seq_len", "2048", "--dtype", "bfloat16", "--mlp", mlp,
            "--d_intermediate", "2048"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--variants", default="none:chunked,none:kernel,dense:chunked,dense:kernel",
                    help="mlp:ssm_impl pairs")
    ap.add_argument("--extra", default="", help="more train.py flags for every variant, "
                    "e.g. '--remat full'")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for variant in args.variants.split(","):
        mlp, impl = variant.split(":")
        log_dir = os.path.join("/tmp", f"jmamba_step_{os.getpid()}_{mlp}_{impl}")
        flags = ["--config", "cpu_demo", *model_flags(args.small, mlp), "--ssm_impl", impl,
                 "--steps", str(args.steps), "--warmup_steps", "2", "--log_every", "1",
                 "--progress", "lines", "--log_dir", log_dir, *args.extra.split()]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags],
                              env=env, capture_output=True, text=True)
        row = {"mlp": mlp, "ssm_impl": impl, "rc": proc.returncode,
               "wall_s": round(time.perf_counter() - t0, 1)}
        path = os.path.join(log_dir, "metrics.jsonl")
        recs = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
        if proc.returncode or not recs:
            row["tail"] = (proc.stdout + proc.stderr)[-2000:]
            print(row["tail"], flush=True)
        else:
            head = proc.stdout.split("\n")[0]
            step_s = statistics.median(r["step_time_s"] for r in recs[3:])
            row.update({"params": head.split(" params")[0].split()[-1],
                        "step_ms": round(1e3 * step_s, 1),
                        # tokens per step = tokens_per_s x step_time_s of any record
                        "tokens_per_s": round(recs[-1]["tokens_per_s"]
                                              * recs[-1]["step_time_s"] / step_s),
                        "mfu": round(statistics.median(r.get("mfu", 0) for r in recs[3:]), 3),
                        "peak_gb": round(max(r.get("device_peak_memory_gb", 0) for r in recs),
                                         2),
                        "loss_1_3": [round(r["loss"], 4) for r in recs[:3]]})
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "model_step.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| MLP | ssm_impl | params | step ms | tokens/s | MFU | peak GB | loss steps 1-3 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_ms" in r:
            print(f"| {r['mlp']} | {r['ssm_impl']} | {r['params']} | {r['step_ms']} | "
                  f"{r['tokens_per_s']} | {r['mfu']} | {r['peak_gb']} | {r['loss_1_3']} |")
        else:
            print(f"| {r['mlp']} | {r['ssm_impl']} | failed rc={r['rc']} | | | | | |")


if __name__ == "__main__":
    main()
