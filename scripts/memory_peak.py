"""What is live at the compiled train step's memory peak: compile (not run) the moe_1b step
with XLA's dumps on, print XLA's memory analysis and the largest values live at the peak
(from the buffer assignment's live-range report) with their HLO op and source op name.

    python3 scripts/memory_peak.py --out $OUT --n_layer 32 --pp 2 --microbatches 8 --rows 16
    python3 scripts/memory_peak.py --out runs/peak --n_layer 16 --rows 16   # one device
    python3 scripts/memory_peak.py --out runs/peak --rows 8 --remat none    # no remat

--rows is the microbatch's rows (batch = rows x microbatches). Parameters and optimizer
state are abstract (jax.eval_shape), so only the compile runs. On the CPU it needs
XLA_FLAGS=--xla_force_host_platform_device_count=<pp*ep> (set here when on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_values(dump_dir: str, n: int):
    """[(MiB, value, HLO op, source op name)] of the n largest values live at the peak."""
    lr = glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations-live-range.txt"))
    hlo = [f for f in glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations.txt"))]
    if not lr or not hlo:
        return []
    text = open(lr[0]).read()
    if "(peak):" not in text:
        return []
    peak = text.split("(peak):")[1].split("Stack trace")[0]
    vals = re.findall(r"^\s+(\S+?)(\{[^}]*\}): (\d+) bytes", peak, re.M)
    insts = {}
    for line in open(hlo[0]):
        m = re.match(r"^\s+(?:ROOT )?%(\S+) = (.*)$", line)
        if m:
            insts[m.group(1)] = m.group(2)
    rows = []
    for name, idx, b in sorted(vals, key=lambda v: -int(v[2]))[:n]:
        rest = insts.get(name, "")
        opc = re.search(r"\} (\w[\w-]*)\(", rest) or re.search(r"\) (\w[\w-]*)\(", rest)
        op = re.search(r'op_name="([^"]*)"', rest)
        rows.append((int(b) / 2**20, name + idx, rest.split(" ")[0][:48],
                     opc.group(1) if opc else "", op.group(1)[-100:] if op else ""))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="moe_1b")
    ap.add_argument("--n_layer", type=int, default=16)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--remat", default=None, help="override the preset's --remat")
    args = ap.parse_args()
    dump = os.path.abspath(os.path.join(args.out, "xla_dump"))
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_dump_to={dump} --xla_dump_hlo_as_text"
    from jmamba.cli import simulate_cpu_devices
    if not os.path.exists("/dev/nvidia0"):  # before jax picks its backend
        simulate_cpu_devices(args.pp * args.ep)
    import jax
    from jmamba.cli import load_preset
    from jmamba.config import validate
    from jmamba.data import recall_batch
    from jmamba.metrics import compiled_memory
    from jmamba.parallel.setup import build

    base = load_preset(args.preset)
    B = args.rows * args.microbatches
    cfg = validate(dataclasses.replace(
        base, model=dataclasses.replace(base.model, n_layer=args.n_layer),
        train=dataclasses.replace(base.train, batch_size=B, warmup_steps=0),
        parallel=dataclasses.replace(base.parallel, pp=args.pp, ep=args.ep,
                                     microbatches=args.microbatches,
                                     remat=args.remat or base.parallel.remat)))
    t = cfg.train
    batch = recall_batch(0, 0, B, t.seq_len, cfg.model.vocab_size, t.n_pairs)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    box = {}

    def make_state():
        box["run"] = build(cfg)
        return box["run"].state

    state = jax.eval_shape(make_state)
    compiled = box["run"].step_fn.lower(state, batch).compile()
    mem = {k: round(v / 2**30, 3) for k, v in compiled_memory(compiled).items()}
    print(json.dumps({"devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                      **vars(args), **{k + "_gb": v for k, v in mem.items()}}))
    print("\n| MiB | value | shape | HLO op | source op |\n|---|---|---|---|---|")
    for mib, name, shape, opc, op in peak_values(dump, args.top):
        print(f"| {mib:.0f} | {name} | {shape} | {opc} | {op} |")


if __name__ == "__main__":
    main()
