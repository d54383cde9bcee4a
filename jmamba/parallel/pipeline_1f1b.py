"""The 1F1B pipeline schedule: each tick, every stage runs one backward and one forward.

Why by hand: the GPipe loop (pipeline.py) is a forward scan that autodiff reverses, so the
backward of microbatch 0 waits for the forward of the last microbatch and every stage keeps
its layer inputs for all M microbatches. Here the loop computes gradients itself, so a
microbatch's backward runs as soon as its cotangent returns and its stash is freed.

Lockstep schedule over T = M + 2p - 2 ticks (p = pp stages):
    forward  of microbatch i on stage s at tick i + s
    backward of microbatch i on stage s at tick i + 2p - 2 - s
The last stage runs the forward, the head and loss, and the backward of the same microbatch
in one tick; every other stage runs its backward before its forward, so a stage holds the
layer inputs of at most 2p - 2 - 2s microbatches (K = 2p - 2 stash slots on every device,
whatever M is; a layer's input is kept as hidden + residual, which is all a block reads).
A tick costs F + B on the busiest stage; the first p - 1 ticks run only forwards and the
last p - 1 only backwards, so the idle share is (p-1)/(M+p-1), GPipe's.

Each stage keeps only its layers' inputs between forward and backward and recomputes each
layer in the backward (the cost of --remat full, whatever --remat says).

Transfers: both messages of tick t (the forward output and the backward cotangent) move at
the start of tick t + 1, in two ppermutes back to back, so no stage waits in mid-tick for
another's whole tick. (On 2 x H200 at moe_1b shapes this measured the same as sending the
cotangent between the backward and the forward, 3122 vs 3130 ms a step; the waits at the
ppermutes are the stages' unequal work, not the transfer, which takes ~1 ms.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from jmamba import model
from jmamba.moe import moe_dropless
from jmamba.parallel.layout import StageLayout
from jmamba.parallel.mesh import BATCH_AXES, MESH_AXES, spec, stage_param_specs
from jmamba.parallel.pipeline import (_vary, batch_parts, make_pipeline_loss, microbatch,
                                      tied_head_config)


def n_ticks(pp: int, M: int) -> int:
    return M + 2 * pp - 2


def n_slots(pp: int) -> int:
    """Stash slots per device: stage 0 holds 2p - 2 microbatches between its forward and
    backward; the last stage runs both in one tick and needs none (nor does pp = 1)."""
    return 2 * pp - 2


def make_1f1b_value_and_grad(cfg, layout: StageLayout, mesh, experts_fn=moe_dropless):
    """Returns run(stage_params, batch) -> ((loss, metrics), grads): what
    jax.value_and_grad(pipeline loss, has_aux=True) returns, by the 1F1B schedule."""
    m, p = cfg.model, cfg.parallel
    pp, M = layout.pp, p.microbatches
    assert layout.virtual == 1, "1f1b runs one stage per device"
    T, K = n_ticks(pp, M), n_slots(pp)
    counts_S = np.asarray(layout.counts_VxS[0])
    padded = bool((counts_S != layout.ymax).any())
    rows_SxY = jnp.asarray(np.where(layout.index_VxSxY[0] >= 0, layout.index_VxSxY[0],
                                    m.n_layer))
    E = max(m.n_experts, 1)
    fwd_ring = [(j, (j + 1) % pp) for j in range(pp)]
    bwd_ring = [(j, (j - 1) % pp) for j in range(pp)]
    dtype = jnp.dtype(m.dtype)
    res_dtype = jnp.float32 if m.residual_in_fp32 else dtype
    graphdef = model.block_graphdef(m)
    head_cfg = m if m.tie_embeddings else tied_head_config(m)
    moe = m.mlp == "moe"
    residuals = p.pp_stash == "residuals" and pp > 1
    # --scan_layers false: the stages' layer loops fully unrolled (each layer its own code,
    # as on one GPU); the default (auto) scans them.
    unroll = not model.scans(m)
    pull_tree = {}  # the stage pullback's treedef (--pp_stash residuals), set while tracing

    def block(p_y, h, r, seq_BxL, layer_id):
        h, r, a, z, counts_E, dropped = nnx.merge(graphdef, p_y)(h, r, experts_fn, seq_BxL,
                                                                layer_id)
        return (h, r, a, z), (counts_E.astype(jnp.int32), dropped)

    def per_device(layers, io, inputs_MxBxL, targets_MxBxL, mask_MxBxL, seq_MxBxL=None):
        s = lax.axis_index("pp")
        is_first, is_last = s == 0, s == pp - 1
        # Varying from the start, so the loop's gradients stay per device and are summed
        # over the axes a parameter is replicated on once, after the loop.
        layers_Y = _vary(jax.tree.map(lambda a: a[0, 0], layers))
        io = _vary(io)
        Bm, L = inputs_MxBxL.shape[1:]
        n_active = jnp.asarray(counts_S)[s] if padded else None
        js = jnp.arange(layout.ymax)
        n_tokens = lax.psum(jnp.sum(mask_MxBxL.astype(jnp.float32)), "ep")
        n_rows = M * Bm * p.ep
        # d loss / d (nll sum, per-row aux, per-row z) of model.total_loss.
        c_nll = 1.0 / jnp.maximum(n_tokens, 1.0)
        c_aux = (m.aux_loss_coef if moe else 0.0) / (n_rows * m.n_layer)
        c_z = (m.z_loss_coef if moe else 0.0) / (n_rows * m.n_layer)

        def embed(io_, tokens):
            return model.embed({"embedding": io_["table"][0]}, tokens, m)

        def to_pair(msg):
            """A received message -> the stage's (hidden, residual) input."""
            if p.pp_comm == "sum":  # the sum enters as the residual, exactly (h = 0)
                return jnp.zeros(msg.shape, dtype), msg
            return msg[0].astype(dtype), msg[1]

        def to_msg(h, r):
            return (h.astype(res_dtype) + r) if p.pp_comm == "sum" else (h, r)

        def seq_of(i):
            """Microbatch i's document indices (None: one document a row)."""
            return None if seq_MxBxL is None else seq_MxBxL[i]

        def layer_step(c, p_y, j, seq):
            """One layer on the carry (h, r, aux per row, z per row, dropped): ((the new
            carry), the layer's expert counts). A padded stage's missing layers (j past
            its count) pass the carry through."""
            def run(c):
                h, r, aux_B, z_B, dropped = c
                (h2, r2, a, z), (counts_E, d) = block(p_y, h, r, seq, rows_SxY[s, j])
                return (h2, r2, aux_B + a, z_B + z, dropped + d), counts_E

            def skip(c):
                return c, _vary(jnp.zeros((E,), jnp.int32))
            return lax.cond(j < n_active, run, skip, c) if padded else run(c)

        def stage_forward(h, r, seq, stash=None, k=None):
            """Layers of this stage; returns the output pair, the MoE sums and the stash
            with every layer's input written into slot k (pp > 1: in place, one layer at a
            time, so no stage-sized buffer of layer inputs is live next to the stash), or,
            at pp = 1 (no stash), the [Y, ...] layer inputs."""
            def body(carry, xs):
                c, stash = carry
                j, p_y = xs
                h, r = c[:2]
                out = layer_step(c, p_y, j, seq)
                # A block reads its input pair only as h + r (Block.__call__), so that sum,
                # in the residual's dtype, is all the backward needs: 4 bytes an element
                # instead of 6 for bf16 hidden + fp32 residual.
                x = h.astype(res_dtype) + r
                if stash is None:
                    return (out[0], None), (x, out[1])
                stash = lax.dynamic_update_slice(stash, x[None, None], (k, j, 0, 0, 0))
                return (out[0], stash), (None, out[1])

            zB = _vary(jnp.zeros((Bm,), jnp.float32))
            ((h, r, aux_B, z_B, dropped), stash), (inputs_Y, counts_YxE) = lax.scan(
                body, ((h, r, zB, zB, _vary(jnp.zeros((), jnp.int32))), stash),
                (js, layers_Y), unroll=unroll)
            return ((h, r), (jnp.sum(aux_B), jnp.sum(z_B), counts_YxE, dropped),
                    inputs_Y if stash is None else stash)

        def stage_backward(inputs, k, ct_h, ct_r, acc_Y, seq):
            """Per layer, last first: recompute the layer from its stashed input sum and
            pull the cotangent through it. inputs: the stash (pp > 1; slot k, read one layer
            at a time, so no slot-sized copy) or, at pp = 1, this tick's [Y, ...] layer
            inputs. Recomputing at (0, h + r) gives the same outputs and input cotangents as
            at (h, r). Each layer's gradient is added into its row of acc_Y in place (no
            stage-sized gradient buffer per tick). Returns (acc_Y, cotangent of the stage
            input pair)."""
            ones_B = _vary(jnp.ones((Bm,), jnp.float32))
            h0 = _vary(jnp.zeros(pair_shape, dtype))

            def body(carry, xs):
                ct, acc = carry
                j, p_y = xs
                r = inputs[j] if pp == 1 else inputs[k, j]

                def run():
                    _, pull, _ = jax.vjp(lambda *a: block(*a, seq, rows_SxY[s, j]), p_y, h0,
                                         r, has_aux=True)
                    g, ct_h, ct_r = pull((ct[0], ct[1], c_aux * ones_B, c_z * ones_B))
                    acc_new = jax.tree.map(
                        lambda a, g_: lax.dynamic_update_index_in_dim(a, a[j] + g_, j, 0),
                        acc, g)
                    return (ct_h, ct_r), acc_new

                out = lax.cond(j < n_active, run, lambda: (ct, acc)) if padded else run()
                return out, None

            ((ct_h, ct_r), acc_Y), _ = lax.scan(body, ((ct_h, ct_r), acc_Y),
                                                (js, layers_Y), reverse=True,
                                                unroll=unroll)
            return acc_Y, (ct_h, ct_r)

        def stage_fn(layers, h, r, seq):
            """The stage's layers unrolled, as one differentiable function (for
            --pp_stash residuals): ((h, r, aux per row, z per row), (counts_YxE, dropped))."""
            zB = _vary(jnp.zeros((Bm,), jnp.float32))
            carry, counts = (h, r, zB, zB, _vary(jnp.zeros((), jnp.int32))), []
            for j in range(layout.ymax):
                carry, counts_E = layer_step(carry, jax.tree.map(lambda a: a[j], layers), j,
                                             seq)
                counts.append(counts_E)
            h, r, aux_B, z_B, dropped = carry
            return (h, r, aux_B, z_B), (jnp.stack(counts), dropped)

        def pull_of(h, r, seq):
            """The stage's forward outputs and autodiff's pullback (its residuals are the
            pullback's leaves). The document indices are made varying over every axis, as
            the rest of the stage's inputs are, so every leaf that depends on an input
            varies over 'pp' (see _leaf_kind)."""
            seq = None if seq is None else _vary(seq)
            return jax.vjp(lambda L, h, r: stage_fn(L, h, r, seq), layers_Y, h, r,
                           has_aux=True)

        def residual_forward(h, r, seq, stash, k):
            """stage_forward's twin for --pp_stash residuals: the pullback's leaves go into
            slot k of the stash (one buffer per leaf)."""
            (h, r, aux_B, z_B), pull, (counts_YxE, dropped) = pull_of(h, r, seq)
            kept = [leaf for leaf, kind in zip(jax.tree.leaves(pull), pull_tree["kinds"])
                    if kind != CONSTANT]
            stash = [lax.dynamic_update_index_in_dim(buf, _vary(leaf), k, 0)
                     for buf, leaf in zip(stash, kept)]
            return (h, r), (jnp.sum(aux_B), jnp.sum(z_B), counts_YxE, dropped), stash

        def residual_backward(stash, k, ct_h, ct_r, acc_Y):
            """stage_backward's twin for --pp_stash residuals: the pullback rebuilt from slot
            k, no recompute."""
            # Each leaf back with the type autodiff gave it (the slots are typed as varying
            # over every mesh axis): constants (the same on every device, made from no
            # input) are made again, which a fresh trace does (JAX drops the rest of it as
            # dead code); leaves psum'd / pmax'd over ep inside the stage (the same on every
            # ep rank) are pmax'd over those axes, which returns them unchanged.
            fresh = (jax.tree.leaves(pull_of(*zero_pair, seq_of(0))[1])
                     if CONSTANT in pull_tree["kinds"] else None)  # (no stage traced twice)
            slots = iter(buf[k] for buf in stash)
            leaves = [fresh[n] if kind == CONSTANT else
                      (lax.pmax(next(slots), kind) if kind else next(slots))
                      for n, kind in enumerate(pull_tree["kinds"])]
            pull = jax.tree.unflatten(pull_tree["def"], leaves)
            ones_B = _vary(jnp.ones((Bm,), jnp.float32))
            g, ct_h, ct_r = pull((ct_h, ct_r, c_aux * ones_B, c_z * ones_B))
            return jax.tree.map(jnp.add, acc_Y, g), (ct_h, ct_r)

        def head_loss(io_, h, r, targets, mask):
            head_params = {"embed": {"embedding": io_["table"][-1]},
                           "norm_f": {"scale": io_["scale"][-1]}}
            return model.head_losses(head_params, h, r, targets, mask, head_cfg)

        zeros_io = jax.tree.map(jnp.zeros_like, io)
        pair_shape = (Bm, L, m.d_model)
        zero_pair = _vary((jnp.zeros(pair_shape, dtype), jnp.zeros(pair_shape, res_dtype)))
        zero_msg = to_msg(*zero_pair)

        def forward(i, msg, stash=None):
            """Forward of microbatch i: (output pair, MoE sums, stash with its layer inputs
            in slot i mod K; at pp = 1 the layer inputs)."""
            if pp == 1:
                h, r = _vary(embed(io, inputs_MxBxL[i]))
                return stage_forward(h, r, seq_of(i))
            h, r = lax.cond(is_first, lambda: _vary(embed(io, inputs_MxBxL[i])),
                            lambda: _vary(to_pair(msg)))
            if residuals:
                return residual_forward(h, r, seq_of(i), stash, i % K)
            return stage_forward(h, r, seq_of(i), stash, i % K)

        def no_forward(stash):
            zB = jnp.zeros((), jnp.float32)
            return zero_pair, _vary((zB, zB, jnp.zeros((layout.ymax, E), jnp.int32),
                                     jnp.zeros((), jnp.int32))), stash

        def tick(carry, t):
            i_f, i_b = t - s, t - (2 * pp - 2 - s)
            f_valid = (i_f >= 0) & (i_f < M)
            b_valid = (i_b >= 0) & (i_b < M)
            i_f, i_b = jnp.clip(i_f, 0, M - 1), jnp.clip(i_b, 0, M - 1)
            # Last tick's forward output to the next stage, its cotangent to the previous one.
            recv_f, recv_b = carry["send_f"], carry["send_b"]
            if pp > 1:
                recv_f = lax.ppermute(recv_f, "pp", fwd_ring)
                recv_b = lax.ppermute(recv_b, "pp", bwd_ring)
            stash = carry["stash"]
            acc = dict(carry["acc"])

            def record(fout, valid):
                _, (aux, z, counts_YxE, dropped), _ = fout
                w = valid.astype(jnp.float32)
                acc["aux"] = acc["aux"] + w * aux
                acc["z"] = acc["z"] + w * z
                acc["counts"] = acc["counts"].at[rows_SxY[s]].add(counts_YxE * valid)
                acc["dropped"] = acc["dropped"] + dropped * valid

            # 1. Last stage: forward, head and loss, cotangent of the stage output. Its layer
            #    inputs go into its own stash (which it has for SPMD's sake and otherwise
            #    never uses), so its backward reads the stash like every other stage's.
            def last_forward(stash):
                fout = forward(i_f, recv_f, stash)
                (h, r) = fout[0]
                (nll, correct), pull = jax.vjp(
                    lambda io_, h, r: head_loss(io_, h, r, targets_MxBxL[i_f], mask_MxBxL[i_f]),
                    io, h, r)
                g_io, ct_h, ct_r = pull((c_nll * _vary(jnp.ones((), jnp.float32)),
                                         _vary(jnp.zeros((), jnp.float32))))
                return fout, (nll, correct), g_io, (ct_h, ct_r)

            def no_last_forward(stash):
                zero = _vary(jnp.zeros((), jnp.float32))
                return no_forward(stash), (zero, zero), zeros_io, zero_pair

            if pp == 1:
                fout, (nll, correct), g_io, ct_out = last_forward(None)
            else:
                fout, (nll, correct), g_io, ct_out = lax.cond(
                    f_valid & is_last, last_forward, no_last_forward, stash)
                stash = fout[2]
            record(fout, f_valid & is_last)
            acc["nll"], acc["correct"] = acc["nll"] + nll, acc["correct"] + correct
            if pp > 1:  # other stages: the cotangent came back from the next stage
                ct_out = jax.tree.map(lambda a, b: jnp.where(is_last, a, b), ct_out,
                                      to_pair_ct(recv_b))

            # 2. Backward of microbatch i_b (the last stage: the one it just ran forward).
            def backward(acc_Y):
                if pp == 1:
                    acc_Y, (ct_h, ct_r) = stage_backward(fout[2], None, *ct_out, acc_Y,
                                                         seq_of(i_b))
                elif residuals:
                    acc_Y, (ct_h, ct_r) = residual_backward(stash, i_b % K, *ct_out, acc_Y)
                else:
                    acc_Y, (ct_h, ct_r) = stage_backward(stash, i_b % K, *ct_out, acc_Y,
                                                         seq_of(i_b))

                def embed_grads():  # the residual out of the embedding is a constant zero
                    pull = jax.vjp(lambda io_: embed(io_, inputs_MxBxL[i_b])[0], io)[1]
                    return pull(ct_h)[0]

                g_emb = embed_grads() if pp == 1 else lax.cond(is_first, embed_grads,
                                                               lambda: zeros_io)
                return acc_Y, g_emb, to_msg_ct(ct_h, ct_r)

            def no_backward(acc_Y):
                return acc_Y, zeros_io, to_msg_ct(*zero_pair)

            grads = carry["grads"]
            acc_Y, g_emb, ct_in = (backward(grads["layers"]) if pp == 1 else
                                   lax.cond(b_valid, backward, no_backward, grads["layers"]))
            grads = {"layers": acc_Y,
                     "io": jax.tree.map(lambda a, b, c: a + b + c, grads["io"], g_io, g_emb)}

            # 3. Other stages: forward of microbatch i_f into its slot (i_f mod K, which the
            #    backward of i_f - K has freed by now; idle stages write nothing).
            send_f = zero_msg
            if pp > 1:
                # This forward's slot writes must follow the backward's reads of the stash:
                # with no data dependence between them XLA copies the whole stash (K slots
                # x the stage's layer inputs) to let the writes go first. The barrier
                # orders them; holding recv_f keeps this forward after the backward too.
                stash, acc_Y, recv_f = lax.optimization_barrier((stash, grads["layers"],
                                                                 recv_f))
                grads = {"layers": acc_Y, "io": grads["io"]}
                fout = lax.cond(f_valid & ~is_last, lambda st: forward(i_f, recv_f, st),
                                no_forward, stash)
                record(fout, f_valid & ~is_last)
                stash = fout[2]
                send_f = to_msg(*fout[0])
            return {"send_f": send_f, "send_b": ct_in, "stash": stash, "acc": acc,
                    "grads": grads}, None

        def to_msg_ct(ct_h, ct_r):
            """Cotangent of a stage's input pair -> cotangent of the message that made it
            (with 'sum' the hidden input is a fresh zero, so only the residual's counts)."""
            return ct_r if p.pp_comm == "sum" else (ct_h, ct_r)

        def to_pair_ct(ct_msg):
            """Cotangent of a sent message -> cotangent of the (hidden, residual) pair."""
            if p.pp_comm == "sum":
                return ct_msg.astype(dtype), ct_msg
            return ct_msg

        # pp = 1 needs no stash (forward and backward of a microbatch share a tick); at
        # pp > 1 SPMD gives every device the same buffers, and the last stage keeps its
        # current microbatch's layer inputs in its own.
        if residuals:
            # The pullback's structure and leaf shapes, from an abstract trace (no compute).
            def probe():
                pull = pull_of(*zero_pair, seq_of(0))[1]
                pull_tree["def"] = jax.tree.structure(pull)
                return jax.tree.leaves(pull)
            leaves = jax.eval_shape(probe)
            pull_tree["kinds"] = [_leaf_kind(leaf) for leaf in leaves]
            stash0 = [jnp.zeros((K,) + leaf.shape, leaf.dtype)
                      for leaf, kind in zip(leaves, pull_tree["kinds"]) if kind != CONSTANT]
        else:
            stash0 = jnp.zeros((K, layout.ymax) + pair_shape, res_dtype)
        acc0 = {"nll": 0.0, "correct": 0.0, "aux": 0.0, "z": 0.0,
                "counts": jnp.zeros((m.n_layer + 1, E), jnp.int32),
                "dropped": jnp.zeros((), jnp.int32)}
        grads0 = {"layers": jax.tree.map(jnp.zeros_like, layers_Y), "io": zeros_io}
        carry0 = _vary({"send_f": zero_msg, "send_b": to_msg_ct(*zero_pair), "stash": stash0,
                        "acc": acc0, "grads": grads0})
        carry, _ = lax.scan(tick, carry0, jnp.arange(T))
        acc = lax.psum(carry["acc"], ("pp", "ep"))
        loss, parts = model.total_loss(m, acc["nll"], n_tokens, acc["aux"], acc["z"], n_rows)
        metrics = {**parts, "accuracy": acc["correct"] / jnp.maximum(n_tokens, 1.0),
                   "expert_counts": acc["counts"][:m.n_layer], "dropped_tokens": acc["dropped"]}
        grads = {"layers": jax.tree.map(lambda g: g[None, None], carry["grads"]["layers"]),
                 "io": carry["grads"]["io"]}
        return (loss, metrics), grads

    batch_spec = spec(*BATCH_AXES)

    def run(stage_params, batch):
        mbs = microbatch(batch, M, p.ep)
        parts = batch_parts(mbs)
        param_specs = stage_param_specs(stage_params)

        def device_fn(layers, io, *batch_parts):
            out, grads = per_device(layers, io, *batch_parts)
            # Sum each gradient over the mesh axes its parameter is replicated on.
            return out, jax.tree.map(_sum_to_spec, grads,
                                     {"layers": param_specs["layers"], "io": param_specs["io"]})

        fn = jax.shard_map(
            device_fn, mesh=mesh,
            in_specs=(param_specs["layers"], param_specs["io"]) + (batch_spec,) * len(parts),
            out_specs=((P(), P()), {"layers": param_specs["layers"], "io": param_specs["io"]}))
        return fn(stage_params["layers"], stage_params["io"], *parts)

    return run


