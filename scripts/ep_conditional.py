"""What the dropless exchange's data-dependent switch costs on GPUs, and whether XLA can run it
inside a CUDA graph (no host round trip).

The ep experts function alone, forward and backward, in a scan of `--layers` remat'd layers
under shard_map over 'ep' (moe_1b's ep=2 shapes by default: 32768 tokens a rank, top-2,
32 experts, d_model 1024, F 1024, bf16), with routing skewed so that round 2 runs. Rows:
  dropless cf 1.25   the default exchange: a lax.switch per layer picks round 2's size
  one round cf 2.0   no switch (ep x the rows at ep=2: what the default avoids)
  dropping cf 1.25   no switch, copies past the buffer dropped (not a training choice)
  dropping cf 1.5    the same with room for moe_1b's usual skew
  no switch, branch k  the dropless code with its switch replaced by a call of branch k
Each row runs in a fresh process; the dropless and "no switch, branch 1" rows also under
each other XLA command-buffer setting in --cb_sets (none, or conditionals and collectives
captured too), so a setting that fails (e.g. "Failed to instantiate CUDA graph") fails
only its row.

    python3 scripts/ep_conditional.py --out $OUT                 # 2 GPUs
    python3 scripts/ep_conditional.py --out runs/epc --small     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROWS = {"dropless cf 1.25": dict(capacity_factor=1.25, dropless=True),
        # the same code with the rounds' switch replaced by a plain call of one branch
        # (1: round 2 at 1/8 of round 1's pair cap, 2: 1/2, 3: all): what the switch itself
        # costs. Not dropless in general (copies a too-small branch cannot take are dropped
        # and counted); compare with the dropless row where dropped is 0.
        "no switch, branch 1": dict(capacity_factor=1.25, dropless=True, branch=1),
        "no switch, branch 2": dict(capacity_factor=1.25, dropless=True, branch=2),
        "one round cf 2.0": dict(capacity_factor=2.0, dropless=True),
        "dropping cf 1.25": dict(capacity_factor=1.25, dropless=False),
        # one round that holds moe_1b's usual skew (~1.3): the common path of a design that
        # redoes only an overflowing step (docs/status.md)
        "dropping cf 1.5": dict(capacity_factor=1.5, dropless=False)}
# "" = XLA's default command buffers, "off" = none (every kernel launched by the host: a
# step that waits on the host more shows it more); others name the command types to
# capture (adding CONDITIONAL alone ran, 56.0 against 55.6 ms; adding CONDITIONAL, WHILE
# and COLLECTIVES made train.py fail to instantiate its CUDA graph: docs/benchmarks.md)
CB_SETS = ("", "off", "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,COLLECTIVES")
CB_ROWS = ("dropless cf 1.25", "no switch, branch 1")  # the rows run under the other sets


def one_row(args) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jmamba.parallel import switch_vjp
    from jmamba.parallel.ep import make_ep_experts_fn
    from jmamba.parallel.mesh import make_mesh

    if "branch" in ROWS[args.row]:  # (make_ep_experts_fn looks switch_vjp.switch up per call)
        k = ROWS[args.row]["branch"]
        switch_vjp.switch = lambda index, branches, *ops: branches[min(k, len(branches) - 1)](*ops)

    ep, T, E, K, D, F, L = args.ep, args.tokens, args.experts, 2, args.d_model, args.ffn, args.layers
    dtype = jnp.bfloat16
    fn = make_ep_experts_fn(E, ep, capacity_factor=ROWS[args.row]["capacity_factor"],
                            dropless=ROWS[args.row]["dropless"])
    mesh = make_mesh(1, ep)
    rng = np.random.default_rng(0)
    # skewed routing: expert popularity ~ 1/(1 + e/skew), so the first ep rank gets more
    # (--skew 4: busiest rank 1.47x the mean at ep=2, E=32; 12: ~1.3x, as moe_1b's router
    # after a fresh init on the recall data)
    p_E = 1.0 / (1.0 + np.arange(E) / args.skew)
    p_E /= p_E.sum()
    # K distinct experts per token drawn with p_E (Gumbel top-k)
    g = np.log(p_E) + rng.gumbel(size=(T * ep, E))
    experts = np.argsort(-g, axis=1)[:, :K].astype(np.int32)
    x = jnp.asarray(rng.standard_normal((T * ep, D)), dtype)
    wts = jnp.full((T * ep, K), 0.5, jnp.float32)
    w = [jnp.asarray(rng.standard_normal(s) * 0.02, dtype)
         for s in ((L, E, D, F), (L, E, D, F), (L, E, F, D))]

    def layers(x_TxD, experts_TxK, wts_TxK, wg, wu, wd):
        @functools.partial(jax.checkpoint, prevent_cse=False)
        def layer(h, ws):
            y, dropped = fn(h, wts_TxK, experts_TxK, *ws, dtype)
            return (h + y.astype(h.dtype)), dropped
        h, dropped = jax.lax.scan(layer, x_TxD, (wg, wu, wd))
        return jnp.sum(h.astype(jnp.float32) ** 2), jax.lax.psum(jnp.sum(dropped), "ep")

    def loss(x_TxD, experts_TxK, wts_TxK, wg, wu, wd):
        sm = jax.shard_map(layers, mesh=mesh,
                           in_specs=(P("ep"), P("ep"), P("ep"), P(None, "ep"), P(None, "ep"),
                                     P(None, "ep")), out_specs=(P(), P()), check_vma=False)
        total, dropped = sm(x_TxD, experts_TxK, wts_TxK, wg, wu, wd)
        return jnp.sum(total), dropped

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 5), has_aux=True))
    experts = jnp.asarray(experts)
    t0 = time.perf_counter()
    (val, dropped), grads = step(x, experts, wts, *w)
    jax.block_until_ready(grads)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        (val, dropped), grads = step(x, experts, wts, *w)
        jax.block_until_ready(grads)
        times.append(time.perf_counter() - t0)
    load = np.bincount(np.asarray(experts).reshape(-1) // (E // ep), minlength=ep)
    return {"ms": 1e3 * float(np.median(times)), "compile_s": round(compile_s, 1),
            "loss": float(val), "dropped": int(dropped),
            "grad_norm_x": float(jnp.linalg.norm(grads[0].astype(jnp.float32))),
            "ep_rank_load": round(float(load.max() / load.mean()), 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", action="store_true", help="CPU shapes (simulated devices)")
    ap.add_argument("--row", default="", help="(internal) run one row in this process")
    ap.add_argument("--cb_sets", default=";".join(CB_SETS))
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per rank")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--d_model", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skew", type=float, default=12.0)
    ap.add_argument("--timeout", type=int, default=120)
    args = ap.parse_args()
    if args.row:
        print("RESULT " + json.dumps(one_row(args)), flush=True)
        return
    if args.small:
        args.tokens, args.experts, args.d_model, args.ffn, args.layers, args.steps = (
            256, 8, 32, 16, 2, 2)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for cb in args.cb_sets.split(";"):
        for row in (ROWS if not cb else CB_ROWS):
            env = dict(os.environ)
            if args.small:
                env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
            if cb:
                env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
                                    + ("" if cb == "off" else cb)).strip()
            cmd = [sys.executable, __file__, "--out", args.out, "--row", row]
            for k in ("ep", "tokens", "experts", "d_model", "ffn", "layers", "steps", "skew"):
                cmd += [f"--{k}", str(getattr(args, k))]
            try:
                p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                   timeout=args.timeout)
                got = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                r = json.loads(got[-1][7:]) if got else {
                    "error": (p.stderr.strip().splitlines() or ["rc %d" % p.returncode])[-1][:200]}
            except subprocess.TimeoutExpired:
                r = {"error": f"timeout {args.timeout} s"}
            r.update(row=row, command_buffers=cb or "(XLA default)")
            results.append(r)
            print(json.dumps(r), flush=True)
    lines = ["| command buffers | row | ms (fwd+bwd) | compile s | dropped | loss | ep rank load |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['command_buffers']} | {r['row']} | "
                     + (f"{r['ms']:.1f} | {r['compile_s']} | {r['dropped']} | {r['loss']:.6g} | "
                        f"{r['ep_rank_load']} |" if "ms" in r else f"{r['error']} | | | | |"))
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "ep_conditional.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "ep_conditional.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
