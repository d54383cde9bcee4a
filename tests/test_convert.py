"""mamba_ssm safetensors -> jmamba params and back: names, layouts, values, errors."""

import dataclasses
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jmamba import convert_mamba_ssm as cv
from jmamba import model
from jmamba.config import ModelConfig
from jmamba.data import recall_batch
from jmamba.layers import Mamba2Mixer

DENSE = ModelConfig(d_model=16, n_layer=2, vocab_size=40, headdim=8, d_state=8, chunk_size=8,
                    mlp="dense", d_intermediate=24, tie_embeddings=False)


def mamba_ssm_state_dict(cfg: ModelConfig, seed=0) -> dict[str, np.ndarray]:
    """Names and shapes as mamba_ssm's MambaLMHeadModel(Mamba2, GatedMLP) writes them."""
    rng = np.random.default_rng(seed)
    D, I, H, G, N, K = cfg.d_model, cfg.d_inner, cfg.nheads, cfg.ngroups, cfg.d_state, cfg.d_conv
    X, F, V = I + 2 * G * N, cfg.d_intermediate, cfg.padded_vocab
    shapes = {"backbone.embedding.weight": (V, D), "backbone.norm_f.weight": (D,)}
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}."
        shapes.update({p + "norm.weight": (D,),
                       p + "mixer.in_proj.weight": (2 * I + 2 * G * N + H, D),
                       p + "mixer.conv1d.weight": (X, 1, K), p + "mixer.conv1d.bias": (X,),
                       p + "mixer.dt_bias": (H,), p + "mixer.A_log": (H,), p + "mixer.D": (H,),
                       p + "mixer.norm.weight": (I,), p + "mixer.out_proj.weight": (D, I),
                       p + "norm2.weight": (D,), p + "mlp.fc1.weight": (2 * F, D),
                       p + "mlp.fc2.weight": (D, F)})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.3 for k, s in shapes.items()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    sd = mamba_ssm_state_dict(DENSE)
    path = str(tmp_path_factory.mktemp("convert") / "mamba.safetensors")
    cv.write_safetensors(path, sd)
    return sd, cv.import_safetensors(path, DENSE)


def test_values_land_in_place(imported):
    sd, params = imported
    L = params["layers"]
    np.testing.assert_array_equal(params["embed"]["embedding"], sd["backbone.embedding.weight"])
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(params["norm_f"]["scale"], sd["backbone.norm_f.weight"])
    for i in range(DENSE.n_layer):
        t = lambda name: sd[f"backbone.layers.{i}.{name}"]
        for proj in ("in_proj", "out_proj"):
            np.testing.assert_array_equal(L["mixer"][proj]["kernel"][i],
                                          t(f"mixer.{proj}.weight").T)
        w = t("mixer.conv1d.weight")
        for k in range(DENSE.d_conv):
            np.testing.assert_array_equal(L["mixer"]["conv1d_kernel"][i][k], w[:, 0, k])
        for ours, theirs in [(("mixer", "conv1d_bias"), "mixer.conv1d.bias"),
                             (("mixer", "dt_bias"), "mixer.dt_bias"),
                             (("mixer", "A_log"), "mixer.A_log"), (("mixer", "D"), "mixer.D"),
                             (("mixer", "norm", "scale"), "mixer.norm.weight"),
                             (("norm", "scale"), "norm.weight"),
                             (("norm2", "scale"), "norm2.weight"),
                             (("mlp", "fc1", "kernel"), "mlp.fc1.weight"),
                             (("mlp", "fc2", "kernel"), "mlp.fc2.weight")]:
            x = L
            for key in ours:
                x = x[key]
            want = t(theirs).T if theirs.startswith("mlp.") else t(theirs)
            np.testing.assert_array_equal(x[i], want, err_msg=theirs)


def test_conv_matches_torch_conv1d_semantics(imported):
    """torch Conv1d(groups=C, padding=K-1), cut to the first L outputs, on the torch weight."""
    sd, params = imported
    mixer = Mamba2Mixer(DENSE, nnx.Rngs(0))
    mixer.conv1d_kernel[...] = params["layers"]["mixer"]["conv1d_kernel"][0]
    mixer.conv1d_bias[...] = params["layers"]["mixer"]["conv1d_bias"][0]
    w_Cx1xK = sd["backbone.layers.0.mixer.conv1d.weight"]
    b_C = sd["backbone.layers.0.mixer.conv1d.bias"]
    C, _, K = w_Cx1xK.shape
    x_BxLxC = np.random.default_rng(1).standard_normal((2, 7, C)).astype(np.float32)
    padded = np.pad(x_BxLxC, [(0, 0), (K - 1, K - 1), (0, 0)])
    want = np.stack([sum(padded[:, t + k] * w_Cx1xK[:, 0, k] for k in range(K)) + b_C
                     for t in range(7)], axis=1)
    np.testing.assert_allclose(mixer.causal_conv(jnp.asarray(x_BxLxC)), want, rtol=1e-5,
                               atol=1e-6)


