"""PP x EP on the 2-D ('pp', 'ep') mesh, default settings: loss and gradients equal the
single-device model, no token dropped."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba import model
from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
from jmamba.data import recall_batch
from jmamba.parallel import layout as lay
from jmamba.parallel.mesh import make_mesh
from jmamba.parallel.setup import pipeline_loss

MODEL = ModelConfig(d_model=16, n_layer=8, vocab_size=40, headdim=8, d_state=8, chunk_size=8,
                    n_experts=8, top_k=2, d_expert=16)


def the_batch():
    return {k: jnp.asarray(v) for k, v in recall_batch(1, 0, 8, 24, 40, 4).items()}


def make_cfg(pp, ep, M=2, loss_chunks=1, **settings):
    """Default schedule and EP settings (1f1b; dropless rounds, capacity 1.25 per round)
    unless given."""
    return validate(Config(model=dataclasses.replace(MODEL, loss_chunks=loss_chunks),
                           train=TrainConfig(batch_size=8, seq_len=24, n_pairs=4),
                           parallel=ParallelConfig(pp=pp, ep=ep, microbatches=M, **settings)))


def single_device(model_cfg, batch):
    """Fresh parameters, and the one-device loss, metrics and gradients on `batch`."""
    params = model.init_params(model_cfg, jax.random.key(0))
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: model.loss_fn(p, batch, model_cfg), has_aux=True))(params)
    return params, loss, metrics, grads


@pytest.fixture(scope="module")
def reference():
    return single_device(MODEL, the_batch())


def pipeline_parts(cfg, params):
    """(layout, value_and_grad of the pipelined loss, stage-stacked params) for cfg."""
    layout = lay.StageLayout.from_config(cfg)
    loss_fn = pipeline_loss(cfg, layout, make_mesh(cfg.parallel.pp, cfg.parallel.ep))
    return layout, jax.value_and_grad(loss_fn, has_aux=True), lay.to_stage(params, layout)


def run(cfg, params, batch=None):
    """Pipelined loss, metrics and canonical (tied, unstacked) gradients."""
    layout, value_and_grad, stage_params = pipeline_parts(cfg, params)
    (loss, metrics), grads = jax.jit(value_and_grad)(
        stage_params, the_batch() if batch is None else batch)
    return loss, metrics, lay.to_canonical(lay.tie_gradients(grads, layout), layout)


def assert_grads_match(grads, grads_ref, atol):
    """Every gradient leaf equal to the reference's, relative to its largest entry."""
    for (path, g_ref), g in zip(jax.tree_util.tree_flatten_with_path(grads_ref)[0],
                                jax.tree.leaves(grads)):
        scale = float(jnp.max(jnp.abs(g_ref))) + 1e-12
        np.testing.assert_allclose(g / scale, g_ref / scale, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


# (2, 2, 2) 1F1B runs in test_kernels_in_shard_map.py (kernels, default settings) and, on a
# hybrid stack, in test_attention.py.
# loss_chunks: the chunked head (the reference runs the plain one); (1, 4, 1) also
# exchanges in 2 chunks (--ep_chunks 2; tests/test_ep.py checks the experts alone).
@pytest.mark.parametrize("pp,ep,M,schedule,loss_chunks,ep_chunks", [
    (1, 4, 1, "1f1b", 2, 2), (2, 2, 4, "gpipe", 3, 1), (4, 2, 4, "circular", 1, 1)])
def test_pp_ep_equals_single_device(reference, pp, ep, M, schedule, loss_chunks, ep_chunks,
                                    monkeypatch):
    params, loss_ref, metrics_ref, grads_ref = reference
    chunked, real = [], model.linear_token_losses
    monkeypatch.setattr(model, "linear_token_losses",
                        lambda *a: chunked.append(a[4]) or real(*a))
    loss, metrics, grads = run(make_cfg(pp, ep, M, loss_chunks, pp_schedule=schedule,
                                        ep_chunks=ep_chunks), params)
    assert set(chunked) == ({loss_chunks} if loss_chunks > 1 else set())  # the chunked head ran
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for key in ("ce", "aux_loss", "z_loss"):
        np.testing.assert_allclose(metrics[key], metrics_ref[key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(metrics["expert_counts"], metrics_ref["expert_counts"])
    assert int(metrics["dropped_tokens"]) == 0
    assert_grads_match(grads, grads_ref, atol=1e-5)


def test_autodiff_rounds_equal_single_device(reference):
    """--ep_rounds_grad autodiff (not the default) inside 1F1B's per-layer recompute at
    (2, 2, 2): the one-device loss and gradients (tests/test_ep.py checks the experts
    alone, with later rounds)."""
    params, loss_ref, _, grads_ref = reference
    loss, metrics, grads = run(make_cfg(2, 2, 2, ep_rounds_grad="autodiff"), params)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    assert int(metrics["dropped_tokens"]) == 0
    assert_grads_match(grads, grads_ref, atol=1e-5)


def test_overflow_is_counted_not_hidden(reference):
    params = reference[0]
    _, metrics, _ = run(make_cfg(2, 2, ep_capacity_factor=0.25, ep_dropless=False), params)
    assert int(metrics["dropped_tokens"]) > 0
    assert np.isfinite(float(metrics["ce"]))


def test_bad_ep_layouts_rejected():
    with pytest.raises(ValueError, match="model.n_experts"):
        validate(Config(model=dataclasses.replace(MODEL, n_experts=6),
                        parallel=ParallelConfig(ep=4)))
    with pytest.raises(ValueError, match="train.batch_size"):
        validate(Config(model=MODEL, train=TrainConfig(batch_size=6),
                        parallel=ParallelConfig(ep=4)))
    with pytest.raises(ValueError, match="parallel.ep_dispatch"):
        validate(Config(model=MODEL, parallel=ParallelConfig(ep_dispatch="fast")))
    with pytest.raises(ValueError, match="parallel.ep_chunks.*divide train.seq_len = 24"):
        validate(Config(model=MODEL, train=TrainConfig(seq_len=24, n_pairs=4),
                        parallel=ParallelConfig(ep=2, ep_chunks=5)))
    with pytest.raises(ValueError, match="parallel.ep_chunks.*needs parallel.ep > 1"):
        validate(Config(model=MODEL, parallel=ParallelConfig(ep=1, ep_chunks=2)))


def test_each_process_reads_only_its_devices_rows():
    """The batch is split over 'ep': a process holding ep ranks {0, 1} of 4 needs rows 0-7
    of 16; one holding a whole pipeline stage needs every row; and the microbatch split
    keeps each ep rank inside its own rows (no data moves between devices)."""
    from jax.sharding import NamedSharding
    from jmamba.parallel.mesh import spec
    from jmamba.parallel.pipeline import microbatch
    from jmamba.parallel.setup import process_rows

    mesh = make_mesh(2, 4)
    sharding = NamedSharding(mesh, spec("batch"))
    assert process_rows(sharding, 16) == tuple(range(16))
    assert process_rows(sharding, 16, mesh.devices[:, :2].ravel()) == tuple(range(8))
    assert process_rows(sharding, 16, mesh.devices[:, 3]) == tuple(range(12, 16))
    assert process_rows(sharding, 16, mesh.devices[1]) == tuple(range(16))
    assert process_rows(None, 4) == (0, 1, 2, 3)
    rows_MxB = np.asarray(microbatch({"x": jnp.arange(16)}, 2, ep=4)["x"])
    assert sorted(rows_MxB.ravel()) == list(range(16))
    for e in range(4):
        assert set(rows_MxB[:, 2 * e:2 * e + 2].ravel()) == set(range(4 * e, 4 * e + 4))


@pytest.mark.parametrize("pp,ep,split", [(2, 2, ""), (4, 1, "1,3,3,1")])
def test_fresh_state_is_drawn_sharded_and_equals_the_one_device_init(pp, ep, split):
    """build() draws fresh parameters inside one jit with the layout's shardings (no device
    holds the whole model); the values must equal the one-device fresh state."""
    from jmamba.parallel.setup import build
    cfg = make_cfg(pp, ep, pp_split=split)
    run_ = build(cfg)
    one = build(make_cfg(1, 1, M=1))  # the one-device fresh state
    want = one.state.params
    got = run_.canonical(run_.state.params)
    # Same random bits; the last bit may differ (XLA vectorises the sharded shapes apart).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), got, want)
    # Every layer leaf [V, S, Y, ...] is split over the stages: each device holds one.
    leaf = jax.tree.leaves(run_.state.params["layers"])[0]
    assert leaf.shape[1] == pp
    assert {s.data.shape[1] for s in leaf.addressable_shards} == {1}
    assert len(leaf.addressable_shards) == pp * ep
    # The initializer's per-device footprint (outputs and temporaries) is well under the
    # whole state's: nothing gathers the model onto one device.
    from jmamba.optim import make_optimizer
    from jmamba.parallel.setup import sharded_init
    init = jax.jit(functools.partial(model.init_params, MODEL, jax.random.key(0)))
    state_sh = jax.tree.map(lambda x: x.sharding, run_.state)
    mem = sharded_init(init, run_.layout, run_.mesh, make_optimizer(cfg.train), state_sh).lower(
        None).compile().memory_analysis()
    whole = sum(x.nbytes for x in jax.tree.leaves(run_.state))
    assert mem.output_size_in_bytes + mem.temp_size_in_bytes < 0.6 * whole


def test_validation_loss_is_the_one_device_loss_at_pp_x_ep():
    """Training.eval_fn (the pipeline's forward, no gradient) at (2, 2) with microbatches
    gives the one-device loss and accuracy on the same parameters and held-out batch; the
    Evaluator averages over its batches."""
    from jmamba.data import recall_batch
    from jmamba.evaluate import Evaluator
    from jmamba.parallel.setup import build
    cfg = make_cfg(2, 2)
    pipe = build(cfg)
    one = build(make_cfg(1, 1, M=1), params=pipe.canonical(pipe.state.params))
    held_out = [{k: jnp.asarray(v) for k, v in recall_batch(0, s, 8, 24, 40, 4, "eval").items()}
                for s in range(2)]
    assert not np.array_equal(held_out[0]["inputs"], the_batch()["inputs"])
    got = Evaluator(pipe.eval_fn, held_out)(pipe.state.params)
    want = Evaluator(one.eval_fn, held_out)(one.state.params)
    np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(got["eval_accuracy"], want["eval_accuracy"], atol=1e-6)
    by_hand = [model.loss_fn(one.state.params, b, MODEL)[1]["ce"] for b in held_out]
    np.testing.assert_allclose(want["eval_loss"], np.mean(by_hand), rtol=1e-6)


# --pp_stash residuals against one device: tests/test_kernels_in_shard_map.py ((2, 2, 2) with
# the kernels, packed documents and uneven stages).
def test_residual_stash_needs_a_1f1b_pipeline():
    for parallel in (ParallelConfig(pp=1, pp_stash="residuals"),
                     ParallelConfig(pp=2, microbatches=2, pp_schedule="gpipe",
                                    pp_stash="residuals")):
        with pytest.raises(ValueError, match="parallel.pp_stash.*1f1b"):
            validate(Config(model=MODEL, parallel=parallel))
    with pytest.raises(ValueError, match="parallel.pp_stash"):
        validate(Config(model=MODEL, parallel=ParallelConfig(pp_stash="all")))


def test_full_remat_keeps_the_exchange_and_equals_one_device(reference):
    """`--remat full` at ep=2 keeps what crossed the network, so the backward runs fewer
    all-to-alls than `full_with_comm`, which recomputes it (both with the default
    `--ep_rounds_grad recompute`; the eleventh session checked that it runs as many as
    autodiff's rounds under `full`); both equal one device."""
    params, loss_ref, _, grads_ref = reference
    n_all_to_all = {}
    for key, remat, grad in (("full_with_comm", "full_with_comm", "recompute"),
                             ("full recompute", "full", "recompute")):
        cfg = make_cfg(1, 2, 1, remat=remat, ep_rounds_grad=grad)
        layout, value_and_grad, stage_params = pipeline_parts(cfg, params)
        compiled = jax.jit(value_and_grad).lower(stage_params, the_batch()).compile()
        n_all_to_all[key] = compiled.as_text().count(" all-to-all(")
        (loss, _), grads = compiled(stage_params, the_batch())
        grads = lay.to_canonical(lay.tie_gradients(grads, layout), layout)
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
        assert_grads_match(grads, grads_ref, atol=1e-5)
    assert 0 < n_all_to_all["full recompute"] < n_all_to_all["full_with_comm"], n_all_to_all
