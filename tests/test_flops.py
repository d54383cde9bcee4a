"""FLOP and parameter formulas against a hand count and against the model's own matmuls."""

import dataclasses
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba import flops, model
from jmamba.config import ModelConfig

# d_model 16, d_inner 32, 4 heads of 8, d_state 4, 1 group, 4 experts of 8, top-2,
# padded vocab 24, 2 layers, chunk 8.
SMALL = ModelConfig(d_model=16, n_layer=2, vocab_size=24, d_state=4, headdim=8, chunk_size=8,
                    n_experts=4, top_k=2, d_expert=8)


def test_param_count_by_hand():
    # per layer: 2 norms 32, in_proj 16*(2*32+2*4+4) = 1216, out_proj 32*16 = 512,
    # conv 4*40 + 40 = 200, dt_bias/A_log/D 12, gated norm 32, router 64, experts 3*4*16*8
    per_layer = 32 + 1216 + 512 + 200 + 12 + 32 + 64 + 1536
    assert flops.param_count(SMALL) == 24 * 16 + 2 * per_layer + 16 == 7608
    untied = dataclasses.replace(SMALL, tie_embeddings=False)
    assert flops.param_count(untied) == 7608 + 16 * 24


def test_flops_per_token_by_hand():
    L = 16  # two chunks of 8
    # weight matmuls a token uses, per layer: in_proj 1216 + out_proj 512 + router 64
    # + 2 experts 2*3*16*8 = 768
    matmuls = 6 * 2 * (1216 + 512 + 64 + 768)
    # SSD per layer, forward: C B^T 2*8*1*4, diagonal blocks 2*8*4*8, chunk states
    # 2*4*8*4, state passing 2*4*8*4*(2+1)^2/16, state->output 2*4*8*4
    ssd = 3 * 2 * (64 + 512 + 256 + 144 + 256)
    lm_head = 6 * 16 * 24
    assert flops.flops_per_token(SMALL, L) == matmuls + ssd + lm_head == 40416


def _dot_flops(jaxpr) -> float:
    """2 * (output size) * (contracted size) summed over every dot in a jaxpr."""
    total = 0.0
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            total += n * _dot_flops(sub)
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
        elif eqn.primitive.name.startswith("ragged_dot"):
            rows, k = eqn.invars[0].aval.shape
            total += 2 * rows * k * eqn.outvars[0].aval.shape[-1]
    return total


def test_forward_formula_matches_the_models_matmuls():
    """A second witness: the forward dots XLA is asked to run, read off the jaxpr. The
    3-operand SSD einsums may contract in another order (and the decay product may show up
    as a batched dot), so allow a few percent."""
    B, L = 2, 64
    cfg = dataclasses.replace(SMALL, d_model=32, headdim=16)
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    batch = {"inputs": jnp.zeros((B, L), jnp.int32), "targets": jnp.zeros((B, L), jnp.int32),
             "mask": jnp.ones((B, L))}
    jaxpr = jax.make_jaxpr(lambda p: model.loss_fn(p, batch, cfg)[0])(params).jaxpr
    counted = _dot_flops(jaxpr) / (B * L)
    expected = flops.flops_per_token(cfg, L) / 3
    assert counted == pytest.approx(expected, rel=0.03), (counted, expected)


def test_peak_and_mfu():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "gpu") == 989.0
    assert flops.peak_tflops("NVIDIA H200", "gpu") == 989.0
    assert flops.peak_tflops("cpu", "cpu") is None  # no MFU on a CPU unless --peak_tflops
    assert flops.peak_tflops("Mystery 9000", "gpu") is None
    np.testing.assert_allclose(flops.mfu(1e4, 1e9, 10.0, 2), 1e13 / 2e13)


HYBRID = dataclasses.replace(SMALL, attn_layer_idx=(1,), attn_num_heads=2,
                             attn_num_heads_kv=1, attn_head_dim=8)


def test_hybrid_counts_by_hand():
    # attention layer: q 2*8, k 8, v 8 -> in 16*32 = 512, out 16*16 = 256
    assert flops.attention_params(HYBRID) == 768
    # the Mamba2 mixer it stores them in: 1216 + 512 + 200 + 12 + 32 = 1972
    assert flops.unused_params(HYBRID) == 1972 - 768
    stored = jax.eval_shape(lambda: model.init_params(HYBRID, jax.random.key(0)))
    assert flops.param_count(HYBRID) == sum(x.size for x in jax.tree.leaves(stored)) == 7608
    L = 16
    matmuls = 6 * ((1216 + 512) + 768 + 2 * (64 + 768))
    ssd = 3 * 1 * (64 + 512 + 256 + 144 + 256)
    attn = 3 * 4 * L * 8 * 2  # scores and values, full L x L
    assert flops.flops_per_token(HYBRID, L) == matmuls + ssd + attn + 6 * 16 * 24


def test_attention_formula_matches_its_matmuls():
    from jmamba.attention import self_attention
    B, L = 2, 32
    cfg = dataclasses.replace(HYBRID, attn_impl="reference")
    Q, R, A = cfg.attn_heads
    w_in = jnp.zeros((16, A * (Q + 2 * R)))
    w_out = jnp.zeros((A * Q, 16))
    jaxpr = jax.make_jaxpr(lambda x: self_attention(x, w_in, None, w_out, None, cfg))(
        jnp.zeros((B, L, 16))).jaxpr
    counted = _dot_flops(jaxpr) / (B * L)
    assert counted == 2 * flops.attention_params(cfg) + flops.attention_flops_per_token(cfg, L)
