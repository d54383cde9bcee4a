"""The LM as a whole: causality, scan over layers, conv, init, dtypes and head variants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmamba import model
from jmamba.config import ModelConfig
from jmamba.layers import Mamba2Mixer

CFG = ModelConfig(d_model=32, n_layer=3, vocab_size=50, headdim=8, d_state=8, chunk_size=8,
                  n_experts=4, top_k=2, d_expert=16)


def batch_of(tokens):
    return {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
            "mask": jnp.ones(tokens.shape, jnp.float32)}


def logits_of(params, tokens, cfg=CFG):
    h, r = model.embed(params["embed"], tokens, cfg)
    h, r, *_ = model.run_layers(params["layers"], h, r, cfg)
    return model.head_logits(params, h, r, cfg)


@pytest.mark.parametrize("mlp", ["moe", "dense", "none"])
def test_lm_is_causal(mlp):
    cfg = dataclasses.replace(CFG, mlp=mlp)
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, cfg.vocab_size)
    t0 = 12
    changed = tokens.at[:, t0 + 1:].set((tokens[:, t0 + 1:] + 7) % cfg.vocab_size)
    a, b = logits_of(params, tokens, cfg), logits_of(params, changed, cfg)
    assert a.shape == (2, 21, cfg.padded_vocab)
    np.testing.assert_allclose(a[:, :t0 + 1], b[:, :t0 + 1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, t0 + 1:], b[:, t0 + 1:])


def test_scan_over_layers_equals_python_loop():
    params = model.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    h, r = model.embed(params["embed"], tokens, CFG)
    h_scan, r_scan, aux_scan, _, _, _ = model.run_layers(params["layers"], h, r, CFG)
    gd = model.block_graphdef(CFG)
    aux = 0.0
    for i in range(CFG.n_layer):  # layer i is row i of every stacked parameter
        layer_i = jax.tree.map(lambda a: a[i], params["layers"])
        h, r, a, _, _, _ = nnx.merge(gd, layer_i)(h, r)
        aux = aux + a
    np.testing.assert_allclose(h_scan, h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r_scan, r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux_scan, aux, rtol=1e-6)


def test_unrolled_layers_equal_the_scan():
    """scan_layers=False (each layer its own compiled code and residual buffers) gives the
    scan's loss and gradients without remat and with full remat, and the same padded-stage
    skipping with n_active."""
    cfg2 = dataclasses.replace(CFG, n_layer=2)
    params = model.init_params(cfg2, jax.random.key(0))
    batch = batch_of(jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size))
    grads = {}
    for scan, remat in ((True, "none"), (False, "none"), (False, "full")):
        cfg = dataclasses.replace(cfg2, scan_layers=scan)
        (loss, _), g = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True),
                               static_argnums=(2, 3))(params, batch, cfg, remat)
        grads[scan, remat] = (loss, g)
    for key in ((False, "none"), (False, "full")):  # unrolled full remat: prevent_cse on
        np.testing.assert_allclose(grads[key][0], grads[True, "none"][0], rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     grads[key][1], grads[True, "none"][1])
    h, r = model.embed(params["embed"], batch["inputs"], cfg2)
    outs = [model.run_layers(params["layers"], h, r, dataclasses.replace(cfg2, scan_layers=s),
                             n_active=jnp.int32(1))[:2] for s in (True, False)]
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)


def test_causal_conv_matches_loop():
    mixer = Mamba2Mixer(CFG, nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 10, mixer.conv1d_kernel.shape[1])))
    w, b = np.asarray(mixer.conv1d_kernel[...]), np.asarray(mixer.conv1d_bias[...])
    K = CFG.d_conv
    want = np.zeros_like(x)
    for t in range(10):
        for k in range(K):
            src = t - (K - 1) + k
            if src >= 0:
                want[:, t] += w[k] * x[:, src]
    np.testing.assert_allclose(mixer.causal_conv(jnp.asarray(x)), want + b, rtol=1e-5,
                               atol=1e-6)


def test_mamba_ssm_init():
    mixer = Mamba2Mixer(dataclasses.replace(CFG, d_model=256), nnx.Rngs(0))
    dt = jax.nn.softplus(mixer.dt_bias[...])
    assert np.all(dt >= CFG.dt_min * 0.999) and np.all(dt <= CFG.dt_max * 1.001)
    A = np.exp(mixer.A_log[...])
    assert np.all(A >= CFG.A_init_range[0]) and np.all(A <= CFG.A_init_range[1])
    np.testing.assert_array_equal(mixer.D[...], np.ones(mixer.D.shape))


def test_param_tree_names_and_shapes():
    params = model.init_params(dataclasses.replace(CFG, tie_embeddings=False),
                               jax.random.key(0))
    assert params["embed"]["embedding"].shape == (56, 32)  # vocab 50 padded to 8
    assert params["lm_head"]["kernel"].shape == (32, 56)
    assert params["layers"]["mlp"]["w_gate"].shape == (3, 4, 32, 16)
    assert params["layers"]["mixer"]["in_proj"]["kernel"].shape == (3, 32, 2 * 64 + 16 + 8)
    assert "lm_head" not in model.init_params(CFG, jax.random.key(0))


def test_residual_stays_fp32_in_bf16():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    h, r = model.embed(params["embed"], tokens, cfg)
    h, r, *_ = model.run_layers(params["layers"], h, r, cfg)
    assert h.dtype == jnp.bfloat16 and r.dtype == jnp.float32
    loss32, _ = model.loss_fn(params, batch_of(tokens), CFG)
    loss16, _ = model.loss_fn(params, batch_of(tokens), cfg)
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


def test_loss_is_token_weighted_over_valid_tokens():
    params = model.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    batch = batch_of(tokens)
    logits = logits_of(params, tokens)
    logp = jax.nn.log_softmax(logits)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.zeros((2, 16), np.float32)
    mask[0, :3] = 1
    mask[1, 5:] = 1
    _, parts = model.loss_fn(params, {**batch, "mask": jnp.asarray(mask)}, CFG)
    np.testing.assert_allclose(parts["ce"], (nll * mask).sum() / mask.sum(), rtol=1e-5)
