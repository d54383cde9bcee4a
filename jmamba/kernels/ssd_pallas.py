"""The chunked SSD as Pallas kernels (Triton lowering on GPU, interpret mode on CPU).

Same signature and semantics as `jmamba.ssd.ssd_chunked`, which is its twin. The four steps
of the Mamba-2 chunked algorithm (paper, section 6) map to pallas_calls:
  0. dt = softplus(dt + dt_bias), a = dt * A and its within-chunk cumsum: plain XLA (tiny).
  2. chunk states                       -> chunk_outer_kernel       grid (B, C, H)
  3. state passing across chunks        -> state_pass_kernel        grid (B, H, P/bp)
  1+4. intra-chunk and state outputs    -> chunk_scan_fwd_kernel    grid (B, C, H, Q/bt)
The backward (a jax.custom_vjp) runs the same shapes in reverse: the adjoint of step 4
(chunk_outer on dy and C), the reverse state pass, then one kernel for the gradients each
input block owns (dx, ddt, dB) and one for those each output block owns (dC, decay terms).
The gradient of each step's log decay a is assembled from sums that do not cancel (see
_decay_grad); those through softplus, a = dt A and padding are left to JAX autodiff.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jmamba.kernels import ssd_pallas_kernels as bodies
from jmamba.kernels.launch import typed_call
from jmamba.kernels.vma import cotangent_like
from jmamba.ssd import kernel_fits, starts

f32 = jnp.float32


class _Cfg(NamedTuple):
    """Static launch settings (hashable, for custom_vjp's nondiff argument)."""
    chunk: int
    bt: int  # output rows per program in the chunk-scan kernels
    bp: int  # head-dim rows per program in the state pass
    interpret: bool
    num_warps: int
    fine: str  # matmul precision of the state paths for bf16 inputs: bf16, tf32, tf32x3
    rect: str = "tf32"  # the decay gradient's one matmul for bf16 inputs: tf32 or bf16
    bk: int = 64  # input rows per loop step in the chunk-states kernel
    num_stages: int = 2  # Triton software-pipelining depth of the kernels' loops


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg, **kw):
    """Returns fn(*args) running the kernel with cfg's launch settings (launch.typed_call)."""
    return typed_call(kernel, grid, in_specs, out_specs, out_shape, interpret=cfg.interpret,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, **kw)


