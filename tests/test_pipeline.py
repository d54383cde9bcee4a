"""Every pipeline layout equals the single-device model: loss, metrics and all gradients."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba import model
from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
from jmamba.data import recall_batch
from jmamba.parallel import layout as lay
from jmamba.parallel.mesh import make_mesh
from jmamba.parallel.pipeline import make_pipeline_loss
from jmamba.parallel.setup import build, param_bytes_per_device, pipeline_loss

MODEL = ModelConfig(d_model=16, n_layer=8, vocab_size=40, headdim=8, d_state=8, chunk_size=8,
                    n_experts=4, top_k=2, d_expert=16)
TRAIN = TrainConfig(batch_size=8, seq_len=24, n_pairs=4)


def make_cfg(pp, M=4, schedule="gpipe", split="", comm="pair", tied=True, virtual=2,
             loss_chunks=1, scan=None):
    return validate(Config(
        model=dataclasses.replace(MODEL, tie_embeddings=tied, loss_chunks=loss_chunks,
                                  scan_layers=scan),
        train=TRAIN,
        parallel=ParallelConfig(pp=pp, microbatches=M, pp_schedule=schedule, pp_split=split,
                                pp_comm=comm, pp_virtual=virtual)))


def the_batch():
    return {k: jnp.asarray(v) for k, v in recall_batch(0, 0, 8, 24, 40, 4).items()}


@pytest.fixture(scope="module")
def reference():
    """Single-device loss, metrics and gradients for tied and untied models."""
    out = {}
    for tied in (True, False):
        m = dataclasses.replace(MODEL, tie_embeddings=tied)
        params = model.init_params(m, jax.random.key(0))
        (loss, metrics), grads = jax.jit(jax.value_and_grad(
            lambda p: model.loss_fn(p, the_batch(), m), has_aux=True))(params)
        out[tied] = params, loss, metrics, grads
    return out


LAYOUTS = [  # pp = 1 with microbatches runs in test_kernels_in_shard_map.py
    # pp, microbatches, schedule, split, comm, tied, loss_chunks (the reference: 1), and
    # scan_layers (False: 1F1B's stages unrolled, with padded stages' skipped layers)
    (2, 4, "1f1b", "3,5", "sum", True, 5, None),
    (4, 4, "1f1b", "1,3,3,1", "pair", False, 1, False),
    (4, 8, "gpipe", "", "sum", True, 1, None),
    # circular at pp = 4 runs in test_pp_ep.py ((4, 2, 4), even split); here an uneven one
    (2, 2, "circular", "1,3,3,1", "pair", False, 4, None),
]


@pytest.mark.parametrize("pp,M,schedule,split,comm,tied,loss_chunks,scan", LAYOUTS)
def test_pipeline_equals_single_device(reference, pp, M, schedule, split, comm, tied,
                                       loss_chunks, scan, monkeypatch):
    params, loss_ref, metrics_ref, grads_ref = reference[tied]
    cfg = make_cfg(pp, M, schedule, split, comm, tied, loss_chunks=loss_chunks, scan=scan)
    layout = lay.StageLayout.from_config(cfg)
    loss_fn = pipeline_loss(cfg, layout, make_mesh(pp, 1))
    chunked, real = [], model.linear_token_losses
    monkeypatch.setattr(model, "linear_token_losses",
                        lambda *a: chunked.append(a[4]) or real(*a))
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if schedule == "1f1b":  # the stages' layer loops unrolled exactly when asked
        jaxpr = str(jax.make_jaxpr(value_and_grad)(lay.to_stage(params, layout), the_batch()))
        # the layer loops of the forward and of the recompute unrolled, or neither
        unrolled = set(re.findall(rf"reverse=(\w+)\s+unroll={layout.ymax}\b", jaxpr))
        assert unrolled == ({"False", "True"} if scan is False else set())
    (loss, metrics), grads = jax.jit(value_and_grad)(lay.to_stage(params, layout), the_batch())
    assert set(chunked) == ({loss_chunks} if loss_chunks > 1 else set())  # the chunked head ran
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for key in ("ce", "aux_loss", "z_loss", "accuracy"):
        np.testing.assert_allclose(metrics[key], metrics_ref[key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(metrics["expert_counts"], metrics_ref["expert_counts"])
    grads = lay.tie_gradients(grads, layout)
    # The tied copies' gradient norm counts the shared table once, like one device.
    sq_ref = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads_ref))
    np.testing.assert_allclose(float(lay.unique_sq_norm(grads, layout)), sq_ref, rtol=1e-4)
    grads = lay.to_canonical(grads, layout)
    flat_ref = jax.tree_util.tree_flatten_with_path(grads_ref)[0]
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(flat_ref)
    for (path, g_ref), g in zip(flat_ref, flat):
        scale = float(jnp.max(jnp.abs(g_ref))) + 1e-12
        np.testing.assert_allclose(g / scale, g_ref / scale, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_relayout_is_lossless(reference):
    params = reference[False][0]
    two, four = make_cfg(2, split="3,5", tied=False), make_cfg(4, schedule="circular",
                                                               tied=False)
    l2, l4 = lay.StageLayout.from_config(two), lay.StageLayout.from_config(four)
    back = lay.to_canonical(lay.to_stage(lay.to_canonical(lay.to_stage(params, l2), l2), l4), l4)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # Same parameters, same loss, whatever the layout.
    losses = [float(make_pipeline_loss(c, l, make_mesh(c.parallel.pp, 1))(
        lay.to_stage(params, l), the_batch())[0]) for c, l in ((two, l2), (four, l4))]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_contiguous_relayout_reshape_equals_the_gather(reference, monkeypatch):
    """A contiguous layout moves stage <-> canonical by reshape; the general gather (its
    twin, forced by marking the layout non-contiguous) gives the same arrays."""
    params = reference[False][0]
    layout = lay.StageLayout.from_config(make_cfg(2, tied=False))
    assert layout.contiguous and not lay.StageLayout.from_config(
        make_cfg(2, split="3,5", tied=False)).contiguous
    fast = lay.to_stage(params, layout)
    fast_back = lay.to_canonical(fast, layout)
    monkeypatch.setattr(lay.StageLayout, "contiguous", property(lambda self: False))
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(lay.to_stage(params, layout))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(fast_back), jax.tree.leaves(lay.to_canonical(fast, layout))):
        np.testing.assert_array_equal(a, b)


def test_layer_rows_keep_global_index():
    layout = lay.StageLayout.from_config(make_cfg(2, split="3,5"))
    np.testing.assert_array_equal(layout.index_VxSxY[0], [[0, 1, 2, -1, -1], [3, 4, 5, 6, 7]])
    layout = lay.StageLayout.from_config(make_cfg(2, schedule="circular"))
    # pipeline order: (repeat 0: stage 0, 1), (repeat 1: stage 0, 1)
    np.testing.assert_array_equal(layout.index_VxSxY, [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])


def test_embedding_only_on_first_stage_head_only_on_last():
    cfg = make_cfg(4, split="1,3,3,1", tied=False)
    run = build(cfg)
    params = run.state.params
    canonical = run.canonical(params)
    table = params["io"]["table"]
    by_stage = {int(np.argwhere(run.mesh.devices == s.device)[0][0]): np.asarray(s.data)
                for s in table.addressable_shards}
    np.testing.assert_array_equal(by_stage[0][0], canonical["embed"]["embedding"])
    np.testing.assert_array_equal(by_stage[3][0], canonical["lm_head"]["kernel"].T)
    for s in (1, 2):  # middle stages hold neither (their slot is an unused zero buffer)
        assert not np.any(by_stage[s])
    # Layer bytes follow the split: every stage holds Ymax = 3 rows of the layer stack.
    per_device = param_bytes_per_device(params)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(canonical["layers"])) // 8 * 3
    for d in run.mesh.devices.flat:
        assert per_device[d.id]["layers"] == layer_bytes


@pytest.mark.parametrize("kw,needle", [
    (dict(pp=3), "parallel.pp"),                       # 8 layers do not split over 3
    (dict(pp=2, split="3,4"), "parallel.pp_split"),    # does not cover all layers
    (dict(pp=2, split="0-4,4-7"), "parallel.pp_split"),  # overlap
    (dict(pp=2, split="0,8"), "parallel.pp_split"),    # empty stage
    (dict(pp=2, split="5"), "parallel.pp_split"),      # wrong number of stages
    (dict(pp=2, M=3), "train.batch_size"),             # 8 rows do not split in 3
    (dict(pp=4, M=2, schedule="circular"), "parallel.microbatches"),
    (dict(pp=16, M=1), "parallel.pp"),                 # more stages than layers
])
def test_bad_splits_rejected(kw, needle):
    with pytest.raises(ValueError, match=needle):
        make_cfg(**kw)


def test_more_stages_than_devices_rejected():
    with pytest.raises(ValueError, match="parallel.pp"):
        make_mesh(4, 4)




def test_sum_transfer_is_exact_in_bf16():
    """pp_comm=sum sends hidden + residual, which enters the next stage as its residual
    (hidden = 0): the first block adds them anyway, so bf16 compute gives the same numbers
    as sending the pair."""
    m = dataclasses.replace(MODEL, dtype="bfloat16", n_layer=4)
    params = model.init_params(m, jax.random.key(1))
    out = {}
    for comm in ("sum", "pair"):
        cfg = validate(Config(model=m, train=TRAIN,
                              parallel=ParallelConfig(pp=2, microbatches=2, pp_comm=comm)))
        layout = lay.StageLayout.from_config(cfg)
        vg = jax.value_and_grad(pipeline_loss(cfg, layout, make_mesh(2, 1)), has_aux=True)
        out[comm] = jax.jit(vg)(lay.to_stage(params, layout), the_batch())
    (loss_s, _), g_s = out["sum"]
    (loss_p, _), g_p = out["pair"]
    np.testing.assert_allclose(loss_s, loss_p, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_p)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        np.testing.assert_allclose(a / scale, b / scale, atol=1e-5)
