"""Is the expert-parallel step repeatable? Trains a few steps, then evaluates one batch many
times with the same parameters and compares the answers.

    python scripts/ep_repeat.py --config moe_1b --ep 2 --train_steps 6 --repeats 20
    python scripts/ep_repeat.py --config moe_1b --ep 2 --flags="--ep_matmul xla"
    python scripts/ep_repeat.py --config cpu_demo --ep 2 --cpu_devices 2   # CPU smoke run
    python scripts/ep_repeat.py --config moe_1b --ep 2 --processes 2   # one GPU a process

Why: on GPUs, two train.py runs of moe_1b at ep=2 with the same flags logged step-7 losses
of 11.0956 and 11.0155 (one GPU: 11.0951), while their step-6 losses agreed to 1e-4. A
forward pass that answers differently on the same inputs would be a race, not rounding.

For each --ep value in turn (same seed, so the same fresh parameters and batches): the
train step runs --train_steps times, then the forward loss (the eval function, as train.py
validates) and the loss-and-gradient run --repeats times each on the next batch. It prints
each one's distinct losses, their spread, the largest gradient difference between repeats
(relative to the gradient's largest entry), and the drop counts. Exits 1 if any forward
repeat differs from the first by more than --tol relative.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import sys

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--config", default="moe_1b")
ARGS.add_argument("--ep", default="1,2", help="comma-separated ep values, run in turn")
ARGS.add_argument("--train_steps", type=int, default=6)
ARGS.add_argument("--repeats", type=int, default=20)
ARGS.add_argument("--tol", type=float, default=1e-3)
ARGS.add_argument("--cpu_devices", type=int, default=0, help="simulate this many CPU devices")
ARGS.add_argument("--on_xla", default="",
                  help="diagnosis: comma-separated products of the grouped matmul (fwd, dx, "
                       "dw) to run on lax.ragged_dot, the rest on the kernels (round 1 only "
                       "unless --ep_later_rounds_xla leaves later rounds on the kernels)")
ARGS.add_argument("--shadow", action="store_true",
                  help="diagnosis: beside each kernel product, compute lax.ragged_dot on the "
                       "same inputs inside the program and report how often they differ")
ARGS.add_argument("--json", default="", help="also write the rows to this file")
ARGS.add_argument("--grad_only", action="store_true",
                  help="skip the forward repeats (one compile less)")
ARGS.add_argument("--processes", type=int, default=1,
                  help="run as this many processes on one host, one GPU each (jax.distributed "
                       "on localhost); each reports its own shards. --cpu_devices then counts "
                       "each process's devices")
ARGS.add_argument("--round2", choices=("switch", "largest", "switch_largest"),
                  default="switch",
                  help="diagnosis: 'largest' runs the dropless exchange's second round at its "
                       "largest pair cap with no lax.switch around it; 'switch_largest' keeps "
                       "the switch but its index always picks that branch (same values as "
                       "'switch': any cap that holds the leftover moves the same rows, and "
                       "nothing left gives zeros)")
ARGS.add_argument("--flags", default="",
                  help='extra train.py flags as one string: --flags="--ep_dispatch ragged"; '
                       "round 2 as an MLP of its own on the kernels, as before the tenth session "
                       "(the reproducer): --flags=\"--ep_merge_rounds false "
                       "--ep_later_rounds_xla ''\"")
args = ARGS.parse_args()
if args.cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.cpu_devices}")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jmamba.cli import parse_config  # noqa: E402
from jmamba.driver import make_data, next_batch, to_device  # noqa: E402
from jmamba.parallel.setup import (build, pipeline_loss, process_rows, remat_choices,  # noqa: E402
                                   with_remat)
from jmamba import model  # noqa: E402


PRODUCTS = {"fwd": "_forward", "dx": "_grad_x", "dw": "_grad_w"}
# Per kernel call, from the device: (product, call site, checksum of the inputs, checksum
# of the kernel's output, max |kernel - lax.ragged_dot|, max |lax.ragged_dot|).
SHADOW: list = []
SHADOW_CALLS: list = []  # SHADOW's rows of each gradient call, kept for the comparison


REPLACED: list[int] = []  # --round2 largest: the switches traced without a switch


def checksum(x):
    """An exact, order-free fingerprint of an array's bits: sum of (bits * (i mod 65521 +
    1)) mod 2^32 over its elements, so equal fingerprints mean equal bits in practice."""
    import jax.numpy as jnp
    width = {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
    weights = (jnp.arange(bits.shape[0], dtype=jnp.uint32) % 65521) + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def patch_products(on_xla: list[str], shadow: bool) -> None:
    """Send some products of the kernel path through lax.ragged_dot (blocks=None), and/or
    shadow the others: the same product on lax.ragged_dot on the same inputs, compared
    inside the program, with fingerprints of the kernel's inputs and output."""
    import jax.numpy as jnp
    from jmamba.kernels import grouped_matmul as gm
    sites = iter(range(10**6))  # one id per traced call site (rounds, branches, recompute)
    for which, name in PRODUCTS.items():
        original = getattr(gm, name)
        if which in on_xla:
            setattr(gm, name, lambda a, b, sizes, blocks, f=original: f(a, b, sizes, None))
        elif shadow:
            def checked(a, b, sizes, blocks, f=original, which=which):
                out = f(a, b, sizes, blocks)
                if blocks is not None:
                    ref = f(a, b, sizes, None).astype(jnp.float32)
                    diff = jnp.max(jnp.abs(out.astype(jnp.float32) - ref))
                    site = next(sites)
                    fp_in = checksum(a) + 3 * checksum(b) + 7 * checksum(sizes)
                    jax.debug.callback(
                        lambda fi, fo, d, m, w=which, site=site: SHADOW.append(
                            (w, site, int(fi), int(fo), float(d), float(m))),
                        fp_in, checksum(out), diff, jnp.max(jnp.abs(ref)))
                return out
            setattr(gm, name, checked)


