"""Mamba2 mixer, norms and the dense gated MLP as Flax NNX modules (single-device math).

Glossary: B batch, L sequence, D d_model, I d_inner (= expand * D), H heads, P head dim,
N d_state, G groups, K conv width, X conv channels (I + 2 G N), F MLP hidden.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jmamba.config import ModelConfig
from jmamba.kernels import norm_pallas
from jmamba.ssd import segments, ssd


def uniform_init(bound):
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def dense(rngs, d_in, d_out, scale=1.0, use_bias=False):
    """A Linear with torch's default init, optionally scaled (mamba_ssm's residual rescale)."""
    return nnx.Linear(d_in, d_out, use_bias=use_bias, rngs=rngs,
                      kernel_init=uniform_init(scale / math.sqrt(d_in)),
                      bias_init=nnx.initializers.zeros)


def linear(layer: nnx.Linear, x, dtype):
    """Applies `layer` in the compute dtype (parameters stay fp32)."""
    y = jnp.dot(x.astype(dtype), layer.kernel[...].astype(dtype))
    if layer.bias is not None:
        y = y + layer.bias[...].astype(dtype)
    return y


def rms_norm(x, scale, eps, dtype, groups=1):
    """RMSNorm over the last axis in fp32; `groups` normalises equal slices of it apart."""
    x32 = x.astype(jnp.float32)
    xg = x32.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    xg = xg * jax.lax.rsqrt(jnp.mean(xg * xg, axis=-1, keepdims=True) + eps)
    return (xg.reshape(x.shape) * scale).astype(dtype)


def add_rms_norm_xla(h, r, scale, eps, dtype):
    """(rms_norm(h + r), h + r): the block's residual add in r's dtype, then its norm."""
    residual = h.astype(r.dtype) + r
    return rms_norm(residual, scale, eps, dtype), residual


def add_rms_norm(h, r, scale, eps, dtype, impl: str = "xla"):
    """add_rms_norm_xla, or with impl "pallas" its one-kernel twin where the rows fit it
    (kernels/norm_pallas.py)."""
    D = h.shape[-1]
    if impl == "pallas" and norm_pallas.fits(h.size // D, D):
        return norm_pallas.add_rms_norm(h, r, scale, eps, dtype)
    return add_rms_norm_xla(h, r, scale, eps, dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, groups: int = 1):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps, self.groups = eps, groups

    def __call__(self, x, dtype):
        return rms_norm(x, self.scale[...], self.eps, dtype, self.groups)


class Mamba2Mixer(nnx.Module):
    """mamba_ssm's Mamba2: in_proj -> [z, x, B, C, dt], causal depthwise conv over xBC,
    SiLU, SSD with a scalar A per head and D skip, gated RMSNorm with z, out_proj."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_scale: float = 1.0):
        self.cfg = cfg
        D, I, H, G, N = cfg.d_model, cfg.d_inner, cfg.nheads, cfg.ngroups, cfg.d_state
        X = I + 2 * G * N
        self.in_proj = dense(rngs, D, 2 * I + 2 * G * N + H, use_bias=cfg.bias)
        conv_bound = 1.0 / math.sqrt(cfg.d_conv)  # depthwise: fan_in = K
        self.conv1d_kernel = nnx.Param(uniform_init(conv_bound)(rngs.params(), (cfg.d_conv, X)))
        self.conv1d_bias = (nnx.Param(uniform_init(conv_bound)(rngs.params(), (X,)))
                         if cfg.conv_bias else None)
        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (mamba_ssm init).
        u = jax.random.uniform(rngs.params(), (H,))
        dt = jnp.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))
        lo, hi = cfg.A_init_range
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (H,), minval=lo,
                                                          maxval=hi)))
        self.D = nnx.Param(jnp.ones((H,), jnp.float32))
        self.norm = RMSNorm(I, cfg.rms_norm_eps, groups=G)
        self.out_proj = dense(rngs, I, D, scale=out_scale, use_bias=cfg.bias)

    def causal_conv(self, xBC_BxLxX, seq_idx_BxL=None):
        """Depthwise causal conv1d (causal_conv1d below) with this mixer's weights."""
        bias = None if self.conv1d_bias is None else self.conv1d_bias[...]
        return causal_conv1d(xBC_BxLxX, self.conv1d_kernel[...], bias, seq_idx_BxL)

    def __call__(self, u_BxLxD, seq_idx_BxL=None):
        """seq_idx_BxL: packed documents' index per token (ssd.py); None: one sequence."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        Bsz, L, _ = u_BxLxD.shape
        I, H, P, G, N = cfg.d_inner, cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        zxbcdt = linear(self.in_proj, u_BxLxD, dtype)
        z_BxLxI = zxbcdt[..., :I]
        bias = None if self.conv1d_bias is None else self.conv1d_bias[...]
        xBC_BxLxX = conv_silu(zxbcdt[..., I:2 * I + 2 * G * N], self.conv1d_kernel[...], bias,
                              seq_idx_BxL)
        dt_BxLxH = zxbcdt[..., 2 * I + 2 * G * N:]
        x_BxLxHxP = xBC_BxLxX[..., :I].reshape(Bsz, L, H, P)
        B_BxLxGxN = xBC_BxLxX[..., I:I + G * N].reshape(Bsz, L, G, N)
        C_BxLxGxN = xBC_BxLxX[..., I + G * N:].reshape(Bsz, L, G, N)
        A_H = -jnp.exp(self.A_log[...])
        y_BxLxHxP, _ = ssd(x_BxLxHxP, dt_BxLxH, A_H, B_BxLxGxN, C_BxLxGxN, self.D[...],
                           self.dt_bias[...], None, seq_idx_BxL, chunk_size=cfg.chunk_size,
                           impl=cfg.ssm_impl)
        y_BxLxI = gated_rms_norm(y_BxLxHxP.reshape(Bsz, L, I), z_BxLxI, self.norm.scale[...],
                                 self.norm.eps, dtype, self.norm.groups, cfg.norm_impl)
        return linear(self.out_proj, y_BxLxI, dtype)


# The mixer's elementwise chains, each recomputed in the backward from its inputs (which
# are saved anyway: matmul outputs). Saving their insides would keep several fp32
# [B, L, d_inner] arrays a layer (a 16-layer moe_1b step at batch 8 without remat: ~12 GiB
# of the gated norm's alone); recomputing them is a few elementwise passes. mamba_ssm's
# fused kernels do the same in their backward.

def causal_conv1d(xBC_BxLxX, w_KxX, bias_X=None, seq_idx_BxL=None):
    """Depthwise causal conv1d: out[t] = sum_k w[k] * in[t - (K-1) + k] (+ bias). With
    seq_idx, inputs from another document than token t's count as zero (as before the
    sequence's start)."""
    K, L = w_KxX.shape[0], xBC_BxLxX.shape[1]
    padded = jnp.pad(xBC_BxLxX, [(0, 0), (K - 1, 0), (0, 0)])
    w_KxX = w_KxX.astype(xBC_BxLxX.dtype)
    if seq_idx_BxL is None:
        out = sum(padded[:, k:k + L] * w_KxX[k] for k in range(K))
    else:
        seg_BxL = segments(seq_idx_BxL)
        seg_pad = jnp.pad(seg_BxL, [(0, 0), (K - 1, 0)], constant_values=-1)
        out = sum(jnp.where((seg_pad[:, k:k + L] == seg_BxL)[..., None],
                            padded[:, k:k + L] * w_KxX[k], 0) for k in range(K))
    if bias_X is not None:
        out = out + bias_X.astype(out.dtype)
    return out


