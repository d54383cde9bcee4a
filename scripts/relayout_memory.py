"""What a checkpoint's re-layout costs per device, by layout: compile (not run) the save's
stage -> canonical step and the resume's canonical -> stage step of jmamba/checkpoint.py at
a given (pp, ep, split, schedule), and print XLA's per-device memory for each against the
state's per-device share. A re-layout that XLA lowers by replicating whole arrays shows as
temporaries of many times the share (issue 18: no device may hold another's share).

    python3 scripts/relayout_memory.py                     # every layout kind, 4 CPU devices
    python3 scripts/relayout_memory.py --layouts "2:2::1;2:2:1,7:1"
    python3 scripts/relayout_memory.py --preset bamba9b_moe --layouts "4:2::1"

A layout is "pp:ep:pp_split:virtual" (pp_split as the flag takes it). Compile only: it runs
in seconds on the CPU. Resumes re-lay leaf by leaf (checkpoint.relay_leaves) and saves make
each canonical leaf and move it to host memory before the next: each column is the most
one leaf's program adds on a device (for a save, its temporaries plus the leaf itself).
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


def by_leaf_temp(run, saver) -> dict:
    """Each way, the largest per-device bytes a per-leaf program adds to the state: a
    resume's re-layout temporaries (its output replaces the freed source); a save's
    temporaries plus its output, counted as if on the device (it lands in host memory; on
    the CPU the two are one, so this is the bound: the leaf before its copy to the host)."""
    import jax

    from jmamba.parallel.layout import stage_leaf
    layout, out = run.layout, {"save": 0, "resume": 0}
    stage_sh = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, run.state.params["layers"]))
    stage_abs = jax.tree.leaves(run.state.params["layers"])
    canon = jax.tree.leaves(saver.saved_abstract()["params"]["layers"])
    programs = saver.save_programs
    for st, sh, ca, save_fn in zip(stage_abs, stage_sh, canon, programs["layers"]):
        m = save_fn.lower(st).compile().memory_analysis()
        out["save"] = max(out["save"], m.temp_size_in_bytes + m.output_size_in_bytes)
        c = jax.jit(lambda x: stage_leaf(x, layout), out_shardings=sh).lower(ca).compile()
        out["resume"] = max(out["resume"], c.memory_analysis().temp_size_in_bytes)
    m = programs["io"].lower(run.state.params["io"]).compile().memory_analysis()
    out["save"] = max(out["save"], m.temp_size_in_bytes + m.output_size_in_bytes)
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
          "(largest) | save extra GB (x share) | resume temp GB (x share) |")
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
            # Saves and resumes go leaf by leaf: the largest leaf's program each way.
            temp = by_leaf_temp(run, saver)
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