CONSTANT = "constant"


def _leaf_kind(leaf):
    """How a stage pullback's leaf travels through the --pp_stash residuals slots: ()
    (varying over every mesh axis: stored as is); the axes it is the same on, all of them
    other than 'pp' (made so by a psum / pmax over ep inside the stage: stored, and pmax'd
    over them when read); or CONSTANT (the same on every device: every stage input varies
    over 'pp', so a leaf that does not is made from no input, and is made again)."""
    varying = jax.typeof(leaf).manual_axis_type.varying
    missing = tuple(a for a in MESH_AXES if a not in varying)
    if not missing:
        return ()
    if "pp" not in missing:
        return missing
    if varying:
        raise NotImplementedError(
            f"--pp_stash residuals: a stage residual {leaf.shape} varies over "
            f"{sorted(varying)} only; use the default --pp_stash inputs")
    return CONSTANT


def _sum_to_spec(g, pspec: P):
    named = {a for entry in pspec if entry is not None
             for a in (entry if isinstance(entry, tuple) else (entry,))}
    missing = tuple(a for a in MESH_AXES if a not in named)
    return lax.psum(g, missing) if missing else g


def make_1f1b_loss(cfg, layout: StageLayout, mesh, experts_fn=moe_dropless):
    """loss_fn(stage_params, batch) -> (loss, metrics) whose gradient is the 1F1B loop's.

    Called without differentiation it runs the GPipe forward (same loss, no backward work);
    under jax.grad / value_and_grad the forward rule runs the 1F1B loop, which returns the
    gradients along with the loss, and the backward rule only scales them."""
    forward_only = make_pipeline_loss(cfg, layout, mesh, experts_fn)
    value_and_grad = make_1f1b_value_and_grad(cfg, layout, mesh, experts_fn)

    @jax.custom_vjp
    def loss_fn(stage_params, batch):
        return forward_only(stage_params, batch)

    def fwd(stage_params, batch):
        out, grads = value_and_grad(stage_params, batch)
        return out, (grads, batch)

    def bwd(res, ct):
        grads, batch = res
        ct_loss = ct[0]
        no_ct = jax.tree.map(_zero_cotangent, batch)
        return jax.tree.map(lambda g: (g * ct_loss).astype(g.dtype), grads), no_ct

    loss_fn.defvjp(fwd, bwd)
    return loss_fn


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)