@jax.checkpoint
def conv_silu(xBC_BxLxX, w_KxX, bias_X=None, seq_idx_BxL=None):
    """SiLU(causal_conv1d(...)), recomputed in the backward."""
    return jax.nn.silu(causal_conv1d(xBC_BxLxX, w_KxX, bias_X, seq_idx_BxL))


def gated_rms_norm(y_BxLxI, z_BxLxI, scale_I, eps, dtype, groups, impl: str = "xla"):
    """gated_rms_norm_xla, or with impl "pallas" its kernel twin where the groups' width fits
    it (kernels/norm_pallas.py)."""
    I = y_BxLxI.shape[-1]
    if impl == "pallas" and norm_pallas.fits(y_BxLxI.size // I, I // groups):
        return norm_pallas.gated_rms_norm(y_BxLxI, z_BxLxI, scale_I, eps, dtype, groups)
    return gated_rms_norm_xla(y_BxLxI, z_BxLxI, scale_I, eps, dtype, groups)


@functools.partial(jax.checkpoint, static_argnums=(3, 4, 5))
def gated_rms_norm_xla(y_BxLxI, z_BxLxI, scale_I, eps, dtype, groups):
    """mamba_ssm's gated RMSNorm with norm_before_gate=False, norm(y * silu(z)), in fp32;
    recomputed in the backward."""
    gated = y_BxLxI.astype(jnp.float32) * jax.nn.silu(z_BxLxI.astype(jnp.float32))
    return rms_norm(gated, scale_I, eps, dtype, groups)


class GatedMLP(nnx.Module):
    """mamba_ssm's GatedMLP (SwiGLU): fc2(silu(gate) * up), fc1 producing [up, gate].
    Hidden size d_intermediate unless given (the MoE's shared experts pass theirs)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, out_scale: float = 1.0,
                 hidden: int | None = None):
        self.cfg = cfg
        self.hidden = F = hidden or cfg.d_intermediate
        self.fc1 = dense(rngs, cfg.d_model, 2 * F, use_bias=cfg.bias)
        self.fc2 = dense(rngs, F, cfg.d_model, scale=out_scale, use_bias=cfg.bias)

    def __call__(self, x_BxLxD):
        dtype = jnp.dtype(self.cfg.dtype)
        up_gate = linear(self.fc1, x_BxLxD, dtype)
        F = self.hidden
        return linear(self.fc2, up_gate[..., :F] * jax.nn.silu(up_gate[..., F:]), dtype)
