"""Expert parallelism: each token copy travels to the rank that owns its expert and back.

`make_ep_experts_fn` returns an `experts_fn` (see jmamba/moe.py) meant to run inside
`jax.shard_map` over one mesh axis (default 'ep') of R ranks. Each rank brings its own T
tokens and holds the X = E / R experts [r*X, (r+1)*X): global expert e lives on rank e // X.

Glossary: T tokens on this rank, K top-k, S = T*K token copies, E global experts, R ranks
on the axis, X local experts per rank, C receive-buffer rows, P rows per padded slice (dense
exchange), D d_model, F expert hidden.

Receive buffer and drop rule. Rank r receives into a static buffer of C rows, ordered by
(local expert, source rank, the source's own order: token index, then top-k slot). The first
C copies of that order are kept; the rest are dropped: they add zero to y and are counted by
the rank that sent them. So on an overloaded rank lower local experts win over higher ones,
and for one expert lower source ranks win. Both exchanges below obey this rule exactly.

Dropless rounds (the training default). Instead of dropping, the exchange repeats on the
copies not yet served, each round taking at most C / R rows from each source, until none is
left (a pmax'd count decides, so every rank agrees). Balanced traffic needs one round; the
static bound is ceil(S / (C / R)). The first round moves R slices of C / R rows and computes
C rows, where a one-round dropless buffer would need R * S of each; the second round takes
the smallest of three pair caps (C / R times 1/8, 1/2, 1) that holds what is left.

Two exchanges with the same result:
- "ragged": `jax.lax.ragged_all_to_all` moves exactly the kept rows (GPU/TPU only).
- "dense": each rank sends every other rank a fixed slice of P = min(S, C) rows, zero
  padded, through `jax.lax.all_to_all`, then compacts it into the buffer. It moves up to R
  times more bytes; it is the twin that runs on CPU (XLA:CPU has no ragged-all-to-all).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.lax import ragged_all_to_all

from jmamba.kernels.grouped_matmul import grouped_matmul
from jmamba.moe import (EXCHANGED, combine, inverse_permutation, permute_rows,
                        sort_by_expert, sorted_copies, swiglu_ragged)
from jmamba.parallel import switch_vjp

IMPLS = ("auto", "ragged", "dense")


def check_ep_layout(n_experts: int, ep: int) -> None:
    """Raises ValueError naming the config fields when experts cannot split evenly."""
    if ep < 1:
        raise ValueError(f"config field 'parallel.ep' = {ep}: must be >= 1")
    if n_experts % ep:
        raise ValueError(
            f"config field 'model.n_experts' = {n_experts} is not divisible by "
            f"'parallel.ep' = {ep}: every ep rank must hold the same number of experts; "
            "change model.n_experts or parallel.ep")


def capacity_rows(n_copies: int, capacity_factor: float | None, n_ranks: int) -> int:
    """Receive-buffer rows per rank: ceil(factor * S) rounded up to a multiple of 8.

    factor >= 1 never drops on balanced traffic (each rank then receives exactly S
    copies); None means dropless whatever the routing: R * S rows.
    """
    if capacity_factor is None:
        return n_ranks * n_copies
    return max(8, -(-math.ceil(capacity_factor * n_copies) // 8) * 8)


def _exclusive_cumsum(a):
    return jnp.cumsum(a) - a


class Plan(NamedTuple):
    """Where every slice of copies goes in one round: slice e (sender side) = my copies for
    expert e; slice (r, x) (receiver side) = rank r's copies for my local expert x."""

    send_off_E: jax.Array  # start of my (not yet sent) copies for expert e, sorted order
    send_keep_E: jax.Array  # how many of them its owner takes this round
    land_off_E: jax.Array  # where they land in the owner's buffer
    recv_off_RxX: jax.Array  # where rank r's copies for my expert x start in my buffer
    recv_keep_RxX: jax.Array  # how many of them I take
    home_off_RxX: jax.Array  # where they sit among rank r's sorted copies
    group_sizes_X: jax.Array  # rows per local expert, in buffer order
    send_first_R: jax.Array  # where my copies for rank d sent this round start (sorted order)


