"""Mamba-2 state space duality (SSD): a sequential reference and the chunked algorithm.

Glossary (shapes in names): B batch, L sequence, H heads, P head dim, N d_state,
G groups (B/C shared by H/G heads), C chunks, Q chunk length, R heads per group.

Both functions compute, for every head h with its group g = h // R (Mamba-2 paper, eq. 2):
    dt_t    = softplus(dt_raw_t + dt_bias)
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t     (state: P x N)
    y_t     = state_t @ C_t + D * x_t
The sequential form is obviously right and slow; the chunked form (paper, section 6 /
mamba_ssm's ssd_minimal) is what trains. A GPU kernel plugs in behind `ssd`.

Packed documents (mamba_ssm's `seq_idx`): seq_idx_BxL is an int32 document index per
token; where it changes, a new document starts and the state restarts from zero (the
decay into that step is 0), so no state flows from one document into the next. An
initial state flows into the first document only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _prep(x_BxLxHxP, dt_BxLxH, A_H, dt_bias_H):
    """Casts to fp32 and applies the fused softplus(dt + dt_bias)."""
    f32 = jnp.float32
    dt_BxLxH = jax.nn.softplus(dt_BxLxH.astype(f32) + dt_bias_H.astype(f32))
    return x_BxLxHxP.astype(f32), dt_BxLxH, A_H.astype(f32)


def starts(seq_idx_BxL):
    """True where a document starts after the first position (seq_idx changes)."""
    return jnp.pad(seq_idx_BxL[:, 1:] != seq_idx_BxL[:, :-1], [(0, 0), (1, 0)])


def segments(seq_idx_BxL):
    """A non-decreasing segment id per token (0 for the first document): equal ids mean no
    document starts in between, whatever values seq_idx uses."""
    return jnp.cumsum(starts(seq_idx_BxL).astype(jnp.int32), axis=1)


def ssd_reference(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN, D_H, dt_bias_H,
                  initial_state_BxHxPxN=None, seq_idx_BxL=None):
    """Step-by-step recurrence with lax.scan over time. Returns (y_BxLxHxP, final_state)."""
    Bsz, L, H, P = x_BxLxHxP.shape
    G, N = B_BxLxGxN.shape[2:]
    x, dt, A = _prep(x_BxLxHxP, dt_BxLxH, A_H, dt_bias_H)
    R = H // G
    # Give every head its group's B and C.
    B_BxLxHxN = jnp.repeat(B_BxLxGxN.astype(jnp.float32), R, axis=2)
    C_BxLxHxN = jnp.repeat(C_BxLxGxN.astype(jnp.float32), R, axis=2)
    if initial_state_BxHxPxN is None:
        # zeros_like keeps x's per-device type under shard_map (a scan carry must match).
        initial_state_BxHxPxN = jnp.zeros_like(x, shape=(Bsz, H, P, N))

    new_doc_BxL = (jnp.zeros(x.shape[:2], bool) if seq_idx_BxL is None
                   else starts(seq_idx_BxL))

    def step(state_BxHxPxN, inputs):
        x_BxHxP, dt_BxH, B_BxHxN, C_BxHxN, new_doc_B = inputs
        decay_BxH = jnp.where(new_doc_B[:, None], 0.0, jnp.exp(dt_BxH * A))
        state_BxHxPxN = (decay_BxH[..., None, None] * state_BxHxPxN
                         + (dt_BxH[..., None] * x_BxHxP)[..., None] * B_BxHxN[:, :, None, :])
        y_BxHxP = jnp.einsum("bhpn,bhn->bhp", state_BxHxPxN, C_BxHxN)
        return state_BxHxPxN, y_BxHxP

    time_major = lambda a: jnp.moveaxis(a, 1, 0)
    final, y_LxBxHxP = jax.lax.scan(
        step, initial_state_BxHxPxN.astype(jnp.float32),
        (time_major(x), time_major(dt), time_major(B_BxLxHxN), time_major(C_BxLxHxN),
         time_major(new_doc_BxL)))
    y = jnp.moveaxis(y_LxBxHxP, 0, 1) + D_H.astype(jnp.float32)[:, None] * x
    return y.astype(x_BxLxHxP.dtype), final


def _segsum_exp(a_xQ):
    """exp(sum_{s<j<=t} a_j) for t >= s, else 0: the decay matrix of one chunk, [..., Q, Q].

    The masked entries are zeroed before exp so neither forward nor backward sees inf.
    """
    Q = a_xQ.shape[-1]
    cs = jnp.cumsum(a_xQ, axis=-1)
    diff = cs[..., :, None] - cs[..., None, :]
    causal = jnp.tril(jnp.ones((Q, Q), dtype=bool))
    return jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)


def ssd_chunked(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN, D_H, dt_bias_H,
                initial_state_BxHxPxN=None, chunk_size=64, seq_idx_BxL=None):
    """The chunked SSD algorithm. Returns (y_BxLxHxP, final_state_BxHxPxN).

    With seq_idx, every decay between two positions (and chunk ends) of different
    segments is masked to zero: within a chunk, into a chunk's own state, across chunks,
    and from the state a chunk starts with."""
    Bsz, L, H, P = x_BxLxHxP.shape
    G, N = B_BxLxGxN.shape[2:]
    R, Q = H // G, chunk_size
    x, dt, A = _prep(x_BxLxHxP, dt_BxLxH, A_H, dt_bias_H)
    Bm, Cm = B_BxLxGxN.astype(jnp.float32), C_BxLxGxN.astype(jnp.float32)
    # Pad L up to a multiple of Q with dt = 0: no decay and no input, so the padded steps
    # change neither earlier outputs nor the final state.
    pad = (-L) % Q
    if pad:
        padL = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        x, dt, Bm, Cm = padL(x), padL(dt), padL(Bm), padL(Cm)
    C_ = (L + pad) // Q
    seg_BxCxQ = seg_end_BxC1 = None
    if seq_idx_BxL is not None:  # padded steps continue the last segment (no effect anyway)
        seg_BxCxQ = jnp.pad(segments(seq_idx_BxL), [(0, 0), (0, pad)], mode="edge").reshape(
            Bsz, C_, Q)
        # Segment at each chunk end; the initial state counts as the first token's.
        seg_end_BxC1 = jnp.concatenate([seg_BxCxQ[:, :1, 0], seg_BxCxQ[:, :, -1]], axis=1)

    def mask(same):  # same(seg_BxCxQ, seg_end_BxC1) -> bool [B, C, ...] as [B, 1, 1, C, ...]
        if seg_BxCxQ is None:
            return 1.0
        return same(seg_BxCxQ, seg_end_BxC1)[:, None, None].astype(jnp.float32)

    X_BxCxQxGxRxP = (x * dt[..., None]).reshape(Bsz, C_, Q, G, R, P)
    a_BxGxRxCxQ = (dt * A).reshape(Bsz, C_, Q, G, R).transpose(0, 3, 4, 1, 2)
    B_BxCxQxGxN = Bm.reshape(Bsz, C_, Q, G, N)
    C_BxCxQxGxN = Cm.reshape(Bsz, C_, Q, G, N)
    acs_BxGxRxCxQ = jnp.cumsum(a_BxGxRxCxQ, axis=-1)

    # 1. Intra-chunk outputs (diagonal blocks): y = (C B^T o decay) X within each chunk.
    decay_BxGxRxCxQxQ = _segsum_exp(a_BxGxRxCxQ) * mask(
        lambda seg, _: seg[..., :, None] == seg[..., None, :])
    CB_BxCxGxQxQ = jnp.einsum("bclgn,bcsgn->bcgls", C_BxCxQxGxN, B_BxCxQxGxN)
    y_diag = jnp.einsum("bcgls,bgrcls,bcsgrp->bclgrp", CB_BxCxGxQxQ, decay_BxGxRxCxQxQ,
                        X_BxCxQxGxRxP)

    # 2. The state each chunk produces on its own (input B, decayed to the chunk's end).
    decay_to_end_BxGxRxCxQ = jnp.exp(acs_BxGxRxCxQ[..., -1:] - acs_BxGxRxCxQ) * mask(
        lambda seg, _: seg == seg[..., -1:])
    states_BxCxGxRxPxN = jnp.einsum("bclgn,bgrcl,bclgrp->bcgrpn", B_BxCxQxGxN,
                                    decay_to_end_BxGxRxCxQ, X_BxCxQxGxRxP)

    # 3. Inter-chunk recurrence: pass states across chunk boundaries (a scan over C chunks,
    #    written as one matmul with the chunk-level decay matrix).
    if initial_state_BxHxPxN is None:
        initial_state_BxHxPxN = jnp.zeros((Bsz, H, P, N), jnp.float32)
    init_Bx1xGxRxPxN = initial_state_BxHxPxN.astype(jnp.float32).reshape(Bsz, 1, G, R, P, N)
    states_BxC1xGxRxPxN = jnp.concatenate([init_Bx1xGxRxPxN, states_BxCxGxRxPxN], axis=1)
    chunk_a_BxGxRxC1 = jnp.pad(acs_BxGxRxCxQ[..., -1], [(0, 0)] * 3 + [(1, 0)])
    chunk_decay_BxGxRxC1xC1 = _segsum_exp(chunk_a_BxGxRxC1) * mask(
        lambda _, end: end[:, :, None] == end[:, None, :])
    new_states = jnp.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay_BxGxRxC1xC1,
                            states_BxC1xGxRxPxN)
    states_in_BxCxGxRxPxN, final_BxGxRxPxN = new_states[:, :-1], new_states[:, -1]

    # 4. State -> output: each chunk reads the state it started with, decayed to position l.
    y_off = jnp.einsum("bclgn,bcgrpn,bgrcl->bclgrp", C_BxCxQxGxN, states_in_BxCxGxRxPxN,
                       jnp.exp(acs_BxGxRxCxQ) * mask(lambda seg, end: seg == end[:, :-1, None]))

    y = (y_diag + y_off).reshape(Bsz, C_ * Q, H, P)[:, :L]
    y = y + D_H.astype(jnp.float32)[:, None] * x[:, :L]
    return y.astype(x_BxLxHxP.dtype), final_BxGxRxPxN.reshape(Bsz, H, P, N)


def kernel_fits(P: int, N: int, chunk_size: int) -> bool:
    """Whether the Pallas kernel compiles for these sizes on GPU: Triton tiles need powers
    of two >= 16 (any size runs in interpret mode on CPU)."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (P, N, chunk_size))


