"""Weak scaling of pipeline and expert parallelism through train.py, default flags.

Against one GPU running the moe_1b preset (16 layers, 16 experts) at batch B with the
default flags (unrolled layers, no remat where it fits), and against the same GPU with the
layer scan and full remat ("1 GPU, scan + full remat"), which is what the multi-GPU
layouts' stages run (1F1B recomputes every layer; ep > 1 scans):
  pp=2   twice the layers (32) in M microbatches of B rows (each GPU runs 16 layers on B
         rows, as the one GPU does): per-GPU work is tokens/s x layers / GPUs over the same
         for one GPU; 1 - that against the scanned row is the measured bubble (transfers
         included), against (p-1)/(M+p-1) in theory.
  pp=2, same batch: 32 layers at batch B in M microbatches of B/M rows (the memory
         comparison: two GPUs hold twice the layers at the same batch).
  pp=2, half microbatches: the weak-scaling batch in 2M microbatches of B/2 rows (with
         --also "--pp_stash residuals": stages without recompute, 2p - 2 microbatches of
         activations held).
  ep=2   twice the experts (32), twice the batch: per-GPU work is tokens/s / GPUs over
         one GPU's, i.e. t(1 GPU) / t(ep=2) at equal per-GPU batch and experts per GPU.
  (2,2)  where four GPUs are visible: twice the layers and experts, twice the batch.
  (2,4), (4,2)  where eight are: pp x the layers, ep x the experts and the batch.
Each row also gives the fullest GPU's peak memory (memory_stats) and XLA's per-device
estimate of the compiled step (memory.json), and dropped copies (0 when dropless).

    python3 scripts/scaling.py --out $OUT                    # batch 16, M 8
    python3 scripts/scaling.py --out $OUT --batch 8 --microbatches 4
    python3 scripts/scaling.py --out $OUT --only "ep=2, 2x experts, 2x batch" \
        --flags "--ep_capacity_factor 2"                   # an A/B against the defaults
    python3 scripts/scaling.py --out $OUT --random_tokens  # near-even routing
    python3 scripts/scaling.py --out $OUT --only "1 GPU;ep=2, 2x experts, 2x batch" \
        --also "--remat full_with_comm"                    # both in one table
    python3 scripts/scaling.py --out $OUT --only "1 GPU;ep=2, 2x experts, 2x batch" \
        --also "--ep_merge_rounds false" --also "--ep_capacity_factor 1.5"  # three ways
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_layouts import emit_table, gpu_count, train_run  # noqa: E402
from hlo_sources import dump_env, read_sources  # noqa: E402
from trace_share import device_shares, find_trace  # noqa: E402


# One GPU with the layer scan and full remat, what every multi-GPU layout's stages run by
# default (1F1B recomputes each layer; ep > 1 scans): a second baseline that separates
# the layout's own cost from the one-GPU default's unrolled, no-remat step.
SCANNED = "1 GPU, scan + full remat"
ROW_FLAGS = {SCANNED: ["--scan_layers", "true", "--remat", "full"]}


def runs(args, n_gpus):
    """name -> (gpus, layers, experts, batch, pp, ep, M)."""
    B, M = args.batch, args.microbatches
    out = {"1 GPU": (1, 16, 16, B, 1, 1, 1),
           SCANNED: (1, 16, 16, B, 1, 1, 1),
           "pp=2, 2x layers": (2, 32, 16, B * M, 2, 1, M),
           "pp=2, 2x layers, same batch": (2, 32, 16, B, 2, 1, M),
           # the same tokens a step in microbatches of B/2 rows: what --pp_stash residuals
           # needs to hold 2p - 2 microbatches of activations
           "pp=2, 2x layers, half microbatches": (2, 32, 16, B * M, 2, 1, 2 * M),
           "ep=2, 2x experts, 2x batch": (2, 16, 32, 2 * B, 1, 2, 1)}
    if n_gpus >= 4:
        out["(2,2), 2x layers, 2x experts, 2x batch"] = (4, 32, 32, 2 * B * M, 2, 2, M)
    if n_gpus >= 8:
        out["(2,4), 2x layers, 4x experts, 4x batch"] = (8, 32, 64, 4 * B * M, 2, 4, M)
        out["(4,2), 4x layers, 2x experts, 2x batch"] = (8, 64, 32, 2 * B * M, 4, 2, M)
    return out


def random_token_file(work: str, n_tokens: int = 1 << 24, vocab: int = 50277) -> str:
    """A token file (jmamba/tokens.py format) of uniform random ids below moe_1b's vocab."""
    import numpy as np
    stem = os.path.join(work, "random_tokens")
    np.random.default_rng(0).integers(0, vocab, n_tokens, dtype=np.uint32).tofile(stem + ".bin")
    with open(stem + ".json", "w") as f:
        json.dump({"dtype": "uint32", "vocab_size": vocab, "n_tokens": n_tokens}, f)
    return stem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", default="", help="row names separated by ;")
    ap.add_argument("--profile", default="", help="rows to trace (steps 6-7), separated by ;")
    ap.add_argument("--random_tokens", action="store_true",
                    help="train on uniform random token ids instead of the embedded recall "
                    "task: near-even routing, which isolates EP's own cost from the router's "
                    "skew on the recall data")
    ap.add_argument("--flags", default="", help="more train.py flags for every row (A/B runs; "
                    "the table of record uses none)")
    ap.add_argument("--also", action="append", default=[],
                    help="train.py flags for another run of every selected multi-GPU row, in "
                    "the same table (an A/B against the defaults with the same 1 GPU "
                    "baseline); repeat it for more variants")
    ap.add_argument("--row_timeout", type=float, default=None,
                    help="seconds a row may take, compile included (killed after: rc "
                    "timeout, with XLA's estimate if it compiled); keep a device call's "
                    "other rows when one compiles for minutes")
    ap.add_argument("--also_only", action="store_true",
                    help="run the multi-GPU rows only with the --also flags (the one-GPU "
                    "rows still run): when the defaults' rows were measured before")
    args = ap.parse_args()
    if args.also_only and not args.also:
        ap.error("--also_only runs the --also variants of the multi-GPU rows: give --also")
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="jmamba_scaling_")  # train.py log dirs
    n = gpu_count()
    extra = args.flags.split()
    if args.random_tokens:
        extra += ["--data", random_token_file(work)]
    rows = {}
    # (name, shape, extra flags, whether an --also variant)
    todo = [(name, shape, ROW_FLAGS.get(name, []), False)
            for name, shape in runs(args, n).items()
            if not args.only or name in args.only.split(";")]
    todo += [(f"{name}, `{also}`", shape, shlex.split(also), True)
             for also in args.also for name, shape, _, _ in list(todo) if shape[0] > 1]
    if args.also_only:  # one-GPU rows and the variants; not the defaults' multi-GPU rows
        todo = [row for row in todo if row[1][0] == 1 or row[3]]
    for name, (gpus, layers, experts, B, pp, ep, M), more, _ in todo:
        flags = ["--config", "moe_1b", "--n_layer", str(layers), "--n_experts", str(experts),
                 "--batch_size", str(B), "--pp", str(pp), "--ep", str(ep), "--microbatches",
                 str(M), "--steps", str(args.steps), "--warmup_steps", "4", "--log_every", "1",
                 "--progress", "lines", *extra, *more]
        profiled = name in args.profile.split(";")
        run_name = "".join(c if c.isalnum() or c in "=_" else "_" for c in name)
        env, dump = None, os.path.join(work, run_name + "_hlo")
        if profiled:  # a trace of steps 6-7 and the HLO dump that names its kernels' lines
            flags += ["--profile_steps", "6:8"]
            env = dump_env(dump)
        rows[name] = {**train_run(run_name, flags, work, args.row_timeout, env=env),
                      "gpus": gpus, "layers": layers, "experts": experts, "batch": B, "M": M}
        trace = find_trace(os.path.join(work, run_name)) if profiled else None
        if trace and "step_ms" in rows[name]:
            shares = device_shares(trace, 2 * rows[name]["step_ms"] / 1e3, read_sources(dump))
            rows[name]["trace"] = shares
            print(json.dumps(shares, indent=1), flush=True)
        with open(os.path.join(args.out, "scaling.json"), "w") as f:
            json.dump(rows, f, indent=1)
    def efficiency(r, base):
        """Token-layers per second per GPU (top-k keeps a token's expert work the same
        whatever the expert count), over one GPU's."""
        if "step_ms" not in r or "step_ms" not in base:
            return "-"
        work_rate = r["tokens_per_s"] * r["layers"] / r["gpus"]
        return f"{work_rate / (base['tokens_per_s'] * base['layers']):.2f}"

    base, scanned = rows.get("1 GPU", {}), rows.get(SCANNED, {})
    lines = ["| run | GPUs | layers | experts | batch | M | step ms | tokens/s | per-GPU work vs "
             "1 GPU | vs 1 GPU scan + full remat | peak GB per GPU | XLA estimate GB | dropped "
             "| expert load max/mean | ep rank load max/mean | --ep_overflow redo |",
             "|" + "---|" * 16]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['gpus']} | {r['layers']} | {r['experts']} | {r['batch']} | "
                     f"{r['M']} | {r.get('step_ms', 'rc=%s' % r['rc'])} | "
                     f"{r.get('tokens_per_s', '-')} | {efficiency(r, base)} | "
                     f"{efficiency(r, scanned)} | {r.get('peak_gb', '-')} | "
                     f"{r.get('xla_total_gb', '-')} | {r.get('dropped', '-')} | "
                     f"{r.get('expert_load', '-')} | {r.get('ep_load', '-')} |"
                     + (f" redone {r['redone']} steps (mean {r['mean_step_ms']} ms) |"
                        if "redone" in r else " |"))
    text = "\n".join(lines)
    emit_table(text, args.out, "scaling.md")


if __name__ == "__main__":
    main()