def plan_exchange(group_sizes_E, n_ranks: int, capacity: int, axis_name, sent_E=None,
                  pair_rows: int | None = None) -> Plan:
    """Agrees on the buffer layout and the copies left out with two small all_to_alls.

    sent_E: my copies of each expert delivered in earlier rounds (none by default); only the
    rest take part. pair_rows: at most this many rows from one source to one owner (the
    dropless rounds' cap, see make_ep_experts_fn) replaces the C-row cut; R * pair_rows <= C
    must hold. Either way what a source sends an owner is a prefix, in expert order, of its
    copies for that owner not yet sent.
    """
    E, R = group_sizes_E.shape[0], n_ranks
    X = E // R
    S = jnp.sum(group_sizes_E)
    if sent_E is None:
        sent_E = jnp.zeros_like(group_sizes_E)
    start_E = _exclusive_cumsum(group_sizes_E)
    # Offsets are clamped into range for empty slices (a past-the-end offset of a zero-size
    # slice must still be a valid index for ragged_all_to_all).
    send_off_E = jnp.minimum(start_E + sent_E, jnp.maximum(S - 1, 0))
    # 1. Each owner learns how many copies every source has for each of its experts and
    #    where they sit among that source's sorted copies.
    mine_Rx2xX = jnp.stack([(group_sizes_E - sent_E).reshape(R, X), send_off_E.reshape(R, X)],
                           axis=1)
    got_Rx2xX = jax.lax.all_to_all(mine_Rx2xX, axis_name, 0, 0)
    count_RxX, home_off_RxX = got_Rx2xX[:, 0], got_Rx2xX[:, 1]
    # 2. Lay them out expert-major, then by source rank; keep what fits in C rows (or, in
    #    dropless rounds, the first pair_rows of each source, <= C in all).
    count_XxR = count_RxX.T
    if pair_rows is None:
        start_XxR = _exclusive_cumsum(count_XxR.reshape(-1)).reshape(X, R)
        keep_XxR = jnp.clip(capacity - start_XxR, 0, count_XxR)
    else:
        before_XxR = jnp.cumsum(count_XxR, axis=0) - count_XxR
        keep_XxR = jnp.clip(pair_rows - before_XxR, 0, count_XxR)
        start_XxR = _exclusive_cumsum(keep_XxR.reshape(-1)).reshape(X, R)
    recv_off_RxX = jnp.minimum(start_XxR, capacity - 1).T
    recv_keep_RxX = keep_XxR.T
    # 3. Each source learns, per expert, how many copies are kept and where they land.
    reply_Rx2xX = jnp.stack([recv_off_RxX, recv_keep_RxX], axis=1)
    back_Rx2xX = jax.lax.all_to_all(reply_Rx2xX, axis_name, 0, 0)
    send_first_R = start_E.reshape(R, X)[:, 0] + jnp.sum(sent_E.reshape(R, X), axis=1)
    return Plan(send_off_E=send_off_E, send_keep_E=back_Rx2xX[:, 1].reshape(E),
                land_off_E=back_Rx2xX[:, 0].reshape(E), recv_off_RxX=recv_off_RxX,
                recv_keep_RxX=recv_keep_RxX, home_off_RxX=home_off_RxX,
                group_sizes_X=jnp.sum(keep_XxR, axis=1), send_first_R=send_first_R)


def _ragged_there(x_sorted_SxD, plan: Plan, capacity: int, owner_S, axis_name, slice_rows):
    del owner_S, slice_rows
    # zeros_like keeps the per-device (varying) type of shard_map values: the output buffer
    # decides the result's type, and autodiff needs it to match the tokens'.
    out_CxD = jnp.zeros_like(x_sorted_SxD, shape=(capacity, x_sorted_SxD.shape[1]))
    return ragged_all_to_all(x_sorted_SxD, out_CxD, plan.send_off_E, plan.send_keep_E,
                             plan.land_off_E, plan.recv_keep_RxX.reshape(-1),
                             axis_name=axis_name)


