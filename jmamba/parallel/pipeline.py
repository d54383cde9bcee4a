"""The pipeline: a shard_map loop over microbatches on the ('pp', 'ep') mesh.

Schedules (Mamba-free; the model pieces come from jmamba.model):
- GPipe: at iteration t, stage s runs microbatch t - s; outputs go to s + 1 by ppermute.
- Circular (virtual stages, v repeats per device): stage s at iteration t runs item
  i = t - s, microbatch (i // (S v)) S + i % S, repeat (i // S) % v. Its output is
  consumed by device s + 1 (ring) at t + 1, so each device stays busy with v-times-smaller
  stages and the bubble falls from (S-1)/(M+S-1) to (S-1)/(vM+S-1).
Embedding runs only on stage 0 (repeat 0), head and loss only on the last stage (last
repeat), each under a lax.cond so other stages neither hold (see layout.py) nor run them.
Stages with fewer layers skip their padding rows with a per-layer cond.

Loss normalisation matches the single-device model exactly: every stage accumulates sums
(masked nll, per-sequence aux and z losses), which are psum'd and divided by global counts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jmamba import model
from jmamba.kernels.vma import to_varying
from jmamba.moe import EXCHANGED, moe_dropless
from jmamba.parallel.layout import StageLayout
from jmamba.parallel.mesh import BATCH_AXES, MESH_AXES, spec, stage_param_specs


# What the loop keeps of each iteration's stage for the backward, by --remat. Without this
# checkpoint, the residuals of the stage (a cond over a scan of layers) include copies of
# per-layer values made inside the loop, kept once per iteration: XLA's estimate for a
# 4-layer, 16-expert model at M=8 fell from 2.49 to 0.94 GB of temporaries with full remat
# (3.37 to 1.85 without), and the step's memory now falls as M grows (docs/benchmarks.md).
_cp = jax.checkpoint_policies
STAGE_POLICIES = {
    "none": _cp.everything_saveable,
    "full": _cp.save_only_these_names(model.LAYER_INPUT, EXCHANGED),
    "full_with_comm": _cp.save_only_these_names(model.LAYER_INPUT),
    "dots": _cp.save_from_both_policies(_cp.save_only_these_names(model.LAYER_INPUT),
                                        _cp.dots_with_no_batch_dims_saveable),
}


def _vary(tree):
    """Marks fresh constants as varying over the mesh, so cond/scan types match shard_map's
    per-device values (shard_map's vma checking keeps psum's transpose exact)."""
    return jax.tree.map(lambda x: to_varying(jnp.asarray(x), frozenset(MESH_AXES)), tree)


def schedule_item(t, s, pp: int, v: int, M: int):
    """(valid, microbatch, repeat) that stage s runs at iteration t."""
    i = t - s
    valid = (i >= 0) & (i < M * v)
    i = jnp.clip(i, 0, M * v - 1)
    return valid, (i // (pp * v)) * pp + i % pp, (i // pp) % v


def n_iterations(pp: int, v: int, M: int) -> int:
    return M * v + pp - 1


def bubble_fraction(pp: int, v: int, M: int) -> float:
    """Idle share of each device's iterations: (S-1)/(vM+S-1)."""
    return (pp - 1) / n_iterations(pp, v, M)


def transfer_bytes(cfg, microbatch_rows: int, seq_len: int) -> int:
    """Bytes one stage sends per microbatch for cfg.parallel.pp_comm."""
    m = cfg.model
    n = microbatch_rows * seq_len * m.d_model
    h_bytes = jnp.dtype(m.dtype).itemsize
    r_bytes = 4 if m.residual_in_fp32 else h_bytes
    return n * (r_bytes if cfg.parallel.pp_comm == "sum" else h_bytes + r_bytes)


