"""Bandwidth of the collectives the pipeline and EP use, on the GPUs of one machine.

Per size: lax.ppermute over a ring of all devices (the pipeline's stage transfer),
lax.all_to_all of the same bytes per device (the expert exchange), and psum. Each op runs 10
times inside one jitted fori_loop (no host sync between), median of 5 calls; GB/s is the
bytes each device sends to others per second.

    python3 scripts/bench_p2p.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--sizes_mb", default="16,64,256")
    args = ap.parse_args()
    n = jax.device_count()
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("x",), axis_types=(AxisType.Auto,))
    ring = [(j, (j + 1) % n) for j in range(n)]
    ops = {
        "ppermute": lambda a: lax.ppermute(a, "x", ring),
        "all_to_all": lambda a: lax.all_to_all(a.reshape((n, -1)), "x", 0, 0).reshape(a.shape),
        "psum": lambda a: lax.psum(a, "x"),
    }
    rows = []
    for mb in (int(s) for s in args.sizes_mb.split(",")):
        elems = mb * 2**20 // 2 // n * n
        x = jax.device_put(jnp.ones((n * elems,), jnp.bfloat16),
                           jax.sharding.NamedSharding(mesh, P("x")))
        for name, op in ops.items():
            def body(_, a, op=op):
                return op(a) * 0.5 + a * 0.5  # keeps every iteration's result live

            fn = jax.jit(jax.shard_map(lambda a, body=body: lax.fori_loop(0, 10, body, a),
                                       mesh=mesh, in_specs=P("x"), out_specs=P("x")))
            fn(x).block_until_ready()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn(x).block_until_ready()
                times.append((time.perf_counter() - t0) / 10)
            t = float(np.median(times))
            # Bytes each device sends elsewhere: all of it for ppermute, (n-1)/n for
            # all_to_all, ~2(n-1)/n for a ring all-reduce.
            sent = {"ppermute": 1.0, "all_to_all": (n - 1) / n, "psum": 2 * (n - 1) / n}[name]
            rows.append({"op": name, "MB_per_device": mb, "ms": round(1e3 * t, 3),
                         "GB_per_s": round(sent * mb * 2**20 / t / 1e9, 1)})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"devices: {n} x {jax.devices()[0].device_kind}", "",
             "| op | MB per device | ms | GB/s sent per device |", "|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['MB_per_device']} | {r['ms']} | {r['GB_per_s']} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "p2p.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