def _ragged_back(y_buf_CxD, plan: Plan, owner_S, axis_name, slice_rows, capacity):
    del slice_rows, capacity
    out_SxD = jnp.zeros_like(y_buf_CxD, shape=(owner_S.shape[0], y_buf_CxD.shape[1]))
    return ragged_all_to_all(y_buf_CxD, out_SxD, plan.recv_off_RxX.reshape(-1),
                             plan.recv_keep_RxX.reshape(-1), plan.home_off_RxX.reshape(-1),
                             plan.send_keep_E, axis_name=axis_name)


def _take_rows(a_NxD, idx, valid):
    """a[idx] where valid, zero rows elsewhere (idx clamped so every gather is in range)."""
    rows = a_NxD[jnp.clip(idx, 0, a_NxD.shape[0] - 1)]
    return jnp.where(valid[..., None], rows, jnp.zeros((), a_NxD.dtype))


def _slice_bounds(plan: Plan):
    """Sender side: what I send rank d this round is one contiguous run of my sorted copies
    (a prefix, in expert order, of those not yet sent, which are themselves a suffix of my
    copies for d). Returns (first_R, n_R)."""
    R, X = plan.recv_keep_RxX.shape
    return plan.send_first_R, jnp.sum(plan.send_keep_E.reshape(R, X), 1)


def _dense_there(x_sorted_SxD, plan: Plan, capacity: int, owner_S, axis_name, slice_rows):
    R, X = plan.recv_keep_RxX.shape
    P = slice_rows
    p_P = jnp.arange(P)
    # 1. Pack: slice d holds my kept copies for rank d, zero padded to P rows.
    first_R, n_R = _slice_bounds(plan)
    send_RxPxD = _take_rows(x_sorted_SxD, first_R[:, None] + p_P, p_P < n_R[:, None])
    recv_RxPxD = jax.lax.all_to_all(send_RxPxD, axis_name, 0, 0)
    # 2. Compact: buffer row c falls in slot (x, r) of the expert-major order; inside rank
    #    r's slice, its rows for lower local experts come first.
    keep_XR = plan.recv_keep_RxX.T.reshape(-1)
    end_XR = jnp.cumsum(keep_XR)
    c_C = jnp.arange(capacity)
    slot_C = jnp.minimum(jnp.searchsorted(end_XR, c_C, side="right"), X * R - 1)
    x_C, r_C = slot_C // R, slot_C % R
    before_RxX = jax.vmap(_exclusive_cumsum)(plan.recv_keep_RxX)
    p_C = c_C - (end_XR - keep_XR)[slot_C] + before_RxX[r_C, x_C]
    return jnp.where((c_C < end_XR[-1])[:, None], recv_RxPxD[r_C, jnp.clip(p_C, 0, P - 1)],
                     jnp.zeros((), recv_RxPxD.dtype))


def _dense_back(y_buf_CxD, plan: Plan, owner_S, axis_name, slice_rows, capacity=None):
    del capacity  # (the signature every `back` shares)
    R, X = plan.recv_keep_RxX.shape
    P = slice_rows
    p_P = jnp.arange(P)
    # 3. Pack each source's results in the order it sent them.
    end_RxX = jnp.cumsum(plan.recv_keep_RxX, axis=1)
    x_RxP = jnp.minimum(jax.vmap(lambda e: jnp.searchsorted(e, p_P, side="right"))(end_RxX),
                        X - 1)
    r_R1 = jnp.arange(R)[:, None]
    start_RxX = end_RxX - plan.recv_keep_RxX
    c_RxP = plan.recv_off_RxX[r_R1, x_RxP] + p_P - start_RxX[r_R1, x_RxP]
    back_RxPxD = _take_rows(y_buf_CxD, c_RxP, p_P < end_RxX[:, -1:])
    got_RxPxD = jax.lax.all_to_all(back_RxPxD, axis_name, 0, 0)
    # 4. Unpack: my sorted copy i went to rank d = owner_S[i] as row i - first_R[d] (if
    #    it went this round).
    first_R, n_R = _slice_bounds(plan)
    p_S = jnp.arange(owner_S.shape[0]) - first_R[owner_S]
    return jnp.where(((p_S >= 0) & (p_S < n_R[owner_S]))[:, None],
                     got_RxPxD[owner_S, jnp.clip(p_S, 0, P - 1)],
                     jnp.zeros((), got_RxPxD.dtype))