def microbatch(batch: dict, M: int, ep: int = 1) -> dict:
    """[B, L] -> [M, B/M, L], where ep rank e holds global rows [e B/ep, (e+1) B/ep) (the
    step's batch sharding, so each process reads only its devices' rows): microbatch m's
    e-th part is rows e B/ep + m B/(M ep) ... + B/(M ep) - 1 of that slice. A local
    reshape on every device, no communication."""
    def split(a):
        B = a.shape[0]
        a = a.reshape((ep, M, B // (M * ep)) + a.shape[1:])
        return jnp.swapaxes(a, 0, 1).reshape((M, B // M) + a.shape[3:])
    return jax.tree.map(split, batch)


def batch_parts(mbs: dict) -> tuple:
    """The per-device loops' batch arguments: inputs, targets, mask, then seq_idx where the
    batch has one (packed documents)."""
    keys = ("inputs", "targets", "mask") + (("seq_idx",) if "seq_idx" in mbs else ())
    return tuple(mbs[k] for k in keys)


def make_pipeline_loss(cfg, layout: StageLayout, mesh, experts_fn=moe_dropless,
                       elide_conds: bool = True):
    """Returns loss_fn(stage_params, batch) -> (loss, metrics), the pipelined twin of
    model.loss_fn, for the stage-stacked parameters of layout.to_stage.

    A lax.cond on a GPU copies its predicate to the host and waits for the device, so the
    loop leaves out every cond whose outcome is known when tracing: the per-layer skip
    when no stage has padding rows, and the stage / embedding / head conds at pp = 1, v = 1.
    elide_conds=False keeps them all (for benchmarks that measure what they cost)."""
    m, p = cfg.model, cfg.parallel
    pp, v, M = layout.pp, layout.virtual, p.microbatches
    # --remat auto is resolved where the step compiles (driver.compile_step); built
    # directly, it is its first choice.
    remat = "none" if p.remat == "auto" else p.remat
    # Static facts that let the loop drop a cond (see the docstring).
    padded = bool((layout.counts_VxS != layout.ymax).any()) or not elide_conds
    one_stage = pp == 1 and v == 1 and elide_conds  # every item valid, first and last
    T = n_iterations(pp, v, M)
    counts_VxS = jnp.asarray(layout.counts_VxS)
    # Global layer row of each stage slot (padding rows go to an extra row n_layer).
    rows_np = np.where(layout.index_VxSxY >= 0, layout.index_VxSxY, m.n_layer)
    rows_VxSxY = jnp.asarray(rows_np)  # (static, as rows_np, with one stage: no mixer cond)
    E = max(m.n_experts, 1)
    ring = [(j, (j + 1) % pp) for j in range(pp)]
    res_dtype = jnp.float32 if m.residual_in_fp32 else jnp.dtype(m.dtype)

    def per_device(layers, io, inputs_MxBxL, targets_MxBxL, mask_MxBxL, seq_MxBxL=None):
        s = lax.axis_index("pp")
        layers_VxY = jax.tree.map(lambda a: a[:, 0], layers)  # this device's stages
        table, scale = io["table"], io["scale"]
        Bm, L = inputs_MxBxL.shape[1:]
        embed_params = {"embedding": table[0]}
        head_params = {"embed": {"embedding": table[-1]}, "norm_f": {"scale": scale[-1]}}
        head_cfg = cfg.model if m.tie_embeddings else tied_head_config(cfg.model)

        def iteration(carry, t):
            recv, acc = carry
            valid, mb, r = schedule_item(t, s, pp, v, M)
            first = (s == 0) & (r == 0)
            last = (s == pp - 1) & (r == v - 1)
            if p.pp_comm == "sum":  # the sum enters as the residual, exactly (h = 0)
                recv = (_vary(jnp.zeros(recv.shape, m.dtype)), recv)
            if one_stage:
                h, res = _vary(model.embed(embed_params, inputs_MxBxL[mb], m))
            else:
                h, res = lax.cond(first,
                                  lambda: _vary(model.embed(embed_params, inputs_MxBxL[mb], m)),
                                  lambda: (recv[0].astype(m.dtype), recv[1]))
            # With one stage per device (v = 1) r is always 0: a static index.
            stage_layers = jax.tree.map(lambda a: a[r] if v > 1 else a[0], layers_VxY)

            def run(h, res):
                return model.run_layers(stage_layers, h, res, m, remat, experts_fn,
                                        n_active=counts_VxS[r, s] if padded else None,
                                        seq_idx_BxL=None if seq_MxBxL is None
                                        else seq_MxBxL[mb],
                                        layer_ids_Y=rows_np[0, 0] if one_stage
                                        else rows_VxSxY[r, s])

            def skip(h, res):
                zB = jnp.zeros((Bm,), jnp.float32)
                return (h, res) + _vary((zB, zB, jnp.zeros((layout.ymax, E), jnp.int32),
                                         jnp.zeros((), jnp.int32)))

            # The stage runs under a checkpoint whose policy keeps what --remat keeps (see
            # STAGE_POLICIES), so the loop's backward gets only those per iteration.
            stage = jax.checkpoint(run if one_stage else
                                   lambda h, res: lax.cond(valid, run, skip, h, res),
                                   policy=STAGE_POLICIES[remat])
            h, res, aux_B, z_B, counts_YxE, dropped = stage(h, res)

            def head():
                return model.head_losses(head_params, h, res, targets_MxBxL[mb],
                                         mask_MxBxL[mb], head_cfg)

            nll, correct = (head() if one_stage else
                            lax.cond(valid & last, head, lambda: _vary((0.0, 0.0))))
            w = valid.astype(jnp.float32)
            counts_rows = jnp.zeros((m.n_layer + 1, E), jnp.int32).at[rows_VxSxY[r, s]].add(
                counts_YxE * valid)
            acc = {"nll": acc["nll"] + nll, "correct": acc["correct"] + correct,
                   "aux": acc["aux"] + w * jnp.sum(aux_B), "z": acc["z"] + w * jnp.sum(z_B),
                   "counts": acc["counts"] + counts_rows,
                   "dropped": acc["dropped"] + dropped * valid}
            send = (h.astype(res_dtype) + res) if p.pp_comm == "sum" else (h, res)
            return (lax.ppermute(send, "pp", ring), acc), None

        shape = (Bm, L, m.d_model)
        recv0 = (jnp.zeros(shape, res_dtype) if p.pp_comm == "sum"
                 else (jnp.zeros(shape, m.dtype), jnp.zeros(shape, res_dtype)))
        acc0 = {"nll": 0.0, "correct": 0.0, "aux": 0.0, "z": 0.0,
                "counts": jnp.zeros((m.n_layer + 1, E), jnp.int32),
                "dropped": jnp.zeros((), jnp.int32)}
        (_, acc), _ = lax.scan(iteration, _vary((recv0, acc0)), jnp.arange(T))
        acc = lax.psum(acc, ("pp", "ep"))
        n_tokens = lax.psum(jnp.sum(mask_MxBxL.astype(jnp.float32)), "ep")
        n_rows = M * Bm * p.ep
        loss, parts = model.total_loss(m, acc["nll"], n_tokens, acc["aux"], acc["z"], n_rows)
        return loss, {**parts, "accuracy": acc["correct"] / jnp.maximum(n_tokens, 1.0),
                      "expert_counts": acc["counts"][:m.n_layer],
                      "dropped_tokens": acc["dropped"]}

    batch_spec = spec(*BATCH_AXES)

    def loss_fn(stage_params, batch):
        parts = batch_parts(microbatch(batch, M, p.ep))
        param_specs = stage_param_specs(stage_params)
        fn = jax.shard_map(
            per_device, mesh=mesh,
            in_specs=(param_specs["layers"], param_specs["io"]) + (batch_spec,) * len(parts),
            out_specs=(P(), P()))
        return fn(stage_params["layers"], stage_params["io"], *parts)

    return loss_fn


@functools.lru_cache(maxsize=None)
def tied_head_config(model_cfg):
    """The head reads its output table from io/table, laid out [V, D] like an embedding."""
    return dataclasses.replace(model_cfg, tie_embeddings=True)
