"""Causal grouped-query self-attention with partial rotary embeddings: mamba_ssm's MHA
(modules/mha.py) as used by hybrid models (Bamba, Nemotron-H), as pure functions.

Glossary: B batch, L sequence, D d_model, Q query heads, R key/value heads (Q % R == 0),
A head dim, W rotary dims (the first W of each head's A; 0: none).

Weights, in mamba_ssm's layout (ModelConfig.attn_heads gives Q, R, A): in_proj
[D, A (Q + 2 R)] whose output splits into q (Q A), k (R A), v (R A); out_proj [Q A, D];
optional biases of both.

Rotary: flash_attn's non-interleaved form (GPT-NeoX): the first W/2 and the next W/2 dims of
q and k rotate as pairs by position * base^(-2i/W). With packed documents (seq_idx), every
document attends only to itself and its positions restart at 0, as if it were alone, the
way the Mamba layers restart their state.

Implementations (`impl`): "reference" is the plain twin (scores, mask and softmax in fp32,
written out here); "xla" and "cudnn" are jax.nn.dot_product_attention's (cuDNN's flash
attention on GPU; bf16/fp16 only); "auto" picks cudnn on a GPU for 16-bit inputs, else xla.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmamba.ssd import segments


def positions(seq_idx_BxL, B: int, L: int):
    """Each token's position within its document ([B, L] int32)."""
    t_L = jnp.arange(L, dtype=jnp.int32)
    if seq_idx_BxL is None:
        return jnp.broadcast_to(t_L, (B, L))
    seg_BxL = segments(seq_idx_BxL)
    # The first index of each token's document: a running max over the document starts.
    start_BxL = jax.lax.cummax(jnp.where(
        jnp.concatenate([jnp.ones_like(seg_BxL[:, :1], bool),
                         seg_BxL[:, 1:] != seg_BxL[:, :-1]], axis=1), t_L, 0), axis=1)
    return t_L - start_BxL


def rotary(x_BxLxHxA, pos_BxL, W: int, base: float):
    """Rotates the first W dims of every head (non-interleaved pairs i, i + W/2), in fp32."""
    if W == 0:
        return x_BxLxHxA
    inv_freq = base ** (-jnp.arange(0, W, 2, dtype=jnp.float32) / W)
    angle_BxLx1xW2 = (pos_BxL.astype(jnp.float32)[..., None] * inv_freq)[:, :, None, :]
    cos, sin = jnp.cos(angle_BxLx1xW2), jnp.sin(angle_BxLx1xW2)
    x = x_BxLxHxA.astype(jnp.float32)
    x1, x2, rest = x[..., :W // 2], x[..., W // 2:W], x[..., W:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x_BxLxHxA.dtype)


def allowed_mask(seq_idx_BxL, B: int, L: int):
    """[B, 1, L, L] bool: query t may see key s (s <= t, same document)."""
    causal_LxL = jnp.tril(jnp.ones((L, L), bool))
    if seq_idx_BxL is None:
        return jnp.broadcast_to(causal_LxL, (B, 1, L, L))
    seg_BxL = segments(seq_idx_BxL)
    same_BxLxL = seg_BxL[:, :, None] == seg_BxL[:, None, :]
    return (same_BxLxL & causal_LxL)[:, None]


def attention_reference(q_BxLxQxA, k_BxLxRxA, v_BxLxRxA, seq_idx_BxL=None):
    """The plain twin: softmax(q k^T / sqrt(A) + mask) v per head, fp32 inside."""
    B, L, Q, A = q_BxLxQxA.shape
    R = k_BxLxRxA.shape[2]
    q = q_BxLxQxA.astype(jnp.float32).reshape(B, L, R, Q // R, A)  # head h uses kv h // (Q/R)
    k, v = k_BxLxRxA.astype(jnp.float32), v_BxLxRxA.astype(jnp.float32)
    s_BxRxGxLxL = jnp.einsum("btrga,bsra->brgts", q, k) / jnp.sqrt(jnp.float32(A))
    mask_Bx1x1xLxL = allowed_mask(seq_idx_BxL, B, L)[:, :, None]
    s_BxRxGxLxL = jnp.where(mask_Bx1x1xLxL, s_BxRxGxLxL, -jnp.inf)
    p = jax.nn.softmax(s_BxRxGxLxL, axis=-1)
    out = jnp.einsum("brgts,bsra->btrga", p, v).reshape(B, L, Q, A)
    return out.astype(q_BxLxQxA.dtype)


def pick_impl(impl: str, dtype) -> str:
    if impl != "auto":
        return impl
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if jax.default_backend() == "gpu" and half else "xla"


def attend(q_BxLxQxA, k_BxLxRxA, v_BxLxRxA, seq_idx_BxL=None, impl: str = "auto"):
    """Causal attention, each document to itself; GQA when R < Q."""
    impl = pick_impl(impl, q_BxLxQxA.dtype)
    if impl == "reference":
        return attention_reference(q_BxLxQxA, k_BxLxRxA, v_BxLxRxA, seq_idx_BxL)
    B, L = q_BxLxQxA.shape[:2]
    # Causality is the kernel's own mask (cuDNN skips the masked tiles); documents add a mask.
    mask = None if seq_idx_BxL is None else allowed_mask(seq_idx_BxL, B, L)
    return jax.nn.dot_product_attention(q_BxLxQxA, k_BxLxRxA, v_BxLxRxA, mask=mask,
                                        is_causal=True, implementation=impl)


def self_attention(x_BxLxD, w_in_DxZ, b_in_Z, w_out_OxD, b_out_D, cfg, seq_idx_BxL=None):
    """mamba_ssm's MHA forward (causal, no conv, no fused MLP) on given weights, in
    cfg.dtype. w_in has A (Q + 2 R) columns, w_out Q A rows; biases may be None."""
    Q, R, A = cfg.attn_heads
    dtype = jnp.dtype(cfg.dtype)
    B, L, _ = x_BxLxD.shape
    qkv = jnp.dot(x_BxLxD.astype(dtype), w_in_DxZ.astype(dtype))
    if b_in_Z is not None:
        qkv = qkv + b_in_Z.astype(dtype)
    q = qkv[..., :Q * A].reshape(B, L, Q, A)
    k = qkv[..., Q * A:(Q + R) * A].reshape(B, L, R, A)
    v = qkv[..., (Q + R) * A:].reshape(B, L, R, A)
    pos_BxL = positions(seq_idx_BxL, B, L)
    q = rotary(q, pos_BxL, cfg.attn_rotary_dim, cfg.attn_rotary_base)
    k = rotary(k, pos_BxL, cfg.attn_rotary_dim, cfg.attn_rotary_base)
    ctx = attend(q, k, v, seq_idx_BxL, cfg.attn_impl).reshape(B, L, Q * A)
    out = jnp.dot(ctx, w_out_OxD.astype(dtype))
    if b_out_D is not None:
        out = out + b_out_D.astype(dtype)
    return out