# The dense exchange's two directions are one partial permutation (each copy to at most one
# buffer row, across ranks) and its transpose: `back` takes each buffer row home to the copy
# it came from. So each direction's backward is the other direction, gathers and one
# all_to_all, where autodiff would transpose the four gathers into scatter-adds (slow on
# GPUs: ~107 ms a step per GPU in the ep=2 trace). Twins: _dense_there and _dense_back
# under plain autodiff (tests/test_ep.py compares them).

def _no_cotangent(plan: Plan):
    return jax.tree.map(lambda _: None, plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 4, 5))
def _dense_there_t(x_sorted_SxD, plan, capacity, owner_S, axis_name, slice_rows):
    return _dense_there(x_sorted_SxD, plan, capacity, owner_S, axis_name, slice_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dense_back_t(y_buf_CxD, plan, owner_S, axis_name, slice_rows, capacity):
    return _dense_back(y_buf_CxD, plan, owner_S, axis_name, slice_rows)


def _there_t_fwd(x_sorted_SxD, plan, capacity, owner_S, axis_name, slice_rows):
    y = _dense_there(x_sorted_SxD, plan, capacity, owner_S, axis_name, slice_rows)
    return y, (plan, owner_S)


def _there_t_bwd(capacity, axis_name, slice_rows, res, ct_CxD):
    plan, owner_S = res
    ct_SxD = _dense_back_t(ct_CxD, plan, owner_S, axis_name, slice_rows, capacity)
    return ct_SxD, _no_cotangent(plan), None


def _back_t_fwd(y_buf_CxD, plan, owner_S, axis_name, slice_rows, capacity):
    return _dense_back(y_buf_CxD, plan, owner_S, axis_name, slice_rows), (plan, owner_S)


def _back_t_bwd(axis_name, slice_rows, capacity, res, ct_SxD):
    plan, owner_S = res
    ct_CxD = _dense_there_t(ct_SxD, plan, capacity, owner_S, axis_name, slice_rows)
    return ct_CxD, _no_cotangent(plan), None


_dense_there_t.defvjp(_there_t_fwd, _there_t_bwd)
_dense_back_t.defvjp(_back_t_fwd, _back_t_bwd)


EXCHANGES = {"ragged": (_ragged_there, _ragged_back),
             "dense": (_dense_there_t, _dense_back_t)}
DENSE_AUTODIFF = (_dense_there, _dense_back)  # the dense exchange's plain twin


class Sent(NamedTuple):
    """What one exchange round sent: its plan, the received buffer (cap rows) and the rows
    of each slice it moved."""
    plan: Plan
    buf_CxD: jax.Array
    slice_rows: int


# Rounds after the first compute on lax.ragged_dot by default: on GPUs (2 x H200, jax
# 0.11.2), with the Hopper kernels there too, ep=2 gradients differed from call to call
# (2.7e-3 of the largest entry after 2 train steps of moe_1b); with round 2 alone on
# lax.ragged_dot, or with the forward and dX products on it everywhere, they repeat, and
# the kernels repeat when run alone on round 2's shapes (docs/benchmarks.md, the ep=2
# gradient repeats). Round 2 carries few rows (a leftover), but lax.ragged_dot computes its
# buffer against every local expert. `--ep_later_rounds_xla` picks the products. By default
# round 2 has no MLP of its own (merge_rounds, below), so this serves rounds 3+ only.
LATER_ROUNDS_MATMUL = functools.partial(grouped_matmul, impl="xla")


def merged_order(g1_X, g2_X, rows_1: int, rows_2: int):
    """Two expert-sorted buffers (rows_1 rows with group sizes g1, then rows_2 with g2, as
    one concatenation) -> (idx, pos): concat[idx] has, per expert x in turn, its g1[x]
    rows of the first buffer and then its g2[x] of the second, the unused rows of both
    after them; pos, idx's inverse, is where each concat row lands. Permutations of
    rows_1 + rows_2."""
    X = g1_X.shape[0]
    n1, n2 = jnp.sum(g1_X), jnp.sum(g2_X)
    begin_X = _exclusive_cumsum(g1_X + g2_X)  # expert x's first merged row

    def position(i, g_X, n, before_X, unused_base):
        x = jnp.minimum(jnp.searchsorted(jnp.cumsum(g_X), i, side="right"), X - 1)
        used = begin_X[x] + before_X[x] + i - _exclusive_cumsum(g_X)[x]
        return jnp.where(i < n, used, unused_base + i - n)
    i1, i2 = jnp.arange(rows_1), jnp.arange(rows_2)
    pos = jnp.concatenate([position(i1, g1_X, n1, jnp.zeros_like(g1_X), n1 + n2),
                           position(i2, g2_X, n2, g1_X, n1 + n2 + rows_1 - n1)])
    return inverse_permutation(pos), pos


def make_ep_experts_fn(n_experts: int, ep: int, axis_name: str = "ep",
                       capacity_factor: float | None = 1.25, impl: str = "auto",
                       matmul=grouped_matmul, dropless: bool = False, chunks: int = 1,
                       later_matmul=LATER_ROUNDS_MATMUL, merge_rounds: bool = True,
                       recompute_rounds: bool = True):
    """An experts_fn for jax.shard_map over `axis_name` (size `ep`); see the module doc.

    It returns (y_TxD fp32, this rank's dropped copies as an int32 scalar: its own token
    copies that the owning rank had no room for; psum over the axis for the total).

    dropless=True never drops: the exchange runs in rounds, each with a buffer of
    C = capacity_factor * S rows per owner and at most C / ep rows from each source, until
    every copy has been served (one round on balanced traffic, at most ceil(ep S / C) on
    any). Each round moves and computes about C rows, not the ep * S of a dropless buffer.

    chunks > 1: the T tokens go as that many consecutive chunks, each exchanged and computed
    by itself (its own buffer of capacity_factor * its copies). Nothing orders one chunk's
    all-to-alls after another's expert matmuls, so XLA may overlap them. Each output row
    depends only on its own copies, so dropless results equal chunks = 1.

    matmul computes round 1's expert MLP, later_matmul every later round's (see
    LATER_ROUNDS_MATMUL); both compute the same function.

    merge_rounds (the default): round 2's rows join round 1's in ONE expert MLP on
    `matmul` (the two received buffers interleaved by local expert, `merged_order`), so a
    layer runs one grouped-matmul call per product on its first two rounds; rounds 3+ on
    later_matmul. Same values. On GPUs a second kernel MLP made ep=2 gradients differ call
    to call, and round 2 on lax.ragged_dot cost 0.48 against 0.62 weak scaling merged
    (docs/benchmarks.md, "Eleventh session"). merge_rounds=False: round 2 on later_matmul.

    recompute_rounds: the rounds' switches are switch_vjp.switch (residuals: the
    inputs; the backward recomputes the branch taken) instead of jax.lax.switch, whose
    gradient zero-fills every other branch's residuals. Same values.
    """
    check_ep_layout(n_experts, ep)
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":  # dense measured faster on H200s at ep=2 (docs/benchmarks.md)
        impl = "dense"
    there, back = EXCHANGES[impl]

    def switch(index, branches, *operands):  # (looked up per call: tests patch lax.switch)
        fn = switch_vjp.switch if recompute_rounds else jax.lax.switch
        return fn(index, branches, *operands)
    X = n_experts // ep

    def chunked_fn(x_TxD, weights_TxK, experts_TxK, w_gate, w_up, w_down, dtype):
        T = x_TxD.shape[0]
        if T % chunks:
            raise ValueError(f"ep chunks: {chunks} does not divide the {T} tokens of a rank")
        n = T // chunks
        outs = []
        for i in range(chunks):
            x_NxD = x_TxD[i * n:(i + 1) * n]
            if outs and jax.default_backend() == "cpu":
                # XLA:CPU runs independent collectives at once and gives every all-to-all
                # one channel id, so two chunks' exchanges collide in its rendezvous (a
                # CHECK failure, or wrong gradients): chain each chunk after the last one,
                # forward and (through the barrier's transpose) backward. Values unchanged.
                x_NxD, _ = jax.lax.optimization_barrier((x_NxD, outs[-1][0]))
            outs.append(experts_fn(x_NxD, weights_TxK[i * n:(i + 1) * n],
                                   experts_TxK[i * n:(i + 1) * n], w_gate, w_up, w_down,
                                   dtype))
        return (jnp.concatenate([y for y, _ in outs]),
                sum(dropped for _, dropped in outs))

    def experts_fn(x_TxD, weights_TxK, experts_TxK, w_gate, w_up, w_down, dtype):
        T, K = experts_TxK.shape
        S = T * K
        if w_gate.shape[0] != X:
            raise ValueError(f"expert weights hold {w_gate.shape[0]} experts on this rank; "
                             f"expected n_experts / ep = {X} (shard their E axis over "
                             f"'{axis_name}')")
        capacity = capacity_rows(S, capacity_factor, ep)
        if dropless and capacity < ep * S:
            pair_rows = max(capacity // ep, 1)  # a source's share of an owner's buffer
            rounds = -(-S // pair_rows)
        else:
            pair_rows, rounds = None, 1
        # 1. Sort my copies by global expert: copies for one rank become contiguous.
        order_S, _, group_sizes_E = sort_by_expert(experts_TxK, n_experts)
        owner_S = experts_TxK.reshape(-1)[order_S] // X
        x_sorted_SxD = sorted_copies(x_TxD.astype(dtype), order_S, K)

        def send(sent_E, pair_cap=pair_rows, keep=False):
            # A round with pair cap p moves slices of p rows into a buffer of ep * p rows;
            # without a cap (one round that may drop), slices of min(S, C) into C rows.
            # keep: name what arrived (the first round's) so `--remat full` saves it rather
            # than exchanging again in the backward; later rounds run inside a switch, whose
            # saved values would be held for every branch, so they are recomputed.
            name = (lambda v: checkpoint_name(v, EXCHANGED)) if keep else (lambda v: v)
            cap_rows = capacity if pair_cap is None else ep * pair_cap
            slice_rows = min(S, capacity) if pair_cap is None else pair_cap
            # 2. Exchange counts; settle where each copy lands and which wait or drop.
            plan = name(plan_exchange(group_sizes_E, ep, cap_rows, axis_name, sent_E,
                                      pair_cap))
            # 3. Send the copies (in the compute dtype) to their experts' ranks.
            buf_CxD = name(there(x_sorted_SxD, plan, cap_rows, owner_S, axis_name,
                                 slice_rows))
            return Sent(plan, buf_CxD, slice_rows)

        def mlp(buf_CxD, group_sizes_X, mm):
            # 4. Local experts on the buffer; rows past the kept ones stay zero.
            return swiglu_ragged(buf_CxD, group_sizes_X, w_gate, w_up, w_down, dtype, mm)

        def receive(y_buf_CxD, sent: Sent):
            # 5. Bring results home (copies not sent this round stay zero).
            return back(y_buf_CxD, sent.plan, owner_S, axis_name, sent.slice_rows,
                        sent.buf_CxD.shape[0])

        def one_round(sent_E, pair_cap=pair_rows, keep=False, mm=later_matmul):
            out = send(sent_E, pair_cap, keep)
            y_SxD = receive(mlp(out.buf_CxD, out.plan.group_sizes_X, mm), out)
            return y_SxD, sent_E + out.plan.send_keep_E

        # Round 2 carries only what round 1 left over, usually a few rows: it runs the
        # smallest pair cap in `caps` that holds the largest leftover of any (source, owner)
        # pair, or skips when nothing is left. Every static size costs its full rows (the
        # grouped-matmul kernel computes padding rows too), so a full-size second round cost
        # about as much as the first on skewed routing. Rounds 3+ run only when a leftover
        # exceeded the full cap, so they keep it (and compile one copy each).
        caps = sorted({min(pair_rows, -(-math.ceil(pair_rows / d) // 8) * 8)
                       for d in (8, 2, 1)}) if rounds > 1 else []

        def pick_cap(sent_E):
            left_RxX = (group_sizes_E - sent_E).reshape(ep, X)
            need = jax.lax.pmax(jnp.max(jnp.sum(left_RxX, axis=1)), axis_name)
            return need, jnp.where(need > 0, 1 + jnp.minimum(
                jnp.searchsorted(jnp.asarray(caps), need), len(caps) - 1), 0)

        if merge_rounds and rounds > 1:
            first = send(jnp.zeros_like(group_sizes_E), keep=True)
            g1_X = first.plan.group_sizes_X
            sent_E = first.plan.send_keep_E

            def alone(sent):
                y1 = mlp(first.buf_CxD, g1_X, matmul)
                return y1, jnp.zeros_like(x_sorted_SxD, dtype=y1.dtype), sent

            def merged(sent, pair_cap):
                second = send(sent, pair_cap)
                g2_X = second.plan.group_sizes_X
                C1 = first.buf_CxD.shape[0]
                idx, pos = merged_order(g1_X, g2_X, C1, second.buf_CxD.shape[0])
                both = permute_rows(jnp.concatenate([first.buf_CxD, second.buf_CxD]), idx,
                                    pos)
                y = permute_rows(mlp(both, g1_X + g2_X, matmul), pos, idx)
                return y[:C1], receive(y[C1:], second), sent + second.plan.send_keep_E
            # (Round 1's results go home outside the switch: inside, the backward's
            # recompute of the branch would exchange them again.)
            y1_buf, y_more, sent_E = switch(
                pick_cap(sent_E)[1], [alone] + [functools.partial(merged, pair_cap=c)
                                                for c in caps], sent_E)
            y_sorted_SxD = receive(y1_buf, first) + y_more
            later = range(1, rounds - 1)
        else:
            y_sorted_SxD, sent_E = one_round(jnp.zeros_like(group_sizes_E), keep=True,
                                             mm=matmul)
            later = range(rounds - 1)

        def skip(sent):
            return jnp.zeros_like(y_sorted_SxD), sent

        for r in later:
            need, pick = pick_cap(sent_E)
            if r == 0:
                y_more, sent_E = switch(
                    pick, [skip] + [functools.partial(one_round, pair_cap=c) for c in caps],
                    sent_E)
            else:
                y_more, sent_E = switch((need > 0).astype(jnp.int32), [skip, one_round],
                                        sent_E)
            y_sorted_SxD = y_sorted_SxD + y_more
        y_sorted_SxD = checkpoint_name(y_sorted_SxD, EXCHANGED)  # every round's results
        dropped = (S - jnp.sum(sent_E)).astype(jnp.int32)
        # 6. Unsort, weight and sum.
        return combine(y_sorted_SxD, order_S, weights_TxK), dropped

    return experts_fn if chunks == 1 else chunked_fn
