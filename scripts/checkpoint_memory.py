"""Peak process memory of a save and of a resume, over a fresh run, at (pp, ep) on CPU.

Three `python train.py` runs of the same small-batch model at the given layout (simulated
CPU devices), each measured by its peak resident set (getrusage of the child):
  fresh    --steps S, no checkpoints
  save     --steps S with --ckpt_every S (one save, at the end)
  resume   --steps S + 1 from that checkpoint (restore, then one step)
The extra peak of a save and of a resume over the fresh run, in multiples of the state's
size (parameters + AdamW moments, from the checkpoint's metadata), is what issue 18 bounds
(<= 1.2x each).

    python3 scripts/checkpoint_memory.py --out runs/ckpt_mem
    python3 scripts/checkpoint_memory.py --out runs/ckpt_mem --pp 2 --ep 2 --d_model 768
    python3 scripts/checkpoint_memory.py --out runs/ckpt_mem --pp_split 3,5   # uneven
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_gb(flags: list[str]) -> float:
    """Runs train.py with `flags` in a child and returns the child's peak RSS in GB (the
    child is waited for by a grandparent-free wrapper, so ru_maxrss is its own)."""
    wrapper = ("import resource, subprocess, sys; "
               "p = subprocess.run(sys.argv[1:]); "
               "print('RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable,
                           os.path.join(ROOT, "train.py"), *flags],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"train.py {' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
    kb = int(proc.stdout.split("RSS_KB")[-1].split()[0])
    return kb / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--d_model", type=int, default=512)
    ap.add_argument("--n_layer", type=int, default=8)
    ap.add_argument("--n_experts", type=int, default=8)
    ap.add_argument("--d_expert", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pp_split", default="", help="e.g. 3,5: an uneven (non-contiguous) "
                    "layout, re-laid leaf by leaf")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="jmamba_ckpt_mem_")
    common = ["--config", "cpu_demo", "--d_model", str(args.d_model), "--n_layer",
              str(args.n_layer), "--n_experts", str(args.n_experts), "--d_expert",
              str(args.d_expert), "--vocab_size", "50277", "--batch_size", "4", "--seq_len",
              "128", "--pp", str(args.pp), "--ep", str(args.ep), "--microbatches", "2",
              "--warmup_steps", "1", "--log_every", "1", "--progress", "lines",
              "--eval_every", "0", *(["--pp_split", args.pp_split] if args.pp_split else [])]
    S = args.steps
    ckpt = os.path.join(work, "ckpt")
    fresh = peak_rss_gb(common + ["--steps", str(S), "--log_dir", os.path.join(work, "a")])
    save = peak_rss_gb(common + ["--steps", str(S), "--ckpt_dir", ckpt, "--ckpt_every",
                                 str(S), "--log_dir", os.path.join(work, "b")])
    resume = peak_rss_gb(common + ["--steps", str(S + 1), "--ckpt_dir", ckpt,
                                   "--log_dir", os.path.join(work, "c")])
    meta = json.load(open(os.path.join(ckpt, str(S), "meta", "metadata")))
    itemsize = {"float32": 4, "bfloat16": 2, "int32": 4}
    state_gb = sum(itemsize[v["dtype"]] * max(1, __import__("math").prod(v["shape"]))
                   for v in meta["leaves"].values()) / 2**30
    rows = {"layout": f"({args.pp},{args.ep})" + (f" split {args.pp_split}"
                                                  if args.pp_split else ""), "state_gb": round(state_gb, 3),
            "fresh_gb": round(fresh, 2), "save_gb": round(save, 2),
            "resume_gb": round(resume, 2),
            "save_extra_x_state": round((save - fresh) / state_gb, 2),
            "resume_extra_x_state": round((resume - fresh) / state_gb, 2)}
    print(json.dumps(rows))
    text = ("| layout | state GB | fresh run GB | with one save GB | resume GB | save extra "
            "(x state) | resume extra (x state) |\n|---|---|---|---|---|---|---|\n"
            f"| {rows['layout']} | {rows['state_gb']} | {rows['fresh_gb']} | {rows['save_gb']} "
            f"| {rows['resume_gb']} | {rows['save_extra_x_state']} | "
            f"{rows['resume_extra_x_state']} |")
    print(text)
    with open(os.path.join(args.out, "checkpoint_memory.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
