"""Attention layers (jmamba/attention.py) and hybrid stacks: the twins agree, documents stay
apart, and a hybrid model's pipeline and expert-parallel layouts equal one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba import attention, model
from jmamba.config import ModelConfig

jax.config.update("jax_default_matmul_precision", "highest")


def qkv(B=2, L=12, Q=4, R=2, A=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, L, Q, A)), jax.random.normal(ks[1], (B, L, R, A)),
            jax.random.normal(ks[2], (B, L, R, A)))


SEQ_IDX = jnp.asarray([[0] * 5 + [1] * 4 + [2] * 3, [7] * 12])


@pytest.mark.parametrize("seq_idx", [None, SEQ_IDX])
def test_xla_attention_equals_the_plain_twin(seq_idx):
    q, k, v = qkv()
    want = attention.attention_reference(q, k, v, seq_idx)
    got = attention.attend(q, k, v, seq_idx, impl="xla")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_plain_twin_is_causal_gqa_softmax():
    """One query head, written out: token t averages v over s <= t with softmax weights."""
    q, k, v = qkv(B=1, L=5, Q=2, R=1, A=4)
    out = attention.attention_reference(q, k, v)
    t, h = 3, 1
    s = np.asarray(q[0, t, h] @ k[0, :t + 1, 0].T) / 2.0
    w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(out[0, t, h], w @ np.asarray(v[0, :t + 1, 0]), atol=1e-5)


def test_rotary_scores_depend_only_on_the_distance():
    q, k, _ = qkv(B=1, L=1, Q=1, R=1, A=8)
    def score(m, n):
        qm = attention.rotary(q, jnp.asarray([[m]]), 6, 10000.0)
        kn = attention.rotary(k, jnp.asarray([[n]]), 6, 10000.0)
        return float(jnp.sum(qm * kn))
    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
    # The dims past the rotary ones are left alone.
    np.testing.assert_array_equal(attention.rotary(q, jnp.asarray([[9]]), 6, 1e4)[..., 6:],
                                  q[..., 6:])


def test_rotary_is_a_rotation_of_pairs_i_and_i_plus_half():
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    pos, W, base = 3, 4, 100.0
    got = np.asarray(attention.rotary(x, jnp.asarray([[pos]]), W, base))[0, 0, 0]
    for i in range(W // 2):
        theta = pos * base ** (-2 * i / W)
        z = complex(x[0, 0, 0, i], x[0, 0, 0, i + W // 2]) * complex(np.cos(theta),
                                                                     np.sin(theta))
        assert got[i] == pytest.approx(z.real, abs=1e-5)
        assert got[i + W // 2] == pytest.approx(z.imag, abs=1e-5)


HYBRID = ModelConfig(d_model=32, n_layer=4, vocab_size=40, headdim=8, d_state=8,
                     chunk_size=4, n_experts=4, d_expert=16, attn_layer_idx=(1, 3),
                     attn_num_heads=4, attn_num_heads_kv=2, attn_rotary_dim=4,
                     attn_qkv_bias=True)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_documents_each_see_only_themselves(impl):
    """Attention on [doc a | doc b] equals attention on each alone (positions restart)."""
    cfg = dataclasses.replace(HYBRID, attn_impl=impl)
    params = model.init_params(cfg, jax.random.key(1))
    mixer = jax.tree.map(lambda a: a[1], params["layers"]["mixer"])
    w_in, w_out = model.attention_weights(mixer, cfg)
    b_in = b_out = None
    x = jax.random.normal(jax.random.key(2), (1, 10, cfg.d_model))
    seq = jnp.asarray([[0] * 6 + [1] * 4])
    packed = attention.self_attention(x, w_in, b_in, w_out, b_out, cfg, seq)
    a = attention.self_attention(x[:, :6], w_in, b_in, w_out, b_out, cfg)
    b = attention.self_attention(x[:, 6:], w_in, b_in, w_out, b_out, cfg)
    np.testing.assert_allclose(packed, jnp.concatenate([a, b], axis=1), atol=1e-5)



def docs_batch():
    """The pp x ep tests' batch, packed: each row holds three documents (24 tokens)."""
    from tests.test_pp_ep import the_batch
    return {**the_batch(), "seq_idx": jnp.asarray([[0] * 9 + [1] * 7 + [2] * 8] * 8)}


@pytest.fixture(scope="module")
def hybrid_reference():
    params = model.init_params(HYBRID, jax.random.key(0))
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        lambda p: model.loss_fn(p, docs_batch(), HYBRID), has_aux=True))(params)
    return params, loss, metrics, grads