def triton_lowering_available() -> bool:
    """The kernel's GPU backend, Pallas' Triton lowering, is deprecated since jax 0.11.0;
    once a jax release drops it, 'auto' falls back to the chunked path instead of failing."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, P: int, N: int, chunk_size: int) -> str:
    """'auto': the Pallas kernel on GPU where its tiles fit, else the chunked XLA path."""
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu"
    fits = kernel_fits(P, N, chunk_size) and triton_lowering_available()
    return "kernel" if on_gpu and fits else "chunked"


def ssd(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN, D_H, dt_bias_H,
        initial_state_BxHxPxN=None, seq_idx_BxL=None, *, chunk_size=64, impl="auto"):
    """The one entry point the mixer calls; `impl` picks reference, chunked, kernel or auto.
    Every path takes seq_idx (packed documents)."""
    args = (x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN, D_H, dt_bias_H,
            initial_state_BxHxPxN)
    impl = resolve_impl(impl, x_BxLxHxP.shape[-1], B_BxLxGxN.shape[-1], chunk_size)
    if impl == "reference":
        return ssd_reference(*args, seq_idx_BxL=seq_idx_BxL)
    if impl == "chunked":
        return ssd_chunked(*args, chunk_size=chunk_size, seq_idx_BxL=seq_idx_BxL)
    if impl == "kernel":
        from jmamba.kernels.ssd_pallas import ssd_pallas  # Pallas only when asked for
        return ssd_pallas(*args, chunk_size=chunk_size, seq_idx_BxL=seq_idx_BxL)
    raise ValueError(f"unknown ssm_impl {impl!r}; use 'auto', 'reference', 'chunked' or "
                     "'kernel'")
