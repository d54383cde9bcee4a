"""How kernel outputs and cotangents vary across shard_map's mesh axes ('vma' typing).

Inside `jax.shard_map` with vma checking (the default), every value carries the set of mesh
axes over which it may differ between devices. A Pallas kernel cannot infer that set, so:
- Triton/interpret `pallas_call`s must be told it through their out_shape: an output depends
  on every input, so it varies wherever any input does (`out_struct`).
- Mosaic GPU kernels switch the check off and return values typed as the same on every
  device, although they are per device (`to_varying` restores the type).
- A custom VJP's backward must return each cotangent typed like its primal: an input that is
  the same on every device of an axis (a replicated parameter) was implicitly broadcast to the
  per-device computation, whose transpose is a sum over that axis (`cotangent_like`).
Outside shard_map every set is empty and all three are no-ops.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import ManualAxisType


def varying_axes(*arrays) -> frozenset:
    """The mesh axes over which any of `arrays` (pytrees allowed) may differ per device."""
    axes = frozenset()
    for a in jax.tree.leaves(arrays):
        axes |= jax.typeof(a).manual_axis_type.varying
    return axes


def out_struct(shape, dtype, axes: frozenset) -> jax.ShapeDtypeStruct:
    """A pallas_call out_shape entry that varies over `axes`."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType(varying=axes))


def to_varying(x, axes: frozenset):
    """Types `x` as varying over `axes` (a type annotation only: no data moves)."""
    missing = tuple(sorted(axes - jax.typeof(x).manual_axis_type.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def cotangent_like(ct, primal):
    """Gives a cotangent its primal's type: summed over the axes where only the cotangent
    varies (transpose of the implicit broadcast), marked varying where only the primal does."""
    return typed_like(ct, jax.typeof(primal).manual_axis_type.varying)


def typed_like(ct, axes: frozenset):
    """cotangent_like for a primal known only by the axes it varies over."""
    have = jax.typeof(ct).manual_axis_type.varying
    if have - axes:
        ct = jax.lax.psum(ct, tuple(sorted(have - axes)))
    return to_varying(ct, axes)


def untyped(x):
    """A copy of x typed as the same on every device although it is per device.

    For CPU stand-ins only. Pallas' interpret mode cannot run on typed values inside
    shard_map (jax 0.11.2: its HLO interpreter evaluates the kernel body, traced on untyped
    blocks, on typed ones, and rejects the kernel's own loops: "Scan carry input and output
    got mismatched varying manual axes"); and a stand-in for a Mosaic GPU kernel must return
    what that kernel returns. A host callback's result carries exactly the type it is given,
    whatever later transformations do, so an identity callback drops the type for good.
    """
    if not jax.typeof(x).manual_axis_type.varying:
        return x
    return jax.pure_callback(np.asarray, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
