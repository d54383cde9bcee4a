"""The norms as Pallas kernels, one each way (Triton on GPU, interpret mode on CPU): the
block's residual add + RMSNorm (`add_rms_norm`, twin `layers.add_rms_norm_xla`) and the
mixer's gated RMSNorm (`gated_rms_norm`, twin `layers.gated_rms_norm_xla`; below).
Tests: tests/test_norm_pallas.py. Used with `--norm_impl pallas`.

Why by hand: XLA runs the add, the row reduction and the scaling as separate fusions that
each read the fp32 residual again, forward and backward (the profile by source line in
docs/benchmarks.md: the norms are ~8% of the moe_1b step on one GPU). Here each direction
reads every row once: forward (h, r) -> (y, residual); backward (residual, dy, d residual)
-> (d r, d h, per-program partial sums of d scale, which XLA adds up). The backward
recomputes the row's rms from the saved residual instead of saving it.

Rows are processed in blocks of `block_rows` (a power of two dividing the row count), a
backward program looping over up to 16 of them; the feature width must be a power of two
(Triton's blocks): `fits` says whether it is.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jmamba.kernels.launch import typed_call
from jmamba.kernels.vma import cotangent_like, typed_like

f32 = jnp.float32


def fits(n_rows: int, width: int) -> bool:
    """Whether the kernels take rows of `width`: a power of two from 16 to 4096 (a step
    holds at least one whole row; wider rows would spill registers), and n_rows > 0."""
    return (width & (width - 1)) == 0 and 16 <= width <= 4096 and block_rows(n_rows,
                                                                             width) > 0


def block_rows(n_rows: int, width: int) -> int:
    """Rows a kernel step takes: the largest power of two up to 4096 elements (32 a thread
    at 4 warps; not tuned on a GPU yet) that divides n_rows (0 if n_rows is 0)."""
    rows = max(1, min(16, 4096 // max(width, 1)))
    while rows > 1 and n_rows % rows:
        rows //= 2
    return rows if n_rows > 0 else 0


def program_rows(n_rows: int, rows: int, steps: int = 16) -> int:
    """Rows a backward program loops over (up to `steps` steps of `rows`, dividing n_rows):
    its d scale is one partial sum, so the partial sums XLA adds up are 1/steps as many."""
    while steps > 1 and n_rows % (rows * steps):
        steps //= 2
    return rows * steps


def _fwd_kernel(h_ref, r_ref, w_ref, y_ref, res_ref, *, eps):
    res = h_ref[...].astype(res_ref.dtype) + r_ref[...].astype(res_ref.dtype)
    res_ref[...] = res
    x = res.astype(f32)
    rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    y_ref[...] = (x * rstd * w_ref[...][None, :]).astype(y_ref.dtype)


def _bwd_kernel(res_ref, w_ref, dy_ref, dres_ref, dr_ref, dh_ref, dw_ref, *, eps, rows):
    """`rows` rows at a time over the program's block; d scale summed over the block."""
    w = w_ref[...][None, :]

    def body(i, dw):
        sl = pl.ds(i * rows, rows)
        x = res_ref[sl, :].astype(f32)
        rstd = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
        xhat = x * rstd
        dy = dy_ref[sl, :].astype(f32)
        g = dy * w
        dx = rstd * (g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
        total = dres_ref[sl, :].astype(f32) + dx
        dr_ref[sl, :] = total.astype(dr_ref.dtype)
        dh_ref[sl, :] = total.astype(dh_ref.dtype)
        return dw + jnp.sum(dy * xhat, axis=0)

    dw_ref[...] = jax.lax.fori_loop(0, res_ref.shape[0] // rows, body,
                                    jnp.zeros(dw_ref.shape, f32))


def _specs(rows, width):
    """Block specs over a grid of (row block i, feature group g): rows x width, the group's
    scale, a partial-sum row. The add + norm has one group (grid (n, 1))."""
    block = pl.BlockSpec((rows, width), lambda i, g: (i, g))
    vector = pl.BlockSpec((width,), lambda i, g: (g,))
    partial_sums = pl.BlockSpec((None, width), lambda i, g: (i, g))
    return block, vector, partial_sums


def _forward(h_TxD, r_TxD, w_D, eps, dtype, interpret):
    T, D = h_TxD.shape
    rows = block_rows(T, D)
    block, vector, _ = _specs(rows, D)
    return typed_call(_fwd_kernel, (T // rows, 1), [block, block, vector], [block, block],
                      [jax.ShapeDtypeStruct((T, D), dtype),
                       jax.ShapeDtypeStruct((T, D), r_TxD.dtype)],
                      interpret=interpret, eps=eps)(h_TxD, r_TxD, w_D)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _add_norm(h_TxD, r_TxD, w_D, eps, static):
    return tuple(_forward(h_TxD, r_TxD, w_D, eps, static.dtype, static.interpret))


def _add_norm_fwd(h_TxD, r_TxD, w_D, eps, static):
    y, res = _forward(h_TxD, r_TxD, w_D, eps, static.dtype, static.interpret)
    return (y, res), (res, w_D)


def _add_norm_bwd(eps, static, saved, cts):
    res, w_D = saved
    dy, dres = cts
    T, D = res.shape
    rows = block_rows(T, D)
    per_program = program_rows(T, rows)
    block, vector, partial_sums = _specs(per_program, D)
    dr, dh, dw_parts = typed_call(
        _bwd_kernel, (T // per_program, 1), [block, vector, block, block],
        [block, block, partial_sums],
        [jax.ShapeDtypeStruct((T, D), res.dtype), jax.ShapeDtypeStruct((T, D), static.h_dtype),
         jax.ShapeDtypeStruct((T // per_program, D), f32)],
        interpret=static.interpret, eps=eps, rows=rows)(res, w_D, dy.astype(static.dtype),
                                                        dres.astype(res.dtype))
    # Each cotangent typed like its primal; the scale (a parameter) may be the same on every
    # device where the rows differ, so its cotangent is summed over those axes (vma.py).
    dw = cotangent_like(dw_parts.sum(0).astype(w_D.dtype), w_D)
    return (typed_like(dh, static.h_axes), typed_like(dr, static.r_axes), dw)


_add_norm.defvjp(_add_norm_fwd, _add_norm_bwd)


class _Static(NamedTuple):
    """The kernel pair's static settings (hashable: custom_vjp's nondiff argument)."""
    dtype: jnp.dtype       # of y
    h_dtype: jnp.dtype
    h_axes: frozenset      # the mesh axes h and r vary over (shard_map), for their cotangents
    r_axes: frozenset
    interpret: bool


def add_rms_norm(h, r, scale_D, eps: float, dtype, interpret: bool | None = None):
    """(RMSNorm(h + r) * scale in `dtype`, h + r in r's dtype), the add in r's dtype and
    the norm in fp32, as `layers.add_rms_norm_xla` computes them. h, r: [..., D]."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    D = h.shape[-1]
    static = _Static(jnp.dtype(dtype), h.dtype, jax.typeof(h).manual_axis_type.varying,
                     jax.typeof(r).manual_axis_type.varying, interpret)
    y, res = _add_norm(h.reshape(-1, D), r.reshape(-1, D), scale_D, float(eps), static)
    return y.reshape(h.shape), res.reshape(r.shape)


# The mixer's gated norm: RMSNorm(y * silu(z)) per group of W = I / G features, in fp32
# (mamba_ssm's RMSNormGated with norm_before_gate=False). Twin: layers.gated_rms_norm_xla.
# The backward reads y and z again and recomputes the gate and the group's rms (what the
# twin's jax.checkpoint does, in one kernel).

def _gated_fwd_kernel(y_ref, z_ref, w_ref, o_ref, *, eps):
    z = z_ref[...].astype(f32)
    g = y_ref[...].astype(f32) * (z * jax.nn.sigmoid(z))
    rstd = jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
    o_ref[...] = (g * rstd * w_ref[...][None, :]).astype(o_ref.dtype)


def _gated_bwd_kernel(y_ref, z_ref, w_ref, do_ref, dy_ref, dz_ref, dw_ref, *, eps, rows):
    """`rows` rows at a time over the program's block; d scale summed over the block."""
    w = w_ref[...][None, :]

    def body(i, dw):
        sl = pl.ds(i * rows, rows)
        y, z = y_ref[sl, :].astype(f32), z_ref[sl, :].astype(f32)
        sig = jax.nn.sigmoid(z)
        silu = z * sig
        g = y * silu
        rstd = jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
        ghat = g * rstd
        do = do_ref[sl, :].astype(f32)
        dghat = do * w
        dg = rstd * (dghat - ghat * jnp.mean(dghat * ghat, axis=-1, keepdims=True))
        dy_ref[sl, :] = (dg * silu).astype(dy_ref.dtype)
        dz_ref[sl, :] = (dg * y * (sig * (1.0 + z * (1.0 - sig)))).astype(dz_ref.dtype)
        return dw + jnp.sum(do * ghat, axis=0)

    dw_ref[...] = jax.lax.fori_loop(0, y_ref.shape[0] // rows, body,
                                    jnp.zeros(dw_ref.shape, f32))


class _GatedStatic(NamedTuple):
    dtype: jnp.dtype  # of the output
    groups: int
    y_axes: frozenset
    z_axes: frozenset
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gated(y_TxI, z_TxI, w_I, eps, static):
    T, I = y_TxI.shape
    W = I // static.groups
    rows = block_rows(T, W)
    block, vector, _ = _specs(rows, W)
    return typed_call(_gated_fwd_kernel, (T // rows, static.groups), [block, block, vector],
                      block, jax.ShapeDtypeStruct((T, I), static.dtype),
                      interpret=static.interpret, eps=eps)(y_TxI, z_TxI, w_I)


def _gated_fwd(y_TxI, z_TxI, w_I, eps, static):
    return _gated(y_TxI, z_TxI, w_I, eps, static), (y_TxI, z_TxI, w_I)


def _gated_bwd(eps, static, saved, do):
    y, z, w_I = saved
    T, I = y.shape
    W = I // static.groups
    rows = block_rows(T, W)
    per_program = program_rows(T, rows)
    block, vector, partial_sums = _specs(per_program, W)
    dy, dz, dw_parts = typed_call(
        _gated_bwd_kernel, (T // per_program, static.groups), [block, block, vector, block],
        [block, block, partial_sums],
        [jax.ShapeDtypeStruct((T, I), y.dtype), jax.ShapeDtypeStruct((T, I), z.dtype),
         jax.ShapeDtypeStruct((T // per_program, I), f32)],
        interpret=static.interpret, eps=eps, rows=rows)(y, z, w_I, do.astype(static.dtype))
    dw = cotangent_like(dw_parts.sum(0).astype(w_I.dtype), w_I)
    return typed_like(dy, static.y_axes), typed_like(dz, static.z_axes), dw


_gated.defvjp(_gated_fwd, _gated_bwd)


def gated_rms_norm(y, z, scale_I, eps: float, dtype, groups: int = 1,
                   interpret: bool | None = None):
    """RMSNorm(y * silu(z)) * scale per group, in fp32, output in `dtype`, as
    `layers.gated_rms_norm_xla` computes it. y, z: [..., I]."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    I = y.shape[-1]
    static = _GatedStatic(jnp.dtype(dtype), groups, jax.typeof(y).manual_axis_type.varying,
                          jax.typeof(z).manual_axis_type.varying, interpret)
    out = _gated(y.reshape(-1, I), z.reshape(-1, I), scale_I, float(eps), static)
    return out.reshape(y.shape)