def shadow_summary() -> str:
    """This gradient call's kernel calls: how many differed from lax.ragged_dot on their own
    inputs; and, against the first gradient call, how many saw inputs the first call did
    not see (the difference comes from upstream) and how many saw the same inputs but gave
    another output (the kernel itself answers differently inside the program)."""
    rows = list(SHADOW)
    SHADOW.clear()
    SHADOW_CALLS.append(rows)
    parts = []
    for which in PRODUCTS:
        mine = [r for r in rows if r[0] == which]
        if not mine:
            continue
        worst = max(d / max(m, 1e-30) for *_, d, m in mine)
        text = (f"{which}: {sum(r[4] > 0 for r in mine)}/{len(mine)} differ from "
                f"ragged_dot (max {worst:.1e})")
        if len(SHADOW_CALLS) > 1:
            first = {}
            for r in SHADOW_CALLS[0]:
                first.setdefault((r[0], r[1], r[2]), set()).add(r[3])
            new_inputs = sum((r[0], r[1], r[2]) not in first for r in mine)
            other_out = sum((r[0], r[1], r[2]) in first and r[3] not in first[(r[0], r[1],
                                                                               r[2])]
                            for r in mine)
            text += (f", vs call 0: {new_inputs} with new inputs, {other_out} with the same "
                     "inputs but another output")
        parts.append(text)
    return "; ".join(parts) or "no kernel calls seen"


def grad_fn(cfg, run):
    """loss and canonical gradients of the training loss at this layout (jitted)."""
    remat = remat_choices(cfg)[0]  # what the train step compiles first
    if run.mesh is None:
        loss = functools.partial(model.loss_fn, cfg=cfg.model, remat=remat)
    else:
        loss = pipeline_loss(with_remat(cfg, remat), run.layout, run.mesh)

    def f(params, batch):
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
        return value, run.canonical(grads), metrics.get("dropped_tokens", 0)
    return jax.jit(f)


def local(tree):
    """This process's shards of each leaf (the whole leaf in one process), as numpy."""
    return jax.tree.map(lambda x: np.stack([np.asarray(s.data) for s in x.addressable_shards]),
                        tree)


def scalar(x) -> float:
    return float(np.asarray(x.addressable_shards[0].data))


def one_layout(ep: int) -> dict:
    argv = ["--config", args.config, "--ep", str(ep), *shlex.split(args.flags)]
    cfg = parse_config(argv)
    run = build(cfg)
    t = cfg.train
    rows = process_rows(run.batch_sharding, t.batch_size)
    data = make_data(cfg, rows)
    state = run.state
    for _ in range(args.train_steps):
        state, _ = run.step_fn(state, to_device(next_batch(data, t=t), run, rows, t.batch_size))
    batch = to_device(next_batch(data, t=t), run, rows, t.batch_size)
    fwd = [scalar(run.eval_fn(state.params, batch)[0])
           for _ in range(0 if args.grad_only else args.repeats)] or [float("nan")]
    g = grad_fn(cfg, run)
    first_grads, worst, bwd, dropped, per_leaf = None, 0.0, [], set(), {}
    shadows, digests, same_as = [], [], []
    for _ in range(max(args.repeats // 4, 2)):
        value, grads, drop = g(state.params, batch)
        grads = local(grads)
        if args.shadow:
            jax.effects_barrier()
            shadows.append(shadow_summary())
        bwd.append(scalar(value))
        dropped.add(int(scalar(drop)))
        # Which earlier call gave bitwise the same gradients: [0, 1, 1, ...] means only
        # the first call differed (stale memory read once), [0, 0, 2, 0, ...] a race. The
        # embedding's gradient is left out: its scatter-add differs by ~1e-8 every call.
        digest = hashlib.sha1(b"".join(
            np.ascontiguousarray(x).tobytes()
            for path, x in jax.tree_util.tree_leaves_with_path(grads)
            if "embed" not in jax.tree_util.keystr(path))).hexdigest()
        same_as.append(digests.index(digest) if digest in digests else len(digests))
        digests.append(digest)
        this = 0.0  # this call's largest difference from the first
        if first_grads is None:
            first_grads = grads
            scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(grads))
        else:
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads),
                                    jax.tree.leaves(first_grads)):
                d = float(np.max(np.abs(a - b)))
                this = max(this, d)
                name = jax.tree_util.keystr(path)
                rel = d / max(float(np.max(np.abs(b))), 1e-30)
                per_leaf[name] = max(per_leaf.get(name, 0.0), rel)
            worst = max(worst, this)
        # One line a call as it happens, so a run cut off by a time limit still tells.
        print(f"process {jax.process_index()} grad call {len(bwd) - 1}: loss {bwd[-1]!r}, "
              f"same as call {same_as[-1]}, max diff from call 0 / largest entry "
              f"{this / max(scale, 1e-30):.1e}"
              + (f"; {shadows[-1]}" if args.shadow else ""), flush=True)
    top = sorted(per_leaf.items(), key=lambda kv: -kv[1])[:4]
    return {"ep": ep, "fwd": fwd, "bwd": bwd, "grad_rel": worst / max(scale, 1e-30),
            "dropped": sorted(dropped), "top": top, "shadow": shadows,
            "same_as": same_as}


