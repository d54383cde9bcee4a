"""--ep_overflow redo: one exchange round a layer, and a step whose copies overflowed is
computed again with one round at capacity ep. The step's rule on toy losses, then a PP x EP
layout against one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
from jmamba.data import recall_batch
from jmamba.parallel.setup import build
from jmamba.step import init_state, make_train_step


def toy_loss(scale, dropped):
    def loss_fn(params, batch):
        loss = scale * jnp.sum(params["w"] * batch)
        return loss, {"dropped_tokens": jnp.asarray(dropped, jnp.int32),
                      "expert_counts": jnp.ones((1, 2), jnp.int32)}
    return loss_fn


@pytest.mark.parametrize("dropped", [0, 3])
def test_a_step_that_dropped_takes_the_redo_losses_values(dropped):
    """Nothing dropped: the first loss's values and ep_redone 0; something dropped: the
    redo loss's loss and gradients (here 10x the first's) and ep_redone 1."""
    opt = optax.sgd(1.0)
    step = jax.jit(make_train_step(toy_loss(1.0, dropped), opt, lambda s: 1.0, 1e9,
                                   redo_loss_fn=toy_loss(10.0, 0)))
    params = {"w": jnp.ones(3)}
    batch = jnp.asarray([1.0, 2.0, 3.0])
    state, metrics = step(init_state(params, opt), batch)
    scale = 10.0 if dropped else 1.0
    assert float(metrics["ep_redone"]) == float(dropped > 0)
    np.testing.assert_allclose(metrics["loss"], 6.0 * scale)
    np.testing.assert_allclose(state.params["w"], 1.0 - scale * np.asarray(batch))
    assert int(metrics["dropped_tokens"]) == 0


MODEL = ModelConfig(d_model=16, n_layer=2, vocab_size=40, headdim=8, d_state=8, chunk_size=8,
                    n_experts=8, top_k=2, d_expert=16)


def cfg_at(pp, ep, M, **parallel):
    return validate(Config(model=MODEL, train=TrainConfig(batch_size=8, seq_len=24, n_pairs=4),
                           parallel=ParallelConfig(pp=pp, ep=ep, microbatches=M, **parallel)))


def test_redo_at_pp_x_ep_equals_one_device():
    """(2, 2, 2) with --ep_overflow redo at capacity 1.0 (the recall data's routing
    overflows it): the step is computed again without drops, and two steps give the
    one-device losses and parameters; evaluation never drops either."""
    batch = {k: jnp.asarray(v) for k, v in recall_batch(1, 0, 8, 24, 40, 4).items()}
    results = {}
    for layout, parallel in (((1, 1, 1), {}),
                             ((2, 2, 2), dict(ep_overflow="redo", ep_capacity_factor=1.0))):
        run = build(cfg_at(*layout, **parallel))
        state, losses, redone = run.state, [], []
        b = batch if run.batch_sharding is None else jax.device_put(batch, run.batch_sharding)
        for _ in range(2):
            state, metrics = run.step_fn(state, b)
            losses.append(float(metrics["loss"]))
            redone.append(float(metrics.get("ep_redone", 0.0)))
            assert int(metrics["dropped_tokens"]) == 0
        eval_loss = float(run.eval_fn(state.params, b)[0])
        results[layout] = losses, redone, jax.device_get(run.canonical(state.params)), eval_loss
    (l1, _, p1, e1), (l2, redone, p2, e2) = results.values()
    assert redone == [1.0, 1.0], redone  # the overflow happened and was redone
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    np.testing.assert_allclose(e2, e1, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p2)):
        np.testing.assert_allclose(b, a, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_redo_needs_a_dropless_exchange():
    with pytest.raises(ValueError, match="ep_overflow"):
        cfg_at(1, 2, 1, ep_overflow="redo", ep_dropless=False)
    with pytest.raises(ValueError, match="ep_overflow"):
        cfg_at(1, 2, 1, ep_overflow="again")
    with pytest.raises(ValueError, match="needs parallel.ep > 1"):
        cfg_at(2, 1, 2, ep_overflow="redo")
    assert dataclasses.replace(ParallelConfig()).ep_overflow == "rounds"
