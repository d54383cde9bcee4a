"""Is a non-repeatable step a per-process matter? Runs scripts/ep_repeat.py in several fresh
processes per XLA_FLAGS variant, each dumping XLA's autotuning choices, and tells which
choices the non-repeatable processes share that the repeatable ones do not.

    python3 scripts/repeat_processes.py --out $OUT --n 4 \\
        --variant= --variant=--xla_gpu_exclude_nondeterministic_ops=true \\
        -- --config moe_1b --ep 2 --train_steps 2 --repeats 8 --grad_only

Why: at ep=2 on GPUs the gradients of one process came out different call to call in about
half the processes (docs/benchmarks.md, "Seventh session"), and two processes' autotuning
dumps differed in 13 of 362 entries. Prints a table (variant, process, gradient difference
between calls, seconds), then for each variant with both kinds of process the autotuned
fusions/GEMMs whose choice is the same in every bad process and different in every good one.
Files: $OUT/<variant>_<i>.autotune.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = 1e-6  # gradient difference between calls (relative) that counts as non-repeatable


def parse_autotune(path: str) -> dict[str, str]:
    """{hlo fingerprint: the chosen config, whitespace-normalised} of an XLA text dump."""
    if not os.path.exists(path):
        return {}
    out = {}
    for entry in open(path).read().split("entries {")[1:]:
        fp = re.search(r'hlo_fingerprint: "(\w+)"', entry)
        if fp and "value {" in entry:
            out[fp.group(1)] = " ".join(entry.split("value {", 1)[1].split())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=4, help="processes per variant")
    ap.add_argument("--variant", action="append", default=None,
                    help="extra XLA_FLAGS for a variant (repeatable; default: one, none)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per process")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then ep_repeat.py's flags")
    a = ap.parse_args()
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    os.makedirs(a.out, exist_ok=True)
    variants = a.variant or [""]
    print("| variant | process | grad diff between calls (rel) | loss | seconds |")
    print("|---|---|---|---|---|")
    results = {}
    for v_i, flags in enumerate(variants):
        for i in range(a.n):
            stem = os.path.join(a.out, f"v{v_i}_{i}")
            env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_gpu_dump_autotune_results_to="
                       f"{stem}.autotune.txt".strip())
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(
                    [sys.executable, os.path.join(ROOT, "scripts", "ep_repeat.py"), *rest,
                     "--json", stem + ".json"], env=env, capture_output=True, text=True,
                    timeout=a.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            secs = time.perf_counter() - t0
            row = json.load(open(stem + ".json"))[0] if os.path.exists(stem + ".json") else None
            grad = row["grad_rel"] if row else float("nan")
            results[(v_i, i)] = (grad, parse_autotune(stem + ".autotune.txt"))
            loss = row["bwd"][0] if row else "-"
            print(f"| {flags or '(none)'} | {i} | {grad:.1e} | {loss} | {secs:.0f} "
                  f"{'' if rc == 0 else f'(rc {rc})'} |", flush=True)
    for v_i, flags in enumerate(variants):
        bad = [results[(v_i, i)][1] for i in range(a.n) if results[(v_i, i)][0] > BAD]
        good = [results[(v_i, i)][1] for i in range(a.n) if results[(v_i, i)][0] <= BAD]
        print(f"\nvariant {flags or '(none)'}: {len(bad)} of {a.n} processes non-repeatable")
        if not bad or not good:
            continue
        keys = set.intersection(*(set(d) for d in bad + good))
        shared = [k for k in sorted(keys)
                  if len({d[k] for d in bad}) == 1 and all(d[k] != bad[0][k] for d in good)]
        print(f"autotuned choices shared by every bad process and no good one: {len(shared)}")
        for k in shared:
            print(f"  {k}: bad {bad[0][k][:160]}\n  {' ' * len(k)}  good {good[0][k][:160]}")


if __name__ == "__main__":
    main()
