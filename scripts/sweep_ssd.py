"""Tunes the Pallas SSD kernel's launches one at a time at the shape of record, on a GPU.

Run from the repo root: PYTHONPATH=. python3 scripts/sweep_ssd.py [outer pass stages whole]
(the sections to run; all by default).
Prints, per pallas_call, the time of each setting (median of sync'd calls, and of calls
dispatched 20 at a time, which hides the host round trip), then whole forward and
forward+backward times for candidate defaults. Results go in docs/benchmarks.md.
"""

import itertools
import sys

import jax
import jax.numpy as jnp

from jmamba.kernels import ssd_pallas as S
from scripts.bench_ssd import fns, timeit, timeit_batched
from scripts.check_ssd_gpu import make_inputs

SHAPE, Q = (4, 4096, 32, 64, 1, 128), 256


def both_times(f, args):
    try:
        return f"{timeit(f, args):.3f} / {timeit_batched(f, args):.3f}"
    except Exception as e:  # noqa: BLE001  (a setting that does not compile)
        return f"failed: {type(e).__name__}: {str(e)[:120]}"


def cfg(bt=64, bp=16, **kw):
    """ssd_pallas's launch settings with some changed (bt, bp: block_t and the state pass's
    head-dim block)."""
    return S.launch_cfg(Q, SHAPE[3], interpret=False, block_t=bt, **kw)._replace(bp=bp)


def main():
    print(jax.devices()[0].device_kind, "(ms: sync'd / batched)", flush=True)
    x, dt, A, Bm, Cm, D, dt_bias = make_inputs(*SHAPE, with_state=False)[:7]
    Bsz, L, H, P, G, N = SHAPE
    dt3 = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias).transpose(0, 2, 1)
    a = dt3 * A[:, None]
    acs = S._chunk_cumsum(a, Q)
    init = jnp.zeros((Bsz, H, P, N), jnp.float32)

    sections = sys.argv[1:] or ["outer", "pass", "stages", "whole"]
    print("chunk states (chunk_outer):" if "outer" in sections else "", flush=True)
    outer = itertools.product((64, 128), (2, 4), ("bf16",)) if "outer" in sections else ()
    for bk, nw, fine in outer:
        c = cfg(bk=bk, num_warps=nw)
        f = jax.jit(lambda u, v, w, c=c, fine=fine: S._chunk_outer(
            u, v, w, c, S._fine(u.dtype, c._replace(fine=fine))))
        print(f"  bk={bk} warps={nw} fine={fine}: {both_times(f, (x, Bm, dt3))}", flush=True)

    s_c = S._chunk_outer(x, Bm, dt3, cfg(), jnp.bfloat16)
    e = jnp.exp(acs.reshape(Bsz, H, L // Q, Q)[..., -1])
    print("state pass:" if "pass" in sections else "", flush=True)
    for bp, nw in itertools.product((8, 16, 32), (1, 4)) if "pass" in sections else ():
        c = cfg(bp=bp, num_warps=nw)
        f = jax.jit(lambda s, e, i, c=c: S._state_pass(s, e, i, c, False))
        print(f"  bp={bp} warps={nw}: {both_times(f, (s_c, e, init))}", flush=True)

    print("forward launches, one at a time (block_t 64, 4 warps, fine bf16):", flush=True)
    for stages in (1, 2, 3, 4) if "stages" in sections else ():
        c = cfg(bt=64, num_warps=4, fine="bf16", num_stages=stages)
        states = S._state_pass(S._chunk_outer(x, Bm, dt3, c, jnp.bfloat16), e, init, c, False)
        parts = {
            "chunk states": (lambda u, v, w: S._chunk_outer(u, v, w, c, jnp.bfloat16),
                             (x, Bm, dt3)),
            "state pass": (lambda s, e, i: S._state_pass(s, e, i, c, False), (s_c, e, init)),
            "chunk scan": (lambda *a: S._chunk_scan(*a, c), (x, dt3, acs, Bm, Cm, states, D)),
            "core forward": (lambda *a: S._forward(*a, c),
                             (x, dt3, a, Bm, Cm, D, init)),
        }
        for name, (f, a_) in parts.items():
            print(f"  stages={stages} {name}: {both_times(jax.jit(f), a_)}", flush=True)

    print("whole forward / forward+backward (ssd_pallas):", flush=True)
    args = (x, dt, A, Bm, Cm, D, dt_bias)
    grid = [(64, 4, 2), (64, 4, 3), (128, 8, 2), (64, 4, 2)]  # the first again: run drift
    for bt, nw, stages in grid if "whole" in sections else ():
        kw = dict(block_t=bt, num_warps=nw, fine="bf16", rect="bf16", num_stages=stages)
        fwd, both = fns("kernel", Q, **kw)
        print(f"  {kw}: fwd {both_times(fwd, args)}  fwd+bwd {both_times(both, args)}",
              flush=True)
    if "whole" not in sections:
        return
    fwd, both = fns("chunked", Q)
    print(f"  XLA ssd_chunked: fwd {both_times(fwd, args)}  fwd+bwd {both_times(both, args)}",
          flush=True)


if __name__ == "__main__":
    main()
