"""One GPU, the moe_1b step (issue 17): jmamba through train.py against the PyTorch peer
(scripts/peer_moe_torch.py), side by side in one device call.

    python3 scripts/moe_step.py --out $OUT --mamba_src .peer           # batch 8 and 16
    python3 scripts/moe_step.py --out $OUT --mamba_src .peer --batches 8 \
        --variants "default;--remat full"                              # fewer rows
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 scripts/moe_step.py --out $OUT \
        --no_peer --batches 8 --profile                                # kernel time by kind
                                                                       # and by source line

Rows: the peer (no recomputation) at each batch, then train.py --config moe_1b at each batch
with the default flags and each variant's extra flags. MFU for every row uses
jmamba/flops.py's FLOPs per token for the moe_1b shape (the peer computes the same model),
against the device's datasheet peak. Each run is its own process, so the two frameworks
never share the GPU's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_layouts import emit_table, train_run  # noqa: E402
from hlo_sources import dump_env, read_sources  # noqa: E402
from trace_share import device_shares, find_trace  # noqa: E402


def peer_run(args, batch: int, work: str) -> dict:
    out = os.path.join(work, f"peer_b{batch}.json")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "peer_moe_torch.py"),
                           "--mamba_src", args.mamba_src, "--batch", str(batch),
                           "--steps", str(args.steps), "--out", out],
                          capture_output=True, text=True)
    if not os.path.exists(out):
        return {"error": f"rc={proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
    with open(out) as f:
        row = json.load(f)
    print(f"== peer batch {batch}: {row}", flush=True)
    return row


def print_profiles(profiles: dict, out: str, what: str = "kernel kind",
                   file: str = "moe_step_profile.md", top: int = 30) -> None:
    """Milliseconds per `what` over the two traced steps, one column per run (so variants
    compare side by side)."""
    names = list(profiles)
    kinds = sorted({k for p in profiles.values() for k in p},
                   key=lambda k: -max(p.get(k, 0.0) for p in profiles.values()))
    lines = [f"| {what} (2 steps) | " + " | ".join(names) + " |",
             "|" + "---|" * (len(names) + 1)]
    for k in kinds[:top]:
        lines.append(f"| {k} | " + " | ".join(f"{profiles[n].get(k, 0.0):.1f}"
                                               for n in names) + " |")
    lines.append("| total of these | " + " | ".join(
        f"{sum(profiles[n].get(k, 0.0) for k in kinds[:top]):.1f}" for n in names) + " |")
    text = "\n".join(lines)
    emit_table(text, out, file)


def print_sources(name: str, shares: dict, out: str) -> None:
    """Device ms of one profiled run by the function, then the line, that made each kernel
    (hlo_sources.py), by phase (forward, backward, recomputed forward)."""
    lines = [f"### {name}: device ms over 2 steps by function", "",
             "| phase, file, function | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in shares.get("functions_ms_per_device", [])]
    lines += ["", f"### {name}: device ms over 2 steps by what a fusion holds", "",
              "| phase, the functions of its fused ops (most first) | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in shares.get("fusions_ms_per_device", [])]
    lines += ["", f"### {name}: device ms over 2 steps by line", "",
              "| phase, file:line, function | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in shares.get("lines_ms_per_device", [])]
    run = "".join(c if c.isalnum() else "_" for c in name)
    emit_table("\n".join(lines), out, f"moe_step_sources_{run}.md")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mamba_src", default=".peer")
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--variants", default="default;--scan_layers true",
                    help="train.py flag sets separated by ; ('default' adds none)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--no_peer", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="trace steps 6-7 of every jmamba run and print device time per kind "
                    "of kernel (trace_share.group_key) and per source line (the run dumps "
                    "its optimized HLO: hlo_sources.py); run with XLA_FLAGS="
                    "--xla_gpu_enable_command_buffer= so kernels are not one command buffer")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="jmamba_moe_step_")

    import jax

    from jmamba.cli import load_preset
    from jmamba.flops import flops_per_token, peak_tflops
    cfg = load_preset("moe_1b")
    flops_tok = flops_per_token(cfg.model, cfg.train.seq_len)
    dev = jax.devices()[0]
    peak = peak_tflops(dev.device_kind, dev.platform)
    print(f"device {dev.device_kind}, moe_1b {flops_tok / 1e9:.2f} GFLOP/token, peak {peak}",
          flush=True)

    rows, profiles, by_function = [], {}, {}
    for b in [int(x) for x in args.batches.split(",")]:
        if not args.no_peer:
            rows.append({"run": "PyTorch peer (no remat)", "batch": b,
                         **peer_run(args, b, work)})
        for variant in args.variants.split(";"):
            extra = [] if variant.strip() == "default" else variant.split()
            flags = ["--config", "moe_1b", "--batch_size", str(b), "--steps", str(args.steps),
                     "--warmup_steps", "4", "--log_every", "1", "--progress", "lines",
                     "--eval_every", "0", *extra]
            name = f"jmamba b{b} {variant}"
            run_name = "".join(c if c.isalnum() else "_" for c in name)
            env, dump = None, os.path.join(work, run_name + "_hlo")
            if args.profile:
                flags += ["--profile_steps", "6:8"]
                env = dump_env(dump)
            r = train_run(run_name, flags, work, env=env)
            rows.append({"run": f"jmamba `{variant}`", "batch": b, **r})
            trace = find_trace(os.path.join(work, run_name)) if args.profile else None
            if trace and "step_ms" in r:
                shares = device_shares(trace, 2 * r["step_ms"] / 1e3, read_sources(dump))
                profiles[name] = dict(shares["groups_ms_per_device"])
                by_function[name] = dict(shares["functions_ms_per_device"])
                print_sources(name, shares, args.out)
        if profiles:
            print_profiles(profiles, args.out)
            print_profiles(by_function, args.out, "phase, file, function",
                           "moe_step_functions.md", top=40)
        with open(os.path.join(args.out, "moe_step.json"), "w") as f:
            json.dump(rows, f, indent=1)

    lines = ["| run | batch | step ms | tokens/s | MFU | peak GB | vs peer |", "|" + "---|" * 7]
    peer_tps = {r["batch"]: r.get("tokens_per_s") for r in rows if r["run"].startswith("Py")}
    for r in rows:
        tps = r.get("tokens_per_s")
        if not tps:
            err = r.get("error") or f"rc={r.get('rc')}: " + r.get("tail", "")[-200:]
            lines.append(f"| {r['run']} | {r['batch']} | {err.splitlines()[-1][:120]} "
                         "| - | - | - | - |")
            continue
        mfu = f"{100 * tps * flops_tok / (peak * 1e12):.1f}%" if peak else "-"
        vs = (f"{tps / peer_tps[r['batch']]:.2f}x" if peer_tps.get(r["batch"])
              and not r["run"].startswith("Py") else "-")
        lines.append(f"| {r['run']} | {r['batch']} | {r['step_ms']} | {tps} | {mfu} | "
                     f"{r.get('peak_gb', '-')} | {vs} |")
    text = "\n".join(lines)
    emit_table(text, args.out, "moe_step.md")


if __name__ == "__main__":
    main()