def test_imported_model_runs(imported):
    _, params = imported
    batch = {k: jnp.asarray(v) for k, v in recall_batch(0, 0, 2, 24, 40, 4).items()}
    loss, metrics = jax.jit(lambda p: model.loss_fn(p, batch, DENSE))(params)
    assert np.isfinite(float(loss)) and float(loss) > 0


@pytest.mark.parametrize("cfg", [
    DENSE, ModelConfig(d_model=16, n_layer=2, vocab_size=40, headdim=8, d_state=8,
                       chunk_size=8, n_experts=4, d_expert=8, bias=True),
    ModelConfig(d_model=16, n_layer=2, vocab_size=40, headdim=8, d_state=8, chunk_size=8,
                n_experts=4, d_expert=8, n_shared_experts=1, router_bias_rate=1e-3,
                bias=True)],
    ids=["dense_untied", "moe_tied_bias", "moe_shared_router_bias"])
def test_export_import_round_trip_is_exact(cfg, tmp_path):
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0))))
    path = str(tmp_path / "out.safetensors")
    cv.export_safetensors(params, cfg, path)
    tensors = cv.read_safetensors(path)
    if cfg.mlp == "dense":
        assert set(tensors) == set(mamba_ssm_state_dict(cfg))
    else:  # experts in global order, one [F, D] tensor each
        np.testing.assert_array_equal(tensors["backbone.layers.1.mlp.experts.3.w_up.weight"],
                                      params["layers"]["mlp"]["w_up"][1, 3].T)
        np.testing.assert_array_equal(tensors["lm_head.weight"],
                                      tensors["backbone.embedding.weight"])
    back = cv.import_safetensors(path, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_reader_follows_the_format(tmp_path):
    """A file laid out by hand: u64 header size, JSON header, buffer; BF16 and F16 widen."""
    bf16 = np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16
    buf = bf16.astype("<u2").tobytes() + np.array([[0.5, 3.0]], "<f2").tobytes()
    header = json.dumps({"__metadata__": {"k": "v"},
                         "a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
                         "b": {"dtype": "F16", "shape": [1, 2], "data_offsets": [4, 8]}}).encode()
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + buf)
    out = cv.read_safetensors(str(path))
    np.testing.assert_array_equal(out["a"], [1.5, -2.0])
    np.testing.assert_array_equal(out["b"], [[0.5, 3.0]])
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="hand.safetensors: not a readable safetensors file"):
        cv.read_safetensors(str(path))


def test_bad_input_names_the_tensor_and_the_field(tmp_path):
    sd = mamba_ssm_state_dict(DENSE)
    with pytest.raises(ValueError, match=r"'backbone.layers.0.mixer.conv1d.bias' has shape "
                                         r"\[48\], but this config needs \[64\]: check "
                                         r"model.conv_bias, expand, d_state"):
        cv.from_mamba_ssm(sd, ModelConfig(**{**DENSE.__dict__, "d_state": 16}))
    partial = {k: v for k, v in sd.items() if k != "backbone.layers.1.mixer.D"}
    with pytest.raises(ValueError, match=r"missing, e.g. \['backbone.layers.1.mixer.D'\]"):
        cv.from_mamba_ssm(partial, DENSE)
    with pytest.raises(ValueError, match=r"does not use, e.g. \['backbone.layers.1"):
        cv.from_mamba_ssm(sd, ModelConfig(**{**DENSE.__dict__, "n_layer": 1}))
    tied = ModelConfig(**{**DENSE.__dict__, "tie_embeddings": True})
    with pytest.raises(ValueError, match="set model.tie_embeddings=False"):
        cv.from_mamba_ssm(sd, tied)


def with_attention(sd: dict, cfg: ModelConfig, layers, seed=1) -> dict:
    """A mamba_ssm hybrid state dict: `layers` hold MHA(num_heads, num_heads_kv, head_dim,
    qkv_proj_bias, out_proj_bias as cfg's attn_*_bias) mixers instead of Mamba2's."""
    rng = np.random.default_rng(seed)
    Q, R, A = cfg.attn_heads
    out = dict(sd)
    for i in layers:
        p = f"backbone.layers.{i}.mixer."
        for k in [k for k in out if k.startswith(p)]:
            del out[k]
        out[p + "in_proj.weight"] = rng.standard_normal((A * (Q + 2 * R), cfg.d_model)
                                                        ).astype(np.float32) * 0.3
        out[p + "out_proj.weight"] = rng.standard_normal((cfg.d_model, A * Q)
                                                         ).astype(np.float32) * 0.3
        if cfg.attn_qkv_bias:
            out[p + "in_proj.bias"] = rng.standard_normal(A * (Q + 2 * R)).astype(np.float32)
        if cfg.attn_out_bias:
            out[p + "out_proj.bias"] = rng.standard_normal(cfg.d_model).astype(np.float32)
    return out


