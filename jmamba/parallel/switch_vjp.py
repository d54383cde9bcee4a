"""`switch`: jax.lax.switch whose gradient recomputes the branch taken.

Why not lax.switch under autodiff: JAX's partial evaluation of a switch makes every branch
return the union of all branches' residuals, each branch filling the slots of the others
with zeros (jax/_src/lax/control_flow/conditionals.py, `_join_cond_outputs`; slots are
shared only between residuals of equal shape). The exchange rounds' branches differ in
buffer rows, so each call wrote zeros for every branch not taken and XLA copied them into
the conditional's outputs: in the ep=2 moe_1b trace on 2 x H200, ~38 ms a step of
device-to-device copies of those sizes plus ~11 ms of zero broadcasts (docs/benchmarks.md,
"Eleventh session"). Here the only residuals are the switch's inputs (the same for every
branch), and the backward is a switch over the branches' VJPs, which recompute their own
forward. Under `--remat full`, with two rounds (ep=2 at the default capacity), the layer's
recompute no longer needs the branch's forward (its outputs only feed the layer's
outputs), so the branch still runs its forward twice; with more rounds the next round's
pick reads the switch's count output, so the recompute also runs the branch's small
count exchange. A remat policy that saves names or dots no longer reaches inside the
branches: they are always recomputed.

Twin: jax.lax.switch (tests/test_switch_vjp.py compares values and gradients).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp


class _Branch(NamedTuple):
    """A branch as a jaxpr whose closed-over arrays are the hoisted inputs at `slots`."""
    jaxpr: Any
    out_tree: Any
    slots: tuple[int, ...]


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def switch(index, branches, *operands):
    """lax.switch(index, branches, *operands); gradients flow to the float operands and to
    float arrays the branches close over. Every array a branch closes over (float or int)
    is hoisted into an explicit input: the backward is traced later, where a closed-over
    tracer of the forward's trace would have escaped."""
    converted, hoisted, seen = [], [], {}
    for branch in branches:
        closed, out_shape = jax.make_jaxpr(branch, return_shape=True)(*operands)
        slots = []
        for c in closed.consts:  # one slot per distinct array (branches share weights)
            if id(c) not in seen:
                seen[id(c)] = len(hoisted)
                hoisted.append(c)
            slots.append(seen[id(c)])
        # (without its consts: they are the forward's tracers, which the backward's
        # equation would otherwise keep alive)
        converted.append(_Branch(closed.with_consts(()), jax.tree.structure(out_shape),
                                 tuple(slots)))
    return _switch(tuple(converted), jnp.asarray(index, jnp.int32), operands, tuple(hoisted))


def _call(branch: _Branch, operands, hoisted):
    consts = [hoisted[i] for i in branch.slots]
    fn = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(branch.jaxpr, consts))
    return jax.tree.unflatten(branch.out_tree, fn(*jax.tree.leaves(operands)))


def _forward(branches, index, operands, hoisted):
    return jax.lax.switch(index, [functools.partial(_call, b) for b in branches],
                          operands, hoisted)


_switch = jax.custom_vjp(_forward, nondiff_argnums=(0,))


def _switch_fwd(branches, index, operands, hoisted):
    return _forward(branches, index, operands, hoisted), (index, operands, hoisted)


def _switch_bwd(branches, res, ct_out):
    index, operands, hoisted = res
    leaves, tree = jax.tree.flatten((operands, hoisted))
    wrt = [i for i, x in enumerate(leaves) if _is_float(x)]
    out_leaves = jax.tree.leaves(ct_out)
    ct_float = [i for i, x in enumerate(out_leaves) if _is_float(x)]  # (not float0)

    def branch_vjp(branch, cts, *floats):
        def f(*floats):
            xs = list(leaves)
            for i, v in zip(wrt, floats):
                xs[i] = v
            outs = jax.tree.leaves(_call(branch, *jax.tree.unflatten(tree, xs)))
            return [outs[i] for i in ct_float]
        return jax.vjp(f, *floats)[1](cts)

    grads = jax.lax.switch(index, [functools.partial(branch_vjp, b) for b in branches],
                           [out_leaves[i] for i in ct_float], *(leaves[i] for i in wrt))
    ct_leaves = [None] * len(leaves)
    for i, g in zip(wrt, grads):
        ct_leaves[i] = g
    ct_operands, ct_hoisted = jax.tree.unflatten(tree, ct_leaves)
    return None, ct_operands, ct_hoisted


_switch.defvjp(_switch_fwd, _switch_bwd)
