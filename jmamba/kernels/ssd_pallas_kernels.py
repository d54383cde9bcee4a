"""Pallas kernel bodies of the chunked SSD: one program owns one (batch, chunk, head[, block]).

Glossary as in jmamba/ssd.py; inside a chunk, t indexes outputs (rows) and s inputs
(columns); `acs` is the within-chunk cumsum of dt * A, so exp(acs_t - acs_s) is the decay from
step s to step t (Mamba-2 paper, section 6, the segsum matrix L). Matmul operands are cast to
the input dtype (bf16 on GPU), everything else is fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

f32 = jnp.float32


_FINE = {"tf32": lax.Precision.HIGH, "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3}


def _mm(a, b, dtype, trans_a=False, trans_b=False):
    """A tensor-core matmul with fp32 accumulation; fp32 inputs stay exact (no tf32).

    dtype "tf32" (or "tf32x3", three tf32 passes) keeps fp32 operands: the bf16 path uses it
    where a bf16 operand would be rounded before a sum with cancellation (the states, and
    the ddt, dA, dt_bias paths).
    """
    if isinstance(dtype, str):
        precision, dtype = _FINE[dtype], f32
    else:
        precision = lax.Precision.HIGHEST if dtype == f32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                           preferred_element_type=f32)


def _decay(acs_t, acs_s, t0, s0, transposed=False):
    """exp(acs_t - acs_s) where t >= s, else 0: a (bt, bs) tile of the segsum matrix L,
    or its (bs, bt) transpose, built directly (no in-kernel transpose).

    The masked entries become -inf before exp, so no inf is ever formed (paper eq. 16).
    """
    t_idx = t0 + lax.broadcasted_iota(jnp.int32, (acs_t.shape[0],), 0)
    s_idx = s0 + lax.broadcasted_iota(jnp.int32, (acs_s.shape[0],), 0)
    if transposed:
        causal, diff = t_idx[None, :] >= s_idx[:, None], acs_t[None, :] - acs_s[:, None]
    else:
        causal, diff = t_idx[:, None] >= s_idx[None, :], acs_t[:, None] - acs_s[None, :]
    return jnp.exp(jnp.where(causal, diff, -jnp.inf))


def chunk_outer_kernel(u_ref, v_ref, w_ref, out_ref, *, bk, dtype):
    """out (P, N) = sum_l w_l u_l v_l^T over one chunk, bk rows at a time.

    Forward step 2 (chunk states): u = x, v = B, w = dt * exp(acs_last - acs).
    Backward of step 4 (state gradient from the outputs): u = dy, v = C, w = exp(acs).
    Looping over bk-row slices keeps fp32 (tf32) operands within shared memory.
    """
    def body(k, out_PxN):
        ks = pl.ds(k * bk, bk)
        uw_KxP = u_ref[ks, :].astype(f32) * w_ref[ks][:, None]
        return out_PxN + _mm(uw_KxP, v_ref[ks, :], dtype, trans_a=True)

    out_ref[...] = lax.fori_loop(0, u_ref.shape[0] // bk, body, jnp.zeros(out_ref.shape, f32))


def state_pass_kernel(s_ref, e_ref, init_ref, out_ref, *, n_chunks, reverse):
    """Step 3, the recurrence across chunks: h_{c+1} = e_c h_c + S_c (a P-block of one head).

    Forward: out[c] is the state entering chunk c and out[C] the final state. Reverse (the
    adjoint, for the backward pass): out[c+1] is the gradient of the state leaving chunk c
    and out[0] the gradient of the initial state.
    """
    def body(i, h_PxN):
        c = n_chunks - 1 - i if reverse else i
        out_ref[c + 1 if reverse else c] = h_PxN
        return e_ref[c] * h_PxN + s_ref[c]

    h_PxN = lax.fori_loop(0, n_chunks, body, init_ref[...].astype(f32))
    out_ref[0 if reverse else n_chunks] = h_PxN


def chunk_scan_fwd_kernel(x_ref, dt_ref, acs_ref, b_ref, c_ref, st_ref, d_ref, y_ref, *,
                          bt, bs, dtype):
    """Steps 1 and 4 for one block of bt outputs: y = C h0 decayed + causal (C B^T o L) X + D x."""
    h, t0 = pl.program_id(2), pl.program_id(3) * bt
    ts = pl.ds(t0, bt)
    c_t, acs_t = c_ref[ts, :], acs_ref[ts]
    # 4. The state carried into the chunk, read by C and decayed to position t.
    y_TxP = _mm(c_t, st_ref[...], dtype, trans_b=True) * jnp.exp(acs_t)[:, None]

    # 1. Intra-chunk (diagonal blocks): only s-blocks at or before this t-block.
    def body(j, y_TxP):
        s0 = j * bs
        ss = pl.ds(s0, bs)
        cb_TxS = _mm(c_t, b_ref[ss, :], dtype, trans_b=True)
        w_TxS = cb_TxS * _decay(acs_t, acs_ref[ss], t0, s0) * dt_ref[ss][None, :]
        return y_TxP + _mm(w_TxS, x_ref[ss, :], dtype)

    y_TxP = lax.fori_loop(0, (t0 + bt) // bs, body, y_TxP)
    y_TxP = y_TxP + d_ref[h] * x_ref[ts, :].astype(f32)
    y_ref[ts, :] = y_TxP.astype(y_ref.dtype)


def chunk_scan_bwd_dx_kernel(x_ref, dt_ref, acs_ref, b_ref, c_ref, dy_ref, ds_ref, d_ref,
                             dx_ref, ddt_ref, db_ref, ddd_ref, dst_ref, *, q, bt, bs, dtype,
                             fine):
    """Gradients owned by one block of bs inputs s: dx, ddt (through X = dt x), dB, D terms.

    dX_s = sum_{t>=s} (C_t.B_s) L[t,s] dy_t + exp(acs_last - acs_s) dS B_s      (X = dt x)
    dB_s = sum_{t>=s} (dy_t.x_s) L[t,s] dt_s C_t + exp(acs_last - acs_s) dt_s dS^T x_s
    where dS is the gradient of the state leaving the chunk. dst_s = <dS, s's term of the
    chunk state> (its own output: the decay gradient sums it over s < k, see the dc kernel).
    """
    h, s0 = pl.program_id(2), pl.program_id(3) * bs
    ss = pl.ds(s0, bs)
    b_s, x_s, dt_s, acs_s = b_ref[ss, :], x_ref[ss, :], dt_ref[ss], acs_ref[ss]
    to_end_S = jnp.exp(acs_ref[q - 1] - acs_s)  # decay from s to the chunk's end
    dS_PxN = ds_ref[...]
    dX_SxP = _mm(b_s, dS_PxN, fine, trans_b=True) * to_end_S[:, None]
    dB_SxN = _mm(x_s, dS_PxN, dtype) * (to_end_S * dt_s)[:, None]
    dst_ref[ss] = jnp.sum(dX_SxP * x_s.astype(f32), axis=1) * dt_s

    def body(i, carry):
        dX_SxP, dB_SxN = carry
        t0 = i * bt
        ts = pl.ds(t0, bt)
        c_t, dy_t = c_ref[ts, :], dy_ref[ts, :]
        decay_SxT = _decay(acs_ref[ts], acs_s, t0, s0, transposed=True)
        cb_SxT = _mm(b_s, c_t, dtype, trans_b=True)
        dX_SxP = dX_SxP + _mm(cb_SxT * decay_SxT, dy_t, fine)
        xdy_SxT = _mm(x_s, dy_t, dtype, trans_b=True)
        dB_SxN = dB_SxN + _mm(xdy_SxT * decay_SxT * dt_s[:, None], c_t, dtype)
        return dX_SxP, dB_SxN

    dX_SxP, dB_SxN = lax.fori_loop(s0 // bt, q // bt, body, (dX_SxP, dB_SxN))
    x32_s, dy32_s = x_s.astype(f32), dy_ref[ss, :].astype(f32)
    dx_ref[ss, :] = (dX_SxP * dt_s[:, None] + d_ref[h] * dy32_s).astype(dx_ref.dtype)
    ddt_ref[ss] = jnp.sum(dX_SxP * x32_s, axis=1)
    db_ref[ss, :] = dB_SxN.astype(db_ref.dtype)
    ddd_ref[ss] = jnp.sum(dy32_s * x32_s, axis=1)  # per-row parts of dD


def chunk_scan_bwd_dc_kernel(x_ref, dt_ref, acs_ref, b_ref, c_ref, dy_ref, st_ref,
                             dc_ref, off_ref, rect_ref, *, bt, bs, dtype, fine, rect):
    """Gradients owned by one block of bt outputs t: dC and two parts of the decay gradient.

    dC_t = exp(acs_t) h0^T dy_t + sum_{s<=t} (dy_t.x_s) L[t,s] dt_s B_s
    off_t = dy_t . (the state's output at t), whose gradient w.r.t. acs_t it is.
    rect_k = sum over t >= k > s of Z[t,s], Z = (dy x^T) o (C B^T) o L dt: the gradient of the
    within-chunk outputs w.r.t. the step's log decay a_k (acs_t - acs_s = a_{s+1}+...+a_t),
    this t-block's share (the caller sums the t-blocks). Summing Z over that rectangle
    directly, rather than taking rows of Z minus columns of a separately rounded Z and then a
    reverse cumsum, avoids the cancellation that cost the bf16 path its dA precision. Only
    the diagonal tile needs a matmul (by a strictly-upper 0/1 matrix, in `rect` precision);
    tiles before it reduce to column and row sums. Assumes bs == bt.
    """
    tb = pl.program_id(3)
    t0 = tb * bt
    ts = pl.ds(t0, bt)
    c_t, dy_t, acs_t = c_ref[ts, :], dy_ref[ts, :], acs_ref[ts]
    dC_TxN = _mm(dy_t, st_ref[...], fine) * jnp.exp(acs_t)[:, None]
    off_ref[ts] = jnp.sum(dC_TxN * c_t.astype(f32), axis=1)  # dy_t . y_off_t
    rect_ref[...] = jnp.zeros(rect_ref.shape, f32)
    # Positions within a block: t (rows of this t-block) and k (a block of decay steps).
    t_in = lax.broadcasted_iota(jnp.int32, (bt, bs), 0)
    k_in = lax.broadcasted_iota(jnp.int32, (bt, bs), 1)
    strictly_before = (lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
                       < lax.broadcasted_iota(jnp.int32, (bs, bs), 1)).astype(f32)

    def tile(j):
        s0 = j * bs
        ss = pl.ds(s0, bs)
        b_s = b_ref[ss, :]
        cb_TxS = _mm(c_t, b_s, dtype, trans_b=True)
        dyx_TxS = _mm(dy_t, x_ref[ss, :], dtype, trans_b=True)
        w_TxS = dyx_TxS * _decay(acs_t, acs_ref[ss], t0, s0) * dt_ref[ss][None, :]
        return ss, b_s, w_TxS, w_TxS * cb_TxS

    def off_diagonal(j, dC_TxN):
        """An s-block before the t-block: every t is after every k of the s-block."""
        ss, b_s, w_TxS, z_TxS = tile(j)
        col_S = jnp.sum(z_TxS, axis=0)
        # k in the s-block: the columns s < k (an exclusive cumsum of the column sums).
        rect_ref[ss] += jnp.sum(col_S[:, None] * strictly_before, axis=0)
        # k in the blocks between: the whole tile; k in the t-block: the rows t >= k.
        total = jnp.sum(col_S)

        def between(kb, carry):
            kk = pl.ds(kb * bs, bs)
            rect_ref[kk] += total
            return carry

        lax.fori_loop(j + 1, tb, between, 0)
        row_T = jnp.sum(z_TxS, axis=1)
        rect_ref[ts] += jnp.sum(jnp.where(t_in >= k_in, row_T[:, None], 0.0), axis=0)
        return dC_TxN + _mm(w_TxS, b_s, dtype)

    dC_TxN = lax.fori_loop(0, tb, off_diagonal, dC_TxN)
    # The diagonal tile: k, t and s share the block; rows t >= k, columns s < k.
    ss, b_s, w_TxS, z_TxS = tile(tb)
    r_TxK = _mm(z_TxS, strictly_before, rect)
    rect_ref[ts] += jnp.sum(jnp.where(t_in >= k_in, r_TxK, 0.0), axis=0)
    dc_ref[ts, :] = (dC_TxN + _mm(w_TxS, b_s, dtype)).astype(dc_ref.dtype)