MIXED = ModelConfig(d_model=16, n_layer=2, vocab_size=40, headdim=8, d_state=8, chunk_size=8,
                    mlp="dense", d_intermediate=24, tie_embeddings=False, attn_layer_idx=(1,),
                    attn_num_heads=4, attn_num_heads_kv=2, attn_rotary_dim=2)


@pytest.mark.parametrize("biases", [False, True], ids=["no_bias", "mha_default_biases"])
def test_hybrid_names_round_trip(biases):
    """Mamba2 layer 0 and MHA layer 1 under mamba_ssm's names: import, export, same dict;
    with biases as mamba_ssm's MHA has them by default, without Mamba2 biases."""
    cfg = dataclasses.replace(MIXED, attn_qkv_bias=biases, attn_out_bias=biases)
    sd = with_attention(mamba_ssm_state_dict(cfg), cfg, [1])
    params = cv.from_mamba_ssm(sd, cfg)
    Q, R, A = MIXED.attn_heads
    np.testing.assert_array_equal(params["layers"]["mixer"]["in_proj"]["kernel"][1, :, :32],
                                  sd["backbone.layers.1.mixer.in_proj.weight"].T)
    assert not np.any(params["layers"]["mixer"]["in_proj"]["kernel"][1, :, A * (Q + 2 * R):])
    back = cv.to_mamba_ssm(params, cfg)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    with pytest.raises(ValueError, match="attn_num_heads"):
        cv.from_mamba_ssm(with_attention(mamba_ssm_state_dict(cfg), dataclasses.replace(
            cfg, attn_num_heads_kv=4), [1]), cfg)
    with pytest.raises(ValueError, match="attn_layer_idx"):  # a hybrid file, a plain config
        cv.from_mamba_ssm(sd, dataclasses.replace(cfg, attn_layer_idx=()))


def test_imported_hybrid_logits_match_a_forward_from_the_torch_tensors():
    """Two MHA layers, no MLP: the imported model's logits against a forward written here
    from the mamba_ssm tensors themselves (norm, q/k/v, rotary, the plain attention twin)."""
    from jmamba.attention import attention_reference, rotary
    cfg = dataclasses.replace(MIXED, mlp="none", attn_layer_idx=(0, 1), attn_impl="xla",
                              attn_qkv_bias=True, attn_out_bias=True)
    sd = with_attention(mamba_ssm_state_dict(dataclasses.replace(cfg, mlp="dense")), cfg,
                        [0, 1])
    sd = {k: v for k, v in sd.items() if "norm2" not in k and ".mlp." not in k}
    params = cv.from_mamba_ssm(sd, cfg)
    tokens = jnp.asarray(recall_batch(0, 0, 2, 24, 40, 4)["inputs"])
    h, r = model.embed(params["embed"], tokens, cfg)
    h, r, *_ = model.run_layers(params["layers"], h, r, cfg)
    got = model.head_logits(params, h, r, cfg)

    def rms(x, w):
        return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * w
    Q, R, A = cfg.attn_heads
    B, L = tokens.shape
    res, hid = jnp.asarray(sd["backbone.embedding.weight"])[tokens], 0.0
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    for i in range(2):
        p = f"backbone.layers.{i}."
        res = hid + res
        x = rms(res, sd[p + "norm.weight"])
        qkv = x @ sd[p + "mixer.in_proj.weight"].T + sd[p + "mixer.in_proj.bias"]
        q = rotary(qkv[..., :Q * A].reshape(B, L, Q, A), pos, 2, 10000.0)
        k = rotary(qkv[..., Q * A:(Q + R) * A].reshape(B, L, R, A), pos, 2, 10000.0)
        v = qkv[..., (Q + R) * A:].reshape(B, L, R, A)
        hid = attention_reference(q, k, v).reshape(B, L, Q * A) @ sd[
            p + "mixer.out_proj.weight"].T + sd[p + "mixer.out_proj.bias"]
    want = rms(hid + res, sd["backbone.norm_f.weight"]) @ sd["lm_head.weight"].T
    np.testing.assert_allclose(got[..., :40], want, rtol=1e-4, atol=1e-4)
