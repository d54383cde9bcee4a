"""The ('pp', 'ep') mesh and the one table that maps logical axes to mesh axes.

Parameters and activations name logical axes; only RULES knows the mesh. shard_map specs
and jit's in/out shardings are both derived from it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("pp", "ep")

# logical axis -> mesh axis (None: replicated)
RULES = {
    "stage": "pp",      # pipeline stages (stage-stacked layers, io slots)
    "experts": "ep",    # one copy of each expert, split over ep
    "batch": "ep",      # tokens are data-parallel over ep
}

# Logical axes of the per-layer trailing dims, by leaf name; all others are replicated.
LEAF_AXES = {
    "w_gate": ("experts", "embed", "mlp"),
    "w_up": ("experts", "embed", "mlp"),
    "w_down": ("experts", "mlp", "embed"),
}


def make_mesh(pp: int, ep: int) -> jax.sharding.Mesh:
    """A (pp, ep) mesh over the first pp * ep devices; explains what to change if too few."""
    n = jax.device_count()
    if pp * ep > n:
        raise ValueError(
            f"config fields 'parallel.pp' x 'parallel.ep' = {pp} x {ep} = {pp * ep} devices, but "
            f"only {n} {jax.default_backend()} device(s) are visible; lower pp or ep (on a CPU "
            f"host train.py simulates enough devices by itself)")
    devices = np.asarray(jax.devices()[:pp * ep]).reshape(pp, ep)
    return jax.sharding.Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def spec(*logical: str | None) -> P:
    return P(*(RULES.get(a) if a else None for a in logical))


def stage_param_axes(stage_params: dict) -> dict:
    """Logical axes of every leaf of the stage-stacked parameters (same tree structure)."""
    def layer_axes(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        rest = LEAF_AXES.get(name, (None,) * (leaf.ndim - 3))
        return ("repeat", "stage", "layers") + rest

    return {
        "layers": jax.tree_util.tree_map_with_path(layer_axes, stage_params["layers"]),
        "io": {"table": ("stage", "vocab", "embed"), "scale": ("stage", "embed")},
    }


def stage_param_specs(stage_params: dict) -> dict:
    axes = stage_param_axes(stage_params)
    return jax.tree.map(lambda a: spec(*a), axes, is_leaf=lambda x: isinstance(x, tuple))


BATCH_AXES = ("microbatch", "batch", "seq")


def shardings(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def spread_shardings(shapes, mesh):
    """Where each canonical array lives on `mesh` while it is drawn, saved or restored: split
    along its first axis that all the mesh's devices divide evenly, so each device holds 1/n
    of it (replicated only where no axis divides: norm scales and the like). No device then
    holds another's share of the state."""
    axes, n = tuple(mesh.axis_names), mesh.size

    def one(x):
        for i, size in enumerate(x.shape):
            if size % n == 0:
                return NamedSharding(mesh, P(*([None] * i), axes))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, shapes)


def canonical_layer_shardings(stage_layer_shardings, mesh):
    """For a layout that splits like the canonical form (StageLayout.splits_like_canonical):
    each canonical layer leaf [L, ...] split the way its stage-stacked form [V=1, S, Y, ...]
    is (layer axis over 'pp', experts over 'ep'), so stage <-> canonical is a reshape on
    each device. Takes the stage leaves' shardings."""
    def layer(sh):
        spec = tuple(sh.spec) + (None,) * max(3 - len(sh.spec), 0)
        return NamedSharding(mesh, P(spec[1], *spec[3:]))

    return jax.tree.map(layer, stage_layer_shardings)
