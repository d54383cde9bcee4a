"""Builds the jitted train step and initial state for any (pp, ep) layout.

One device without microbatches runs model.loss_fn on the canonical parameters; every other
layout runs the pipeline on stage-stacked parameters placed by the sharding table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jmamba import model
from jmamba.kernels.grouped_matmul import grouped_matmul
from jmamba.moe import moe_dropless
from jmamba.optim import lr_schedule, make_optimizer
from jmamba.parallel.ep import make_ep_experts_fn
from jmamba.parallel.layout import (StageLayout, stage_leaf, tie_gradients, to_canonical,
                                    to_stage, unique_sq_norm)
from jmamba.parallel.mesh import (canonical_layer_shardings, make_mesh, shardings, spec,
                                  spread_shardings, stage_param_specs)
from jmamba.parallel.pipeline import make_pipeline_loss
from jmamba.parallel.pipeline_1f1b import make_1f1b_loss
from jmamba.step import TrainState, init_state, make_train_step


@dataclasses.dataclass
class Training:
    step_fn: Callable  # jitted (state, batch) -> (state, metrics), donates state
    state: TrainState
    canonical: Callable  # stage-layout params -> canonical params (identity on one device)
    mesh: Any = None
    layout: StageLayout | None = None
    batch_sharding: Any = None  # the [B, ...] batch split over 'ep' (None: one device)
    # jitted (params, batch) -> (loss, metrics), forward only: validation (evaluate.py)
    eval_fn: Callable | None = None
    # remat -> the jitted step under that --remat (driver.compile_step's fallback)
    step_for: Callable[[str], Callable] | None = None


# What `--remat auto` tries, fastest first (driver.compile_step keeps the first that fits).
AUTO_REMATS = ("none", "full")


def remat_choices(cfg, backend: str | None = None) -> tuple[str, ...]:
    """The --remat values to try in order (driver.compile_step keeps the first that fits).

    Not auto: that value. Auto: none where --remat does not change the step (1F1B
    recomputes each layer whatever --remat says); full for scanned layers on a GPU (the scan
    stacks each layer's residuals, which cost more than recomputing them: docs/benchmarks.md,
    issue 17); otherwise none, then full if none does not fit."""
    p = cfg.parallel
    if p.remat != "auto":
        return (p.remat,)
    if uses_1f1b(cfg):
        return ("none",)
    if scans_layers(cfg, backend) and (backend or jax.default_backend()) != "cpu":
        return ("full",)
    return AUTO_REMATS


def scans_layers(cfg, backend: str | None = None) -> bool:
    """What `--scan_layers auto` (None) means for cfg's layout: unrolled layers on one GPU
    (one device, one microbatch), the scan everywhere else. On 2 x H200 (docs/benchmarks.md,
    fourteenth session) moe_1b's one-GPU step unrolled without remat took 200.4 ms against
    257.9 scanned with full remat, and compiled in 36 s against 15; at ep=2 unrolled it
    compiled in 187 s against 45 and took 87.5 GB against 26.7 for 3% less time. The CPU
    (tests, demos) keeps the scan it always ran: unrolled is not measured faster there."""
    if cfg.model.scan_layers is not None:
        return cfg.model.scan_layers
    return not (is_single_device(cfg) and (backend or jax.default_backend()) != "cpu")


def with_layer_stack(cfg, backend: str | None = None):
    """cfg with `--scan_layers auto` settled for its layout (scans_layers)."""
    scan = scans_layers(cfg, backend)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=scan))


def with_remat(cfg, remat: str):
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, remat=remat))


def experts_fn_for(cfg):
    """Local dropless experts at ep = 1; the ep all-to-all dispatch otherwise (with
    --ep_overflow redo one round that counts what did not fit; see redo_cfg)."""
    m, p = cfg.model, cfg.parallel
    if p.ep == 1 or m.mlp != "moe":
        return moe_dropless
    one_round = p.ep_overflow == "redo"
    return make_ep_experts_fn(m.n_experts, p.ep, "ep", p.ep_capacity_factor, p.ep_dispatch,
                              matmul=functools.partial(grouped_matmul, impl=p.ep_matmul),
                              dropless=p.ep_dropless and not one_round, chunks=p.ep_chunks,
                              later_matmul=functools.partial(
                                  grouped_matmul, impl=p.ep_matmul,
                                  xla_products=p.ep_later_rounds_xla),
                              merge_rounds=p.ep_merge_rounds,
                              recompute_rounds=p.ep_rounds_grad == "recompute")


def redo_cfg(cfg):
    """With --ep_overflow redo: the config of the step's second computation, one exchange
    round at capacity ep (every copy fits, whatever the routing); None otherwise. (The
    config check allows redo only at ep > 1 with an MoE.)"""
    p = cfg.parallel
    if p.ep_overflow != "redo":
        return None
    return dataclasses.replace(cfg, parallel=dataclasses.replace(
        p, ep_overflow="rounds", ep_capacity_factor=float(p.ep)))


def attention_for_layout(cfg):
    """cfg with `--attn_impl auto` made 'xla' where ep > 1: XLA (jax 0.11.2) crashed
    compiling cuDNN attention inside the expert-parallel program (hybrid_demo at (1,2,1)
    on 2 x H200, a segfault in backend compile, 3 of 3 tries), while (2,1,2) compiled and
    matched one device. Explicit 'cudnn' is refused there by the config check."""
    m = cfg.model
    if cfg.parallel.ep > 1 and m.attn_impl == "auto" and m.attn_layer_idx:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, attn_impl="xla"))
    return cfg


def pipeline_loss(cfg, layout: StageLayout, mesh) -> Callable:
    """The pipelined loss of cfg's schedule: loss_fn(stage_params, batch) -> (loss, metrics).

    One stage and one microbatch have no schedule to choose: the loss is then plain autodiff
    under --remat (the GPipe loop of one iteration), not 1F1B's per-layer recompute, which
    repeats every layer's exchange whatever --remat keeps."""
    cfg = attention_for_layout(cfg)
    make = make_1f1b_loss if uses_1f1b(cfg) else make_pipeline_loss
    return make(cfg, layout, mesh, experts_fn_for(cfg))


