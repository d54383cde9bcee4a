"""One pallas_call launcher for every Pallas kernel of jmamba (SSD, norms): Triton on GPU,
interpret mode on CPU, with the outputs typed for shard_map (see kernels/vma.py)."""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from jmamba.kernels.vma import out_struct, to_varying, untyped, varying_axes


def typed_call(kernel, grid, in_specs, out_specs, out_shape, *, interpret: bool,
               num_warps: int = 4, num_stages: int = 2, **kw):
    """Returns fn(*args) running `kernel` (its keyword arguments `kw`). Each output depends
    on every argument, so under shard_map it varies over the mesh axes any argument varies
    over."""
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                            num_stages=num_stages)

    def run(*args):
        axes = varying_axes(*args)
        # CPU: interpret mode runs only on untyped copies (see vma.untyped); its outputs are
        # then given the type the GPU path declares.
        declared = frozenset() if interpret else axes
        typed = jax.tree.map(lambda s: out_struct(s.shape, s.dtype, declared), out_shape)
        outs = pl.pallas_call(functools.partial(kernel, **kw), grid=grid, in_specs=in_specs,
                              out_specs=out_specs, out_shape=typed, interpret=interpret,
                              **params)(*(untyped(a) if interpret else a for a in args))
        return jax.tree.map(lambda o: to_varying(o, axes), outs)
    return run
