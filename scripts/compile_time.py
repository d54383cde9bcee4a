"""Where the time to the first step goes: tracing + lowering and XLA's compile of the train
step, by layer stack (scanned or unrolled), remat and layout, for a preset (issue 17: the
unrolled moe_1b step took 150-240 s to its first step on one H100, 25 s scanned, and at
ep=2 no step finished in ~400 s).

    python3 scripts/compile_time.py --out $OUT                          # moe_1b, 1 GPU
    python3 scripts/compile_time.py --out $OUT --layouts 1x1,1x2        # and ep=2
    python3 scripts/compile_time.py --out $OUT --xla_flags=--xla_gpu_autotune_level=0
    python3 scripts/compile_time.py --out runs/compile_time --preset cpu_demo  # CPU smoke test
    python3 scripts/compile_time.py --out runs/xlower --cross_lower  # on a CPU host: trace
        # and lower for CUDA as a Hopper GPU would (kernels, cuDNN), no XLA compile: the
        # JAX side of the time, and how many custom calls the module holds

Each row is its own process (no cache shared between rows; JAX's persistent cache off), so
the times are what a fresh `python train.py` pays. Prints a table and writes
compile_time.json / compile_time.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_layouts import emit_table  # noqa: E402

CHILD = r"""
import json, os, sys, time, types
t0 = time.perf_counter()
import jax, jax.numpy as jnp
cross = os.environ.get("JMAMBA_CROSS_LOWER") == "1"
if cross:  # diagnosis only: every GPU path (Hopper kernels, cuDNN, Pallas Triton) is traced
    jax.default_backend = lambda: "gpu"
    from jax._src.pallas.triton import gpu_info as gi
    import jax._src.pallas.triton.pallas_call_registration as reg
    reg.gpu_info_lib.get_gpu_info = lambda: gi.get_gpu_info_from_version(gi.GpuVersion.H100)
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    for mod in (ragged_dot_mgpu, transposed_ragged_dot_mgpu):  # they ask the device its SMs
        fake = types.SimpleNamespace(**{n: getattr(jax, n) for n in dir(jax)
                                        if not n.startswith("__")})
        fake.devices = lambda *a: [types.SimpleNamespace(core_count=132)]
        mod.jax = fake
    from jmamba.kernels import grouped_matmul as gm
    gm._on_hopper = lambda: True
from jmamba.cli import parse_config
from jmamba.driver import make_data, to_device
from jmamba.parallel.setup import build, process_rows
preset, pp, ep, scan, remat = sys.argv[1:6]
cfg = parse_config(["--config", preset, "--scan_layers", str(scan == "scan"), "--pp", pp,
                    "--ep", ep, "--microbatches", "1" if pp == "1" else str(2 * int(pp)),
                    "--remat", remat, *sys.argv[6:]])
run = build(cfg, abstract=True)
rows = process_rows(run.batch_sharding, cfg.train.batch_size)
batch = to_device(next(make_data(cfg, rows)), run, rows, cfg.train.batch_size)
t1 = time.perf_counter()
if cross:
    lowered = run.step_fn.trace(run.state, batch).lower(lowering_platforms=("cuda",))
else:
    lowered = run.step_fn.lower(run.state, batch)
t2 = time.perf_counter()
if not cross:
    compiled = lowered.compile()
t3 = time.perf_counter()
text = lowered.as_text()
print(json.dumps({"setup_s": round(t1 - t0, 1), "lower_s": round(t2 - t1, 1),
                  "compile_s": "-" if cross else round(t3 - t2, 1),
                  "custom_calls": text.count("stablehlo.custom_call"),
                  "triton_calls": text.count("custom_call @__gpu$xla.gpu.triton"),
                  "mosaic_calls": text.count("custom_call @mosaic_gpu"),
                  "funcs": text.count("func.func")}))
"""


def jax_cpu_devices_needed(layouts: str) -> int:
    return max(int(pp) * int(ep) for pp, ep in (x.split("x") for x in layouts.split(",")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="moe_1b")
    ap.add_argument("--layouts", default="1x1", help="PPxEP,...")
    ap.add_argument("--variants", default="scan:full,unrolled:none",
                    help="layer stack:remat pairs (scan or unrolled)")
    ap.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS for every row")
    ap.add_argument("--flags", default="",
                    help="more train.py flags for every row, e.g. \"--ep_overflow redo\"")
    ap.add_argument("--row_timeout", type=float, default=None,
                    help="seconds one row may take; a row past it is recorded as a timeout")
    ap.add_argument("--cross_lower", action="store_true",
                    help="lower for CUDA from any host (no compile): the JAX side only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_ENABLE_COMPILATION_CACHE="false")
    if args.cross_lower:
        env["JMAMBA_CROSS_LOWER"] = "1"
        if jax_cpu_devices_needed(args.layouts) > 1 and "device_count" not in env.get(
                "XLA_FLAGS", ""):  # the layout's mesh, simulated by the host
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device"
                                f"_count={jax_cpu_devices_needed(args.layouts)}").strip()
    if args.xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    rows = []
    for layout in args.layouts.split(","):
        pp, ep = layout.split("x")
        for variant in args.variants.split(","):
            scan, remat = variant.split(":")
            row = {"layout": layout, "layers": scan, "remat": remat}
            try:
                proc = subprocess.run([sys.executable, "-c", CHILD, args.preset, pp, ep,
                                       scan, remat, *shlex.split(args.flags)], env=env,
                                      capture_output=True, text=True,
                                      timeout=args.row_timeout)
            except subprocess.TimeoutExpired:
                row.update(rc="timeout", error=f"over {args.row_timeout:.0f} s")
                proc = None
            if proc is not None:
                row["rc"] = proc.returncode
                try:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                except (IndexError, ValueError):
                    row["error"] = (proc.stdout + proc.stderr)[-600:]
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(os.path.join(args.out, "compile_time.json"), "w") as f:
                json.dump(rows, f, indent=1)
    lines = ["| pp x ep | layers | remat | setup s | trace+lower s | compile s | custom calls "
             "| of them Triton | of them Mosaic | funcs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        last = r.get("compile_s", r.get("error", "-")[-80:])
        cols = ("setup_s", "lower_s")
        lines.append(f"| {r['layout']} | {r['layers']} | {r['remat']} | "
                     + " | ".join(str(r.get(c, "-")) for c in cols) + f" | {last} | "
                     + " | ".join(str(r.get(c, "-")) for c in (
                         "custom_calls", "triton_calls", "mosaic_calls", "funcs")) + " |")
    emit_table("\n".join(lines), args.out, "compile_time.md")


if __name__ == "__main__":
    main()