def uses_1f1b(cfg) -> bool:
    p = cfg.parallel
    return p.pp_schedule == "1f1b" and not (p.pp == 1 and p.microbatches == 1)


def is_single_device(cfg) -> bool:
    p = cfg.parallel
    return p.pp == 1 and p.ep == 1 and p.microbatches == 1


def build(cfg, params=None, abstract: bool = False) -> Training:
    """Initial state (fresh parameters unless given canonical ones) and the jitted step.

    abstract: the state is only its shapes, dtypes and shardings (ShapeDtypeStructs), for a
    run about to restore a checkpoint: no memory goes to parameters it would overwrite."""
    cfg = with_layer_stack(cfg)
    m, t, p = cfg.model, cfg.train, cfg.parallel
    optimizer = make_optimizer(t)
    # Jitted at every layout, so a fresh run draws the same values whatever its layout
    # (eager and jitted draws differ in the last bit).
    init = jax.jit(functools.partial(model.init_params, m, jax.random.key(t.seed)))
    first_remat = remat_choices(cfg)[0]
    if is_single_device(cfg):
        if params is None:
            params = jax.eval_shape(init) if abstract else init()

        def step_for(remat):
            loss = functools.partial(model.loss_fn, cfg=m, remat=remat)
            return jax.jit(make_train_step(loss, optimizer, lr_schedule(t), t.grad_clip,
                                           skip_nonfinite=t.skip_nonfinite,
                                           bias_rate=m.router_bias_rate),
                           donate_argnums=0)
        if abstract:
            one = SingleDeviceSharding(jax.devices()[0])
            state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                                 jax.eval_shape(functools.partial(init_state,
                                                                  optimizer=optimizer), params))
        else:
            state = init_state(params, optimizer)
        return Training(step_for(first_remat), state, lambda x: x,
                        eval_fn=jax.jit(functools.partial(model.loss_fn, cfg=m)),
                        step_for=step_for)
    layout = StageLayout.from_config(cfg)
    mesh = make_mesh(p.pp, p.ep)
    staged_params = functools.partial(_staged_params, init, layout)
    stage_shape = jax.eval_shape(staged_params, params)
    param_sh = shardings(mesh, stage_param_specs(stage_shape))
    replicated = NamedSharding(mesh, P())
    state_shape = jax.eval_shape(functools.partial(init_state, optimizer=optimizer),
                                 stage_shape)
    state_sh = TrainState(
        replicated, param_sh,
        optax.tree_map_params(optimizer, lambda _, s: s, state_shape.opt_state, param_sh,
                              transform_non_params=lambda _: replicated))
    if abstract:
        state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                             state_shape, state_sh)
    else:
        state = sharded_init(init, layout, mesh, optimizer, state_sh)(params)
    batch_sh = NamedSharding(mesh, spec("batch"))

    redo = redo_cfg(cfg)

    def step_for(remat):
        step = make_train_step(pipeline_loss(with_remat(cfg, remat), layout, mesh), optimizer,
                               lr_schedule(t), t.grad_clip,
                               redo_loss_fn=None if redo is None else pipeline_loss(
                                   with_remat(redo, remat), layout, mesh),
                               fix_grads=functools.partial(tie_gradients, layout=layout),
                               grad_sq_norm=functools.partial(unique_sq_norm, layout=layout),
                               skip_nonfinite=t.skip_nonfinite, ep=p.ep,
                               bias_rate=m.router_bias_rate,
                               layer_rows=functools.partial(stage_leaf, layout=layout))
        return jax.jit(step, in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, replicated), donate_argnums=0)
    # The pipelined loss without differentiation runs the forward only (GPipe order, for
    # every schedule): the one-device loss.
    # (With --ep_overflow redo, evaluation runs the exchange that never drops.)
    eval_fn = jax.jit(pipeline_loss(with_remat(redo or cfg, "none"), layout, mesh),
                      in_shardings=(param_sh, batch_sh), out_shardings=replicated)
    return Training(step_for(first_remat), state,
                    functools.partial(to_canonical, layout=layout), mesh, layout, batch_sh,
                    eval_fn, step_for)