class _Specs:
    """BlockSpecs of one (batch, chunk, head) program; grid indices are (b, c, h, ...)."""

    def __init__(self, Q, P, N, H, R):
        self.rows_P = pl.BlockSpec((None, Q, None, P), lambda b, c, h, *_: (b, c, h, 0))
        self.rows_N = pl.BlockSpec((None, Q, None, N), lambda b, c, h, *_: (b, c, h, 0))
        self.group_N = pl.BlockSpec((None, Q, None, N), lambda b, c, h, *_: (b, c, h // R, 0))
        self.chunk = pl.BlockSpec((None, None, Q), lambda b, c, h, *_: (b, h, c))
        self.state = pl.BlockSpec((None, None, None, P, N), lambda b, c, h, *_: (b, c, h, 0, 0))
        self.state_end = pl.BlockSpec((None, None, None, P, N),
                                      lambda b, c, h, *_: (b, c + 1, h, 0, 0))
        self.heads = pl.BlockSpec((H,), lambda *_: (0,))


def _fine(dtype, cfg):
    """Matmul dtype where rounding would be amplified: the states (see bodies._mm)."""
    return dtype if dtype == f32 or cfg.fine == "bf16" else cfg.fine


def _chunk_outer(u, v, w, cfg, dtype):
    """(B, Lp, H, P), (B, Lp, G, N), (B, H, Lp) -> per-chunk sum_l w u v^T, (B, C, H, P, N)."""
    Bsz, Lp, H, P = u.shape
    G, N = v.shape[2:]
    sp = _Specs(cfg.chunk, P, N, H, H // G)
    return _call(bodies.chunk_outer_kernel, (Bsz, Lp // cfg.chunk, H),
                 [sp.rows_P, sp.group_N, sp.chunk], sp.state,
                 jax.ShapeDtypeStruct((Bsz, Lp // cfg.chunk, H, P, N), f32), cfg,
                 bk=min(cfg.bk, cfg.chunk), dtype=dtype)(u, v, w)


def _state_pass(s_BxCxHxPxN, e_BxHxC, init_BxHxPxN, cfg, reverse):
    """Step 3 (or its adjoint): the states at every chunk boundary, (B, C+1, H, P, N)."""
    Bsz, C, H, P, N = s_BxCxHxPxN.shape
    bp = min(cfg.bp, P)
    chunks = lambda n: pl.BlockSpec((None, n, None, bp, N), lambda b, h, p: (b, 0, h, p, 0))
    return _call(bodies.state_pass_kernel, (Bsz, H, P // bp),
                 [chunks(C), pl.BlockSpec((None, None, C), lambda b, h, p: (b, h, 0)),
                  pl.BlockSpec((None, None, bp, N), lambda b, h, p: (b, h, p, 0))],
                 chunks(C + 1), jax.ShapeDtypeStruct((Bsz, C + 1, H, P, N), f32), cfg,
                 n_chunks=C, reverse=reverse)(s_BxCxHxPxN, e_BxHxC, init_BxHxPxN)


def _chunk_cumsum(a_BxHxL, Q):
    Bsz, H, Lp = a_BxHxL.shape
    return jnp.cumsum(a_BxHxL.reshape(Bsz, H, Lp // Q, Q), axis=-1).reshape(Bsz, H, Lp)


def _forward(x, dt, a, Bm, Cm, D, init, cfg):
    Bsz, Lp, H, P = x.shape
    G, N = Bm.shape[2:]
    Q, C = cfg.chunk, Lp // cfg.chunk
    acs = _chunk_cumsum(a, Q)
    acs_BxHxCxQ = acs.reshape(Bsz, H, C, Q)
    to_end = jnp.exp(acs_BxHxCxQ[..., -1:] - acs_BxHxCxQ).reshape(Bsz, H, Lp)
    chunk_states = _chunk_outer(x, Bm, dt * to_end, cfg, _fine(x.dtype, cfg))
    states = _state_pass(chunk_states, jnp.exp(acs_BxHxCxQ[..., -1]), init, cfg, False)
    return _chunk_scan(x, dt, acs, Bm, Cm, states, D, cfg), states, acs


def _chunk_scan(x, dt, acs, Bm, Cm, states, D, cfg):
    """Steps 1 and 4: the outputs, from the inputs and the state entering each chunk.

    Every head makes its own C B^T tiles. Making them once per group in XLA and reading them
    from the heads was no faster (H100: 0.470 against 0.438 ms forward, docs/benchmarks.md)."""
    Bsz, Lp, H, P = x.shape
    G, N = Bm.shape[2:]
    Q = cfg.chunk
    sp = _Specs(Q, P, N, H, H // G)
    return _call(bodies.chunk_scan_fwd_kernel, (Bsz, Lp // Q, H, Q // cfg.bt),
                 [sp.rows_P, sp.chunk, sp.chunk, sp.group_N, sp.group_N, sp.state, sp.heads],
                 sp.rows_P, jax.ShapeDtypeStruct(x.shape, x.dtype), cfg,
                 bt=cfg.bt, bs=cfg.bt, dtype=x.dtype)(x, dt, acs, Bm, Cm, states, D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd_core(x, dt, a, Bm, Cm, D, init, cfg):
    y, states, _ = _forward(x, dt, a, Bm, Cm, D, init, cfg)
    return y, states[:, -1]


def _core_fwd(x, dt, a, Bm, Cm, D, init, cfg):
    y, states, acs = _forward(x, dt, a, Bm, Cm, D, init, cfg)
    return (y, states[:, -1]), (x, dt, acs, Bm, Cm, D, init, states)


def _decay_grad(rect, off, dst, acs, dstates, states, Q):
    """Gradient of each step's log decay a_k (acs = within-chunk cumsum of a), (B, H, L).

    a_k scales every path that crosses step k, so its gradient is a sum over those paths:
      within the chunk:   rect_k = sum_{t >= k > s} Z[t,s]                (dc kernel)
      state -> outputs:   sum_{t >= k} off_t      (off_t = dy_t . y_off_t, dc kernel)
      inputs -> state:    sum_{s < k} dst_s       (dst_s = <dS, s's term>, dx kernel)
      state -> state:     exp(acs_last) <dH_{c+1}, h_c>
    Each is a plain sum; none is a difference of two large sums (rows minus columns), whose
    rounding error would swamp a small result in bf16.
    """
    Bsz, H, Lp = acs.shape
    C = Lp // Q
    chunks = lambda v: v.reshape(Bsz, H, C, Q)
    off_c, dst_c = chunks(off), chunks(dst)
    from_state = jnp.flip(jnp.cumsum(jnp.flip(off_c, -1), -1), -1)
    into_state = jnp.concatenate([jnp.zeros_like(dst_c[..., :1]),
                                  jnp.cumsum(dst_c, -1)[..., :-1]], -1)
    carry_BxCxH = jnp.einsum("bchpn,bchpn->bch", dstates[:, 1:], states[:, :-1])
    carry_BxHxC = carry_BxCxH.transpose(0, 2, 1) * jnp.exp(chunks(acs)[..., -1])
    da = chunks(rect) + from_state + into_state + carry_BxHxC[..., None]
    return da.reshape(Bsz, H, Lp)


def _core_bwd(cfg, res, cts):
    x, dt, acs, Bm, Cm, D, init, states = res
    dy, dfinal = cts
    dy = dy.astype(x.dtype)
    Bsz, Lp, H, P = x.shape
    G, N = Bm.shape[2:]
    Q, C, R = cfg.chunk, Lp // cfg.chunk, H // G
    acs_BxHxCxQ = acs.reshape(Bsz, H, C, Q)
    # Adjoint of step 4, then of step 3: dstates[c+1] = gradient of the state leaving chunk c.
    fine = _fine(x.dtype, cfg)
    from_y = _chunk_outer(dy, Cm, jnp.exp(acs), cfg, fine)
    dstates = _state_pass(from_y, jnp.exp(acs_BxHxCxQ[..., -1]), dfinal.astype(f32), cfg, True)

    sp = _Specs(Q, P, N, H, R)
    grid = (Bsz, C, H, Q // cfg.bt)
    dx, ddt, dB_h, dD_rows, dst = _call(
        bodies.chunk_scan_bwd_dx_kernel, grid,
        [sp.rows_P, sp.chunk, sp.chunk, sp.group_N, sp.group_N, sp.rows_P, sp.state_end,
         sp.heads],
        [sp.rows_P, sp.chunk, sp.rows_N, sp.chunk, sp.chunk],
        [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(dt.shape, f32),
         jax.ShapeDtypeStruct((Bsz, Lp, H, N), x.dtype), jax.ShapeDtypeStruct(dt.shape, f32),
         jax.ShapeDtypeStruct(dt.shape, f32)],
        cfg, q=Q, bt=cfg.bt, bs=cfg.bt, dtype=x.dtype, fine=fine,
    )(x, dt, acs, Bm, Cm, dy, dstates, D)
    nT = Q // cfg.bt
    rect_spec = pl.BlockSpec((None, None, None, Q), lambda b, c, h, tb: (b, tb, h, c))
    dC_h, off, rect_parts = _call(
        bodies.chunk_scan_bwd_dc_kernel, grid,
        [sp.rows_P, sp.chunk, sp.chunk, sp.group_N, sp.group_N, sp.rows_P, sp.state],
        [sp.rows_N, sp.chunk, rect_spec],
        [jax.ShapeDtypeStruct((Bsz, Lp, H, N), x.dtype), jax.ShapeDtypeStruct(dt.shape, f32),
         jax.ShapeDtypeStruct((Bsz, nT, H, Lp), f32)],
        cfg, bt=cfg.bt, bs=cfg.bt, dtype=x.dtype, fine=fine,
        rect=f32 if x.dtype == f32 else (x.dtype if cfg.rect == "bf16" else cfg.rect),
    )(x, dt, acs, Bm, Cm, dy, states)

    da = _decay_grad(rect_parts.sum(1), off, dst, acs, dstates, states, Q)
    # dB and dC come per head, in the input dtype (bf16 halves the 2 x B L H N of traffic;
    # the sum over a group's heads is fp32 and is rounded to the input dtype anyway).
    group_sum = lambda a, like: a.reshape(Bsz, Lp, G, R, N).astype(f32).sum(3).astype(
        like.dtype)
    cts = (dx, ddt, da, group_sum(dB_h, Bm), group_sum(dC_h, Cm),
           dD_rows.sum((0, 2)).astype(D.dtype), dstates[:, 0])
    # D (a parameter) and the initial state may be the same on every device of an axis
    # where the tokens differ: their cotangents are summed over it (kernels/vma.py).
    return tuple(cotangent_like(ct, primal)
                 for ct, primal in zip(cts, (x, dt, acs, Bm, Cm, D, init)))


_ssd_core.defvjp(_core_fwd, _core_bwd)


def launch_cfg(chunk_size, P, interpret, block_t=64, num_warps=4, fine="bf16", rect="bf16",
               num_stages=2, **kw):
    """The launch settings; the defaults are the fastest that pass scripts/check_ssd_gpu.py
    (docs/benchmarks.md). Scripts that time one launch alone build theirs here too."""
    return _Cfg(chunk=chunk_size, bt=min(block_t, chunk_size), bp=P if interpret else 16,
                interpret=interpret, num_warps=num_warps, fine=fine, rect=rect,
                num_stages=num_stages, **kw)


# The log decay given to a step where a document starts (seq_idx): every decay the kernels
# form across it is exp(<= -RESET) = 0 in fp32 (which underflows below exp(-104)), so no
# state crosses; decays within a document subtract it out. No exponent the kernels take is
# positive (all are sums of steps' a <= 0, or masked to -inf), so no inf is formed.
RESET = 128.0


def ssd_pallas(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN, D_H, dt_bias_H,
               initial_state_BxHxPxN=None, chunk_size=64, interpret=None,
               seq_idx_BxL=None, **launch):
    """The chunked SSD through Pallas kernels. Returns (y_BxLxHxP, final_state_BxHxPxN).

    interpret=None picks interpret mode on CPU. On GPU, chunk_size, P and N must be powers of
    two >= 16 (Triton tiles); L need not be a multiple of chunk_size. `launch`: block_t,
    num_warps, fine, rect, num_stages (see launch_cfg for their defaults).

    seq_idx_BxL (packed documents, mamba_ssm's semantics): a step whose index differs from
    the previous step's starts a new document: its decay of the state before it is zero
    (RESET), so neither the state nor its gradient crosses. The kernels are unchanged; the
    step's own input (dt x B) still counts, and the decay's gradient there is zero, as in
    the twins.
    """
    Bsz, L, H, P = x_BxLxHxP.shape
    G, N = B_BxLxGxN.shape[2:]
    Q = chunk_size
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if not interpret and not kernel_fits(P, N, Q):
        raise ValueError(
            f"the Pallas SSD kernel needs headdim, d_state and chunk_size to be powers of two "
            f">= 16 on GPU, got {P}, {N}, {Q}: change them, or use model.ssm_impl=auto "
            f"(falls back to chunked) or chunked")
    cfg = launch_cfg(Q, P, interpret, **launch)
    dt_BxLxH = jax.nn.softplus(dt_BxLxH.astype(f32) + dt_bias_H.astype(f32))
    x, Bm, Cm = x_BxLxHxP, B_BxLxGxN, C_BxLxGxN
    # Pad L to a multiple of Q with dt = 0: no decay and no input, so the padded steps leave
    # the outputs before them and the final state unchanged (as in ssd_chunked).
    pad = (-L) % Q
    if pad:
        padL = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        x, dt_BxLxH, Bm, Cm = padL(x), padL(dt_BxLxH), padL(Bm), padL(Cm)
    Lp = L + pad
    dt_BxHxL = dt_BxLxH.transpose(0, 2, 1)
    a_BxHxL = dt_BxHxL * A_H.astype(f32)[:, None]  # log decay of each step
    if seq_idx_BxL is not None:
        start_BxL = jnp.pad(starts(seq_idx_BxL), [(0, 0), (0, pad)])
        a_BxHxL = jnp.where(start_BxL[:, None, :], -RESET, a_BxHxL)
    if initial_state_BxHxPxN is None:
        initial_state_BxHxPxN = jnp.zeros((Bsz, H, P, N), f32)
    y, final = _ssd_core(x, dt_BxHxL, a_BxHxL, Bm, Cm, D_H.astype(f32),
                         initial_state_BxHxPxN.astype(f32), cfg)
    return y[:, :L], final
