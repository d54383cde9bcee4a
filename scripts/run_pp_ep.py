"""PP x EP end to end through train.py: throughput per layout, loss agreement with one
device, pipeline bubble, expert all-to-all share, and checkpoint re-layout.

Every run is a `python train.py` subprocess (the users' own entry point, fresh device memory
counters each time) with one log directory under --work; this script reads each run's
metrics.jsonl and profiler trace and prints one table. Runs (names are pp x ep):

  1x1         one GPU, no microbatches: the reference losses and the 1-GPU throughput
  2x1, 1x2    two GPUs: pipeline only (M microbatches) and expert parallel only
  1x2_m       pp=1, ep=2 with the same M as 2x2: the bubble's baseline,
              bubble = 1 - (t(1x2_m) / 2) / t(2x2)
  2x2_dense   (2,2) with the padded dense exchange, profiled (all-to-all share)
  2x2_ragged  the same with ragged_all_to_all (only with --only)
  2x2         (2,2), --long steps, profiled, checkpoint at the last step
  restore_*   the 2x2 checkpoint restored at (2,2), (4,1), (1,4): one more step each; the
              next-step losses must agree

Every expert-parallel run uses ep_capacity_factor = ep, which can never drop a token, so all
layouts compute the same function as one device (differences are bf16 rounding only).

    python scripts/run_pp_ep.py --out $OUT                    # 4 GPUs, every run
    python scripts/run_pp_ep.py --out $OUT --phase short      # the throughput runs only
    python scripts/run_pp_ep.py --out runs/x --small          # CPU smoke test (tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from trace_share import device_shares, find_trace  # noqa: E402


def plan(args):
    """name -> (pp, ep, microbatches, extra flags, steps)."""
    M, S, L = args.microbatches, args.steps, args.long
    prof = f"{S - 4}:{S - 1}"
    long_prof = f"{max(2, L - 20)}:{max(5, L - 17)}"
    resume = ["--resume", str(L)]  # fails loudly if the 2x2 run left no checkpoint
    runs = {
        "1x1": (1, 1, 1, [], S),
        "2x1": (2, 1, M, [], S),
        "1x2": (1, 2, 1, [], S),
        "1x2_m": (1, 2, M, [], S),
        "2x2_dense": (2, 2, M, ["--ep_dispatch", "dense", "--profile_steps", prof], S),
        "2x2_ragged": (2, 2, M, ["--ep_dispatch", "ragged", "--profile_steps", prof], S),
        "2x2": (2, 2, M, ["--profile_steps", long_prof, "--ckpt_every", str(L)], L),
        "restore_2x2": (2, 2, M, resume, L + 1),
        "restore_4x1": (4, 1, M, resume, L + 1),
        "restore_1x4": (1, 4, 1, resume, L + 1),
    }
    phases = {"short": ["1x1", "2x1", "1x2", "1x2_m", "2x2_dense"],
              "long": ["2x2", "restore_2x2", "restore_4x1", "restore_1x4"]}
    names = phases["short"] + phases["long"] if args.phase == "all" else phases[args.phase]
    if args.only:
        names = args.only.split(",")
    return {n: runs[n] for n in names}


def common_flags(args):
    if args.small:
        return ["--config", "cpu_demo", "--n_layer", "4", "--n_experts", "4", "--d_model",
                "32", "--headdim", "8", "--d_state", "8", "--chunk_size", "16",
                "--batch_size", "8", "--seq_len", "64", "--warmup_steps", "5",
                "--log_every", "1", "--progress", "lines"]
    return ["--config", args.preset, "--batch_size", str(args.batch_size), "--seq_len",
            str(args.seq_len), "--remat", "full", "--warmup_steps", str(args.warmup),
            "--log_every", "1", "--progress", "lines"]


def read_records(log_dir):
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(name, spec, records, cfg_flops, tokens, skip, window, wall_s, rc, tail):
    pp, ep, M, extra, steps = spec
    out = {"name": name, "pp": pp, "ep": ep, "microbatches": M, "gpus": pp * ep,
           "rc": rc, "wall_s": round(wall_s, 1), "steps_logged": len(records)}
    if rc != 0 or not records:
        out["tail"] = tail
        return out
    bad = set(range(window[0], window[1] + 1)) if window else set()
    rated = [r for r in records if "step_time_s" in r]  # the first steps carry no rate
    timed = [r["step_time_s"] for r in rated
             if r["step"] > records[0]["step"] + skip and r["step"] not in bad]
    step_s = statistics.median(timed) if timed else rated[-1]["step_time_s"]
    flops_token, peak = cfg_flops
    tps = tokens / step_s
    out.update({
        "first_step_s": (round(records[0]["step_time_s"], 1)  # compile + restore + step
                         if "step_time_s" in records[0] else None),  # (not timed since 11-26)
        "step_ms": round(1e3 * step_s, 1), "tokens_per_s": round(tps),
        "tokens_per_s_per_gpu": round(tps / (pp * ep)),
        "mfu": round(tps * flops_token / (peak * 1e12 * pp * ep), 4) if peak else None,
        "device_peak_memory_gb": round(max(r.get("device_peak_memory_gb", 0.0)
                                           for r in records), 2),
        "dropped_tokens": sum(r.get("dropped_tokens", 0) for r in records),
        "losses": {str(r["step"]): r["loss"] for r in records},
        "grad_norm_max": max(r.get("grad_norm", 0.0) for r in records),
    })
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="summary.json and table.md go here")
    ap.add_argument("--work", default="", help="log and checkpoint dirs (default: a temp dir)")
    ap.add_argument("--phase", default="all", choices=("all", "short", "long"))
    ap.add_argument("--only", default="", help="comma-separated run names")
    ap.add_argument("--preset", default="moe_1b")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30, help="steps of each short run")
    ap.add_argument("--long", type=int, default=200, help="steps of the 2x2 run")
    ap.add_argument("--small", action="store_true", help="tiny model on simulated CPUs")
    args = ap.parse_args()
    if args.small:
        args.steps, args.long, args.microbatches = min(args.steps, 8), min(args.long, 12), 4
    args.warmup = min(args.warmup, args.steps)  # train.py requires warmup_steps <= steps
    os.makedirs(args.out, exist_ok=True)
    work = args.work or os.path.join("/tmp", f"jmamba_pp_ep_{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, "ckpt")

    from jmamba import flops
    from jmamba.cli import parse_config
    base = parse_config(common_flags(args))
    tokens = base.train.batch_size * base.train.seq_len
    summary_path = os.path.join(args.out, "summary.json")
    results = {}
    if os.path.exists(summary_path):  # a second phase adds to the first's results
        with open(summary_path) as f:
            results = json.load(f)

    for name, spec in plan(args).items():
        pp, ep, M, extra, steps = spec
        log_dir = os.path.join(work, name)
        shutil.rmtree(log_dir, ignore_errors=True)
        flags = common_flags(args) + ["--pp", str(pp), "--ep", str(ep), "--microbatches",
                                      str(M), "--steps", str(steps), "--log_dir", log_dir]
        if ep > 1:
            flags += ["--ep_capacity_factor", str(float(ep))]
        if name == "2x2" or name.startswith("restore"):
            flags += ["--ckpt_dir", ckpt, "--keep", "2"]
        if name == "2x2":
            shutil.rmtree(ckpt, ignore_errors=True)
        flags += extra
        env = dict(os.environ)
        if not args.small and "CUDA_VISIBLE_DEVICES" not in env:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(pp * ep))
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        print(f"== {name}: train.py {' '.join(flags)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(tail[-1500:] if proc.returncode else tail[-400:], flush=True)
        window = None
        if "--profile_steps" in extra:
            a, b = extra[extra.index("--profile_steps") + 1].split(":")
            window = (int(a), int(b))
        cfg_flops = (flops.flops_per_token(base.model, base.train.seq_len),
                     None if args.small else 989.0)
        row = summarize(name, spec, read_records(log_dir), cfg_flops, tokens,
                        skip=3, window=window, wall_s=wall, rc=proc.returncode, tail=tail)
        if window and row.get("step_ms"):
            trace = find_trace(log_dir)
            if trace:
                n = window[1] - window[0]
                row["trace"] = device_shares(trace, n * row["step_ms"] / 1e3)
                if os.path.getsize(trace) < 15 * 2**20:  # small enough to bring back
                    shutil.copy(trace, os.path.join(args.out, f"trace_{name}.json.gz"))
        if name.startswith("restore"):
            shutil.rmtree(os.path.join(ckpt, str(steps)), ignore_errors=True)
        results[name] = row
        with open(summary_path, "w") as f:
            json.dump(results, f, indent=1)
    report(results, args.out, upto=min(20, base.train.warmup_steps))


def loss_diff(a, b, upto):
    steps = [s for s in a if s in b and int(s) <= upto]
    if not steps:
        return None
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


def report(results, out_dir, upto):
    """The table; losses are compared over the first `upto` steps, which lie inside the
    warm-up and so have the same learning rate whatever a run's length."""
    ref = results.get("1x1", {}).get("losses", {})
    lines = ["| run | pp x ep | M | step ms | tokens/s | tokens/s/GPU | MFU | peak GB/GPU | "
             f"first step s | max rel loss diff vs 1x1 (steps 1-{upto}) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "step_ms" not in r:
            lines.append(f"| {name} | {r['pp']}x{r['ep']} | failed rc={r['rc']} | | | | | | | |")
            continue
        diff = loss_diff(r["losses"], ref, upto) if ref and not name.startswith("restore") else None
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") else "-"
        if r["steps_logged"] == 1:  # a restore: one step, compile included; no rate
            lines.append(f"| {name} | {r['pp']}x{r['ep']} | {r['microbatches']} | - | - | - | - | "
                         f"{r['device_peak_memory_gb']} | {r['first_step_s']} | - |")
            continue
        lines.append(f"| {name} | {r['pp']}x{r['ep']} | {r['microbatches']} | {r['step_ms']} | "
                     f"{r['tokens_per_s']} | {r['tokens_per_s_per_gpu']} | {mfu} | "
                     f"{r['device_peak_memory_gb']} | {r['first_step_s']} | "
                     f"{'-' if diff is None else f'{diff:.2e}'} |")
    if "2x2" in results and "1x2_m" in results and "step_ms" in results["2x2"]:
        a, b = results["1x2_m"], results["2x2"]
        M = b["microbatches"]
        lines.append(f"\nbubble at (2,2), M={M}: measured "
                     f"{1 - (a['step_ms'] / 2) / b['step_ms']:.3f}, theory (p-1)/(M+p-1) = "
                     f"{1 / (M + 1):.3f}")
    for name in ("2x2", "2x2_dense"):
        if "trace" in results.get(name, {}):
            lines.append(f"device time shares in {name}: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in
                                     results[name]["trace"]["share"].items()))
    if "2x2" in results and "losses" in results["2x2"]:
        ls = results["2x2"]["losses"]
        keys = sorted(ls, key=int)
        lines.append("2x2 loss at steps " + ", ".join(
            f"{k}: {ls[k]:.4f}" for k in keys[::max(1, len(keys) // 8)] + [keys[-1]])
            + f"; max grad norm {results['2x2']['grad_norm_max']:.3f}")
    nxt = {n: r["losses"].get(str(max(map(int, r["losses"])))) for n, r in results.items()
           if n.startswith("restore") and r.get("losses")}
    if nxt:
        lines.append("next-step loss after restore: "
                     + ", ".join(f"{n} {v:.5f}" for n, v in nxt.items()))
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