def test_attention_rows_store_attention_weights_and_zeros_elsewhere(hybrid_reference):
    params, *_ = hybrid_reference
    Q, R, A = HYBRID.attn_heads
    mixer = params["layers"]["mixer"]
    w_in = np.asarray(mixer["in_proj"]["kernel"])
    assert np.all(w_in[[1, 3], :, A * (Q + 2 * R):] == 0) and np.all(w_in[[1, 3], :, :8] != 0)
    assert np.all(np.asarray(mixer["out_proj"]["kernel"])[[1, 3], A * Q:] == 0)
    assert np.all(np.asarray(mixer["A_log"])[[1, 3]] == 0)
    assert np.all(np.asarray(mixer["A_log"])[[0, 2]] != 0)


def test_unused_storage_gets_no_gradient(hybrid_reference):
    _, _, _, grads = hybrid_reference
    Q, R, A = HYBRID.attn_heads
    g = grads["layers"]["mixer"]
    assert not np.any(np.asarray(g["in_proj"]["kernel"])[[1, 3], :, A * (Q + 2 * R):])
    assert not np.any(np.asarray(g["conv1d_kernel"])[[1, 3]])
    assert np.any(np.asarray(g["in_proj"]["kernel"])[[1, 3], :, :A * (Q + 2 * R)])
    assert np.any(np.asarray(g["conv1d_kernel"])[[0, 2]])
    b = np.asarray(grads["layers"]["attn_in_bias"])  # attention layers' own bias leaf
    assert not np.any(b[[0, 2]]) and np.all(np.any(b[[1, 3]] != 0, axis=-1))


# (GPipe at (2,2,4) without attention: tests/test_pp_ep.py; kept out of here for the
# suite's time.)
@pytest.mark.parametrize("pp,ep,M,schedule,split", [(2, 1, 2, "1f1b", "1,3"),
                                                     (2, 2, 2, "1f1b", "")])
def test_hybrid_layouts_equal_one_device(hybrid_reference, pp, ep, M, schedule, split):
    """fp32 loss, metrics and every gradient at hand-made, uneven and pp x ep layouts, on
    packed documents."""
    from jmamba.config import Config, ParallelConfig, TrainConfig, validate
    from tests.test_pp_ep import assert_grads_match, run
    params, loss_ref, metrics_ref, grads_ref = hybrid_reference
    cfg = validate(Config(model=HYBRID, train=TrainConfig(batch_size=8, seq_len=24, n_pairs=4),
                          parallel=ParallelConfig(pp=pp, ep=ep, microbatches=M,
                                                  pp_schedule=schedule, pp_split=split)))
    loss, metrics, grads = run(cfg, params, docs_batch())
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for key in ("ce", "aux_loss", "z_loss"):
        np.testing.assert_allclose(metrics[key], metrics_ref[key], rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(metrics["expert_counts"], metrics_ref["expert_counts"])
    assert_grads_match(grads, grads_ref, atol=1e-5)


def test_static_layer_ids_run_without_a_cond_and_equal_the_cond(hybrid_reference):
    """One device knows every layer's kind while tracing: runs of one kind, no cond; the
    same stack with traced ids (as pipeline stages have) takes the cond, same numbers."""
    params, *_ = hybrid_reference
    h, r = model.embed(params["embed"], docs_batch()["inputs"], HYBRID)
    seq = docs_batch()["seq_idx"]

    def out(ids):
        return model.run_layers(params["layers"], h, r, HYBRID, seq_idx_BxL=seq,
                                layer_ids_Y=ids)[:2]
    static = jax.make_jaxpr(lambda: out(None))()
    traced = jax.make_jaxpr(out)(jnp.arange(4))
    assert "cond" not in str(static) and "cond" in str(traced)
    for a, b in zip(out(None), jax.jit(out)(jnp.arange(4))):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cudnn_attention_stays_out_of_expert_parallel_programs(capsys):
    """XLA crashed compiling cuDNN attention at ep = 2 on GPUs (docs/status.md): auto picks
    xla there, an explicit cudnn is refused before anything is built, ep = 1 is untouched."""
    from jmamba.cli import parse_config
    from jmamba.parallel.setup import attention_for_layout
    base = ["--config", "hybrid_demo", "--dtype", "bfloat16"]
    at_ep2 = attention_for_layout(parse_config(base + ["--ep", "2"]))
    assert at_ep2.model.attn_impl == "xla"
    assert attention_for_layout(parse_config(base + ["--pp", "2"])).model.attn_impl == "auto"
    with pytest.raises(SystemExit) as exit_:
        parse_config(base + ["--ep", "2", "--attn_impl", "cudnn"])
    assert exit_.value.code == 2
    assert "'model.attn_impl'" in capsys.readouterr().err
    assert parse_config(base + ["--attn_impl", "cudnn"]).model.attn_impl == "cudnn"
