"""What a checkpoint's re-layout costs per device, by layout: compile (not run) the save's
stage -> canonical step and the resume's canonical -> stage step of jmamba/checkpoint.py at
a given (pp, ep, split, schedule), and print XLA's per-device memory for each against the
state's per-device share. A re-layout that XLA lowers by replicating whole arrays shows as
temporaries of many times the share (issue 18: no device may hold another's share).

    python3 scripts/relayout_memory.py                     # every layout kind, 4 CPU devices
    python3 scripts/relayout_memory.py --layouts "2:2::1;2:2:1,7:1"
    python3 scripts/relayout_memory.py --preset bamba9b_moe --layouts "4:2::1"

A layout is "pp:ep:pp_split:virtual" (pp_split as the flag takes it). Compile only: it runs
in seconds on the CPU. Resumes re-lay leaf by leaf (checkpoint.relay_leaves), and so do the
saves of non-contiguous layouts: their column is the largest temporary of one leaf's
program; the saves of contiguous layouts compile one program for the whole state.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYOUTS = "2:2::1;2:2:3,5:1;2:2:0-1,2-7:1;2:2::2"  # even, uneven, hand-made, circular


def largest_device_bytes(tree) -> int:
    """Bytes of an abstract, sharded tree on its fullest device."""
    import collections

    import jax
    per = collections.Counter()
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        n = x.dtype.itemsize
        for d in x.sharding.device_set:
            per[d] += n * int(__import__("math").prod(shard))
    return max(per.values())


def by_leaf_temp(run, saved) -> dict:
    """The largest temporaries of the per-leaf re-layout programs, each way."""
    import jax

    from jmamba.parallel.layout import canonical_leaf, stage_leaf
    layout, out = run.layout, {"save": 0, "resume": 0}
    stage_sh = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, run.state.params["layers"]))
    stage_abs = jax.tree.leaves(run.state.params["layers"])
    canon = jax.tree.leaves(saved["params"]["layers"])
    for st, sh, ca in zip(stage_abs, stage_sh, canon):
        for k, fn, arg, osh in (("save", canonical_leaf, st, ca.sharding),
                                ("resume", stage_leaf, ca, sh)):
            c = jax.jit(lambda x, fn=fn: fn(x, layout), out_shardings=osh).lower(arg).compile()
            out[k] = max(out[k], c.memory_analysis().temp_size_in_bytes)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default=LAYOUTS, help="pp:ep:pp_split:virtual;...")
    ap.add_argument("--n_layer", type=int, default=8)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--preset", default="", help="a preset at its own shape (e.g. "
                    "bamba9b_moe with --layouts 4:2::1) instead of the small cpu_demo model")
    args = ap.parse_args()
    from jmamba.cli import simulate_cpu_devices
    simulate_cpu_devices(8)
    import jax

    from jmamba import checkpoint as ck
    from jmamba.cli import load_preset
    from jmamba.config import validate
    from jmamba.parallel.setup import build

    print("| pp,ep,split,virtual | contiguous | state share GB | run's state GB per device "
          "(largest) | save temp GB (x share) | resume temp GB (x share) |")
    print("|---|---|---|---|---|---|")
    for spec in args.layouts.split(";"):
        pp, ep, split, virtual = spec.split(":")
        base = load_preset(args.preset or "cpu_demo")
        m = base.model if args.preset else dataclasses.replace(
            base.model, n_layer=args.n_layer, d_model=args.d_model, d_expert=2 * args.d_model,
            n_experts=8)
        circular = int(virtual) > 1
        p = dataclasses.replace(base.parallel, pp=int(pp), ep=int(ep), pp_split=split,
                                pp_virtual=int(virtual) if circular else 2,
                                microbatches=2 * int(pp) * int(virtual),
                                pp_schedule="circular" if circular else "1f1b")
        cfg = validate(base.replace(model=m, parallel=p))
        run = build(cfg, abstract=True)
        with tempfile.TemporaryDirectory() as d:
            saver = ck.Checkpoints(dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, ckpt_dir=d)), run)
            n = run.mesh.size
            share = sum(x.size * x.dtype.itemsize
                        for x in jax.tree.leaves(ck.saved_shapes(cfg))) / n
            # Resumes re-lay leaf by leaf (checkpoint.relay_leaves): the largest leaf's
            # program. Saves too for non-contiguous layouts, else one whole-state program.
            temp = by_leaf_temp(run, saver.saved_abstract())
            if run.layout.contiguous:
                temp["save"] = saver._to_saved.lower(run.state).compile().memory_analysis(
                    ).temp_size_in_bytes
            saver.manager.close()
        gb = lambda b: b / 1e9
        row = [spec, str(run.layout.contiguous), f"{gb(share):.3f}",
               f"{gb(largest_device_bytes(run.state)):.3f}"]
        for k in ("save", "resume"):
            t = temp[k]
            row.append(f"{gb(t):.3f} ({t / share:.2f}x)")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