def spawn(n: int) -> int:
    """Runs this script as n processes of one GPU each (jmamba/launch.py's environment);
    prints each one's report."""
    import subprocess
    from jmamba.launch import child_envs
    argv, skip = [], False
    for a in sys.argv[1:]:  # all but --processes N / --processes=N
        if not skip and not a.startswith("--processes"):
            argv.append(a)
        skip = a == "--processes"
    # The children write to this process's stdout as they go (their lines name their
    # process), so a run cut off by a time limit still shows how far each got.
    # They die with this process (a `timeout` that kills it leaves no child on the GPUs),
    # and the first to fail stops the others (else they wait in a collective), as train.py's.
    from jmamba.launch import die_with_parent, wait_all
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], env=env,
                              preexec_fn=die_with_parent)
             for env in child_envs(n, 1)]
    rc = wait_all(procs, forwarded=[])
    print(f"== processes: rc {[p.returncode for p in procs]}", flush=True)
    return rc


def main():
    if args.processes > 1:
        sys.exit(spawn(args.processes))
    from jmamba.config import DistConfig
    from jmamba.distributed import initialize
    initialize(DistConfig())  # JMAMBA_* from spawn(); nothing in one process
    bad = False
    on_xla = [w for w in args.on_xla.split(",") if w]
    if set(on_xla) - set(PRODUCTS):
        sys.exit(f"--on_xla takes {','.join(PRODUCTS)}, got {args.on_xla!r}")
    if on_xla or args.shadow:
        patch_products(on_xla, args.shadow)
    if args.round2 != "switch":
        switch = jax.lax.switch

        def largest(index, branches, *operands):
            REPLACED.append(len(branches))
            if args.round2 == "largest":
                return branches[-1](*operands)
            # still a conditional: an index known only at run time, always the last branch
            return switch(jax.numpy.maximum(index, len(branches) - 1), branches, *operands)
        jax.lax.switch = largest
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, config {args.config}, "
          f"{args.train_steps} train steps, {args.repeats} repeats, extra {args.flags!r}, "
          f"on xla: {args.on_xla or 'none'}, shadow: {args.shadow}, round 2: {args.round2}, "
          f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}")
    print("| ep | forward: distinct losses | forward spread (rel) | loss+grad: distinct "
          "| grad max diff between repeats (rel) | dropped |")
    print("|---|---|---|---|---|---|")
    rows = []
    for ep in map(int, args.ep.split(",")):
        r = one_layout(ep)
        rows.append(r)
        spread = (max(r["fwd"]) - min(r["fwd"])) / abs(r["fwd"][0])
        bad |= bool(spread > args.tol)
        print(f"| {ep} | {sorted(set(round(x, 5) for x in r['fwd']))} | {spread:.1e} | "
              f"{sorted(set(round(x, 5) for x in r['bwd']))} | {r['grad_rel']:.1e} | "
              f"{r['dropped']} |", flush=True)
        print("    leaves that vary most (max diff / leaf's max): "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["top"]), flush=True)
        print(f"    gradient calls, each as the first earlier call bitwise equal to it: "
              f"{r['same_as']}", flush=True)
        if args.round2 != "switch":
            print(f"    round-2 switches traced so far as their largest branch ({args.round2}): "
                  f"{len(REPLACED)}", flush=True)
        for i, line in enumerate(r["shadow"]):
            print(f"    grad call {i}, kernels against lax.ragged_dot in the program: {line}",
                  flush=True)
    if args.json:
        pid = os.environ.get("JMAMBA_PROCESS_ID")
        with open(args.json if pid is None else f"{args.json}.{pid}", "w") as f:
            json.dump(rows, f)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
