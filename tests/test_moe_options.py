"""Aux-loss-free balancing (router bias) and shared experts: the routing rule, the bias
step, and both at a PP x EP layout against one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba import model
from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
from jmamba.data import recall_batch
from jmamba.moe import route
from jmamba.parallel.setup import build
from jmamba.step import bias_step

MODEL = ModelConfig(d_model=16, n_layer=4, vocab_size=40, headdim=8, d_state=8, chunk_size=8,
                    n_experts=8, top_k=2, d_expert=16, n_shared_experts=2,
                    router_bias_rate=0.05)


def cfg_at(pp, ep, M):
    return validate(Config(model=MODEL, train=TrainConfig(batch_size=8, seq_len=24, n_pairs=4),
                           parallel=ParallelConfig(pp=pp, ep=ep, microbatches=M)))


def the_batch():
    return {k: jnp.asarray(v) for k, v in recall_batch(1, 0, 8, 24, 40, 4).items()}


def test_bias_steers_the_pick_not_the_weights():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    w, e, _ = route(logits, 2, renormalize=False)
    assert e.tolist() == [[0, 1]]
    w_b, e_b, _ = route(logits, 2, renormalize=False, bias_E=jnp.asarray([0., 0., 0.2, 0.]))
    assert e_b.tolist() == [[0, 2]]  # 0.15 + 0.2 beats 0.3
    np.testing.assert_allclose(w_b, [[0.5, 0.15]], rtol=1e-6)  # unbiased probabilities
    grad = jax.grad(lambda b: jnp.sum(route(logits, 2, False, b)[0]))(jnp.zeros(4))
    assert not np.any(grad)


def test_bias_step_moves_towards_the_mean_load():
    counts = jnp.asarray([[4, 2, 2, 0], [2, 2, 2, 2]])  # means 2 and 2
    np.testing.assert_allclose(bias_step(counts, 0.1), [[-0.1, 0, 0, 0.1], [0, 0, 0, 0]],
                               rtol=1e-6)


def test_train_step_sets_the_bias_from_global_counts_at_every_layout():
    """One device and (pp, ep, M) = (2, 2, 2): after two steps the router bias is the sum
    of the bias steps of each step's expert counts (no optimizer update, no weight decay),
    the same at both layouts, and loss and parameters (shared experts included) agree."""
    batch = the_batch()
    counts_of = jax.jit(lambda p: model.loss_fn(p, batch, MODEL)[1]["expert_counts"])
    results = {}
    for layout in [(1, 1, 1), (2, 2, 2)]:
        cfg = cfg_at(*layout)
        run = build(cfg)
        state, losses, want = run.state, [], 0.0
        for _ in range(2):
            params = run.canonical(state.params)
            counts = counts_of(params)
            want = want + bias_step(counts, MODEL.router_bias_rate)
            b = batch if run.batch_sharding is None else jax.device_put(batch,
                                                                         run.batch_sharding)
            state, metrics = run.step_fn(state, b)
            losses.append(float(metrics["loss"]))
        params = jax.device_get(run.canonical(state.params))
        np.testing.assert_allclose(params["layers"]["mlp"]["router_bias"], want, atol=1e-7)
        assert np.any(want)
        results[layout] = losses, params
    (l1, p1), (l2, p2) = results.values()
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p2)):
        np.testing.assert_allclose(b, a, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_options_off_leave_the_parameters_as_before():
    plain = dataclasses.replace(MODEL, n_shared_experts=0, router_bias_rate=0.0)
    mlp = jax.eval_shape(lambda: model.init_params(plain, jax.random.key(0)))["layers"]["mlp"]
    assert sorted(mlp) == ["router", "w_down", "w_gate", "w_up"]


def test_flops_count_the_bias_and_the_shared_experts():
    from jmamba import flops
    params = jax.eval_shape(lambda: model.init_params(MODEL, jax.random.key(0)))
    assert flops.param_count(MODEL) == sum(x.size for x in jax.tree.leaves(params))
    plain = dataclasses.replace(MODEL, n_shared_experts=0)
    extra = MODEL.n_layer * 3 * 2 * MODEL.d_model * MODEL.d_expert  # two shared experts
    assert flops.active_matmul_params(MODEL) - flops.active_matmul_params(plain) == extra


def test_options_need_an_moe_model():
    with pytest.raises(ValueError, match="applies to mlp='moe' only"):
        validate(Config(model=dataclasses.replace(MODEL, mlp="dense")))