def _staged_params(init, layout, given):
    return to_stage(init() if given is None else given, layout)


def sharded_init(init, layout: StageLayout, mesh, optimizer, state_sh):
    """The jitted fresh state: given canonical params (or None: draw them with `init`) ->
    the stage-layout TrainState, laid out as state_sh.

    Fresh parameters are drawn inside this one jit, constrained to be split over the mesh
    as drawn (each layer leaf the way its stage form is, where the layout splits like the
    canonical form): with
    jax's partitionable threefry (the default) each device draws only its own share, the
    values equal the one-device init (to the last bit or so), and no device holds the whole
    model. An eager init put all of it, and a copy for the re-layout, on the first GPU."""
    draw_sh = spread_shardings(jax.eval_shape(init), mesh)
    if layout.splits_like_canonical:
        draw_sh["layers"] = canonical_layer_shardings(state_sh.params["layers"], mesh)

    def draw():
        return jax.lax.with_sharding_constraint(init(), draw_sh)

    return jax.jit(lambda given: init_state(_staged_params(draw, layout, given), optimizer),
                   out_shardings=state_sh)


def process_rows(batch_sharding, batch_size: int, devices=None) -> tuple[int, ...]:
    """The global batch rows that this process's devices (or `devices`) hold: the only
    rows its data loader needs to read."""
    if batch_sharding is None:
        return tuple(range(batch_size))
    devices = set(devices if devices is not None else batch_sharding.addressable_devices)
    rows = set()
    for device, index in batch_sharding.devices_indices_map((batch_size,)).items():
        if device in devices:
            rows.update(range(*index[0].indices(batch_size)))
    return tuple(sorted(rows))


def param_bytes_per_device(params) -> dict[int, dict[str, int]]:
    """Bytes each device holds, per top-level group ('layers', 'io', ...)."""
    out: dict[int, dict[str, int]] = {}
    for group, sub in params.items():
        for leaf in jax.tree.leaves(sub):
            for shard in leaf.addressable_shards:
                d = out.setdefault(shard.device.id, {})
                d[group] = d.get(group, 0) + int(np.prod(shard.data.shape)) * leaf.dtype.itemsize
    return out


def io_slot_use(layout: StageLayout) -> list[str]:
    """What each stage's io slot holds (for the per-device bytes report)."""
    names = []
    for s in range(layout.n_slots):
        use = []
        if s == 0:
            use.append("embedding")
        if s == layout.n_slots - 1:
            use.append("head (tied copy)" if layout.tied and layout.n_slots > 1 else "head")
        names.append(" + ".join(use) or "unused")
    return names
