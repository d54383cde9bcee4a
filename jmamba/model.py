"""The Mamba2-MoE language model as pieces a pipeline can split: embed, layers, head.

Glossary (shared by all model files): B batch, L sequence, D d_model, V padded vocab,
E experts, K top-k, F expert hidden, H ssm heads, P head dim, N d_state, G groups,
Y layers (a stack of blocks), S pipeline stages, M microbatches.

Parameters are a plain nested dict with named paths:
    embed/embedding [V, D]
    layers/<block param path> [n_layer, ...]   (row i is global layer i, whatever the layout)
    norm_f/scale [D]
    lm_head/kernel [D, V]                       (only when tie_embeddings=False)
Blocks carry the (hidden, residual) pair of mamba_ssm as two plain arrays.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jmamba.attention import self_attention
from jmamba.config import ModelConfig
from jmamba.layers import (GatedMLP, Mamba2Mixer, RMSNorm, add_rms_norm, rms_norm,
                           uniform_init)
from jmamba.moe import EXCHANGED, MoE, moe_dropless
from jmamba.xent import linear_token_losses, token_losses


class Block(nnx.Module):
    """mamba_ssm's Block with fused add-norm: add, RMSNorm, Mamba2 mixer; add, RMSNorm, MLP."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        out_scale = residual_out_scale(cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mixer = Mamba2Mixer(cfg, rngs, out_scale)
        # Attention biases (hybrid stacks) have no slot in the Mamba2 mixer: a leaf of
        # their own on every layer, zero and unread on Mamba layers (A (Q + 2 R) + D floats).
        hybrid = bool(cfg.attn_layer_idx)
        self.attn_in_bias = (nnx.Param(jnp.zeros((cfg.attn_widths[0],), jnp.float32))
                             if hybrid and cfg.attn_qkv_bias else None)
        self.attn_out_bias = (nnx.Param(jnp.zeros((cfg.d_model,), jnp.float32))
                              if hybrid and cfg.attn_out_bias else None)
        if cfg.mlp != "none":
            self.norm2 = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
            self.mlp = (MoE(cfg, rngs, out_scale) if cfg.mlp == "moe"
                        else GatedMLP(cfg, rngs, out_scale))

    def __call__(self, hidden_BxLxD, residual_BxLxD, experts_fn=moe_dropless,
                 seq_idx_BxL=None, layer_id=None):
        """Returns (hidden, residual, aux_B, z_B, counts_E, dropped); all plain arrays.
        seq_idx_BxL: packed documents' index per token (jmamba/ssd.py); None: one each.
        layer_id: this block's global layer index (may be traced; n_layer for a padding
        row); hybrid stacks need it to pick the mixer."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        res_dtype = jnp.float32 if cfg.residual_in_fp32 else dtype
        normed, residual = add_rms_norm(hidden_BxLxD, residual_BxLxD.astype(res_dtype),
                                        self.norm.scale[...], self.norm.eps, dtype,
                                        cfg.norm_impl)
        hidden = self.mix(normed, seq_idx_BxL, layer_id)
        # zeros_like(hidden, ...) keeps hidden's per-device type when run under shard_map.
        aux_B = z_B = jnp.zeros_like(hidden, shape=hidden.shape[:1], dtype=jnp.float32)
        counts_E = jnp.zeros_like(hidden, shape=(max(cfg.n_experts, 1),), dtype=jnp.int32)
        dropped = jnp.zeros_like(hidden, shape=(), dtype=jnp.int32)
        if cfg.mlp != "none":
            hidden, residual = add_rms_norm(hidden, residual, self.norm2.scale[...],
                                            self.norm2.eps, dtype, cfg.norm_impl)
            if cfg.mlp == "moe":
                hidden, aux_B, z_B, counts_E, dropped = self.mlp(hidden, experts_fn)
            else:
                hidden = self.mlp(hidden)
        return hidden, residual, aux_B, z_B, counts_E.astype(jnp.int32), dropped

    def mix(self, u_BxLxD, seq_idx_BxL, layer_id):
        """The token mixer: Mamba2, or attention on attention layers (a cond on layer_id)."""
        cfg = self.cfg
        if not cfg.attn_layer_idx:
            return self.mixer(u_BxLxD, seq_idx_BxL)
        if layer_id is None:
            raise ValueError("a hybrid stack's Block needs its layer_id")
        if isinstance(layer_id, (int, np.integer)):  # known while tracing: no cond
            return (self.attend(u_BxLxD, seq_idx_BxL) if layer_id in cfg.attn_layer_idx
                    else self.mixer(u_BxLxD, seq_idx_BxL))
        is_attn = jnp.asarray(attention_rows(cfg))[layer_id]
        # Under autodiff a cond keeps the residuals of both branches (the untaken as zeros)
        # on every layer; recomputing attention from its input leaves it only that input.
        attend = jax.checkpoint(lambda u: self.attend(u, seq_idx_BxL))
        return jax.lax.cond(is_attn, lambda: attend(u_BxLxD),
                            lambda: self.mixer(u_BxLxD, seq_idx_BxL))

    def attend(self, u_BxLxD, seq_idx_BxL):
        """Attention on the weights stored in the front of the mixer's in_proj/out_proj."""
        mixer_params = nnx.to_pure_dict(nnx.state(self.mixer, nnx.Param))
        w_in, w_out = attention_weights(mixer_params, self.cfg)
        b_in = None if self.attn_in_bias is None else self.attn_in_bias[...]
        b_out = None if self.attn_out_bias is None else self.attn_out_bias[...]
        return self_attention(u_BxLxD, w_in, b_in, w_out, b_out, self.cfg, seq_idx_BxL)


def attention_rows(cfg: ModelConfig) -> tuple[bool, ...]:
    """Per global layer (plus the padding row n_layer): whether it is an attention layer."""
    return tuple(i in cfg.attn_layer_idx for i in range(cfg.n_layer + 1))


def attention_weights(mixer_params: dict, cfg: ModelConfig):
    """(w_in [D, A (Q + 2 R)], w_out [Q A, D]) of an attention layer from its mixer's
    parameters: the front columns of the Mamba2 in_proj and the front rows of its out_proj
    (the rest of both, and the Mamba2 biases, unread)."""
    n_in, n_out = cfg.attn_widths
    return (mixer_params["in_proj"]["kernel"][..., :n_in],
            mixer_params["out_proj"]["kernel"][..., :n_out, :])


def residual_out_scale(cfg: ModelConfig) -> float:
    """mamba_ssm rescales the residual-branch output projections by 1/sqrt(n per layer * Y)."""
    return 1.0 / math.sqrt((1 if cfg.mlp == "none" else 2) * cfg.n_layer)


@functools.lru_cache(maxsize=None)
def block_graphdef(cfg: ModelConfig):
    """The static structure of one block; its parameters come from the stacked dict."""
    return nnx.split(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))[0]


def init_block(cfg: ModelConfig, key):
    return nnx.to_pure_dict(nnx.state(Block(cfg, nnx.Rngs(key)), nnx.Param))


def init_params(cfg: ModelConfig, key) -> dict:
    """Fresh fp32 parameters with a leading layer axis on every block parameter."""
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    V, D = cfg.padded_vocab, cfg.d_model
    params = {
        "embed": {"embedding": 0.02 * jax.random.normal(k_embed, (V, D), jnp.float32)},
        "layers": jax.vmap(functools.partial(init_block, cfg))(
            jax.random.split(k_layers, cfg.n_layer)),
        "norm_f": {"scale": jnp.ones((D,), jnp.float32)},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": uniform_init(1 / math.sqrt(D))(k_head, (D, V))}
    if cfg.attn_layer_idx:
        params["layers"] = init_attention_rows(params["layers"], cfg,
                                               jax.random.fold_in(k_layers, 1))
    return params


def init_attention_rows(layers, cfg: ModelConfig, key):
    """Attention layers' rows: fresh q/k/v and output weights (torch Linear init, the output
    rescaled as mamba_ssm does) in front of the mixer's in_proj/out_proj; every other entry
    of those rows zero (stored, never read: zero gradient, so it stays zero)."""
    n_in, n_out = cfg.attn_widths
    out_scale = residual_out_scale(cfg)
    rows = jnp.asarray(cfg.attn_layer_idx)
    n = len(cfg.attn_layer_idx)
    k_in, k_out = jax.random.split(key)
    w_in = uniform_init(1 / math.sqrt(cfg.d_model))(k_in, (n, cfg.d_model, n_in))
    w_out = uniform_init(out_scale / math.sqrt(n_out))(k_out, (n, n_out, cfg.d_model))
    mixer = jax.tree.map(lambda a: a.at[rows].set(0.0), layers["mixer"])
    mixer["in_proj"]["kernel"] = mixer["in_proj"]["kernel"].at[rows, :, :n_in].set(w_in)
    mixer["out_proj"]["kernel"] = mixer["out_proj"]["kernel"].at[rows, :n_out].set(w_out)
    return {**layers, "mixer": mixer}


def embed(embed_params, tokens_BxL, cfg: ModelConfig):
    """Token embedding; returns the (hidden, residual) pair that enters layer 0."""
    hidden = embed_params["embedding"][tokens_BxL].astype(jnp.dtype(cfg.dtype))
    res_dtype = jnp.float32 if cfg.residual_in_fp32 else jnp.dtype(cfg.dtype)
    return hidden, jnp.zeros(hidden.shape, res_dtype)


# full: recompute every layer in the backward except what crossed the network (values named
# moe.EXCHANGED: at ep=2 that drops 2 of the 6 all-to-alls a layer and the exchange's
# packing, for about the size of the MoE input and output a layer); full_with_comm: recompute
# those as well (least memory). Without expert parallelism the two are the same.
_cp = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,
    "full": _cp.save_only_these_names(EXCHANGED),
    "full_with_comm": _cp.nothing_saveable,
    "dots": _cp.dots_with_no_batch_dims_saveable,
}


# The name under which each layer's input is saved when the caller rematerialises a whole
# stack but keeps the layer inputs (the pipeline does: see parallel/pipeline.py).
LAYER_INPUT = "layer_input"


def scans(cfg: ModelConfig) -> bool:
    """Whether the layer stack runs as one lax.scan. `scan_layers` None (auto) is settled
    per layout by parallel.setup.with_layer_stack; the model alone reads it as the scan."""
    return cfg.scan_layers is not False


def run_layers(layers_YxTree, hidden, residual, cfg: ModelConfig, remat: str = "none",
               experts_fn=moe_dropless, n_active=None, seq_idx_BxL=None, layer_ids_Y=None):
    """Scans the blocks of a [Y, ...] parameter stack over (hidden, residual).

    With n_active (a traced int), rows >= n_active are padding and are skipped by a cond, so
    a pipeline stage with fewer layers does not pay for them. layer_ids_Y: each row's global
    layer index (default: row i is layer i, the whole stack).
    Returns (hidden, residual, aux_B, z_B, counts_YxE, dropped): aux, z and dropped token
    copies summed over the Y layers.
    """
    graphdef = block_graphdef(cfg)
    n_experts = max(cfg.n_experts, 1)

    def make_body(static_id=None):
        """The scan body; static_id: a layer index standing for every row's (hybrid
        segments of one kind), so Block.mix picks the mixer without a cond."""
        def block(carry, xs):
            layer_params, layer_id = xs
            layer_id = layer_id if static_id is None else static_id
            h, r, aux_B, z_B, dropped = checkpoint_name(carry, LAYER_INPUT)
            h, r, a, z, counts_E, d = nnx.merge(graphdef, layer_params)(
                h, r, experts_fn, seq_idx_BxL, layer_id)
            return (h, r, aux_B + a, z_B + z, dropped + d), counts_E

        if remat != "none":
            # A scan keeps XLA from merging the recompute with the forward on its own;
            # unrolled layers need prevent_cse, or the "remat" keeps forward values (moe_1b
            # at batch 16 on one H100 without it: 42.5 GB, where the scan needs 20.7; with
            # it: not yet measured on a GPU).
            block = jax.checkpoint(block, policy=REMAT_POLICIES[remat],
                                   prevent_cse=not scans(cfg))
        if n_active is None:
            return block

        def body(carry, xs):
            j, layer_xs = xs
            def skip(c, _):
                return c, jnp.zeros_like(c[0], shape=(n_experts,), dtype=jnp.int32)
            return jax.lax.cond(j < n_active, block, skip, carry, layer_xs)
        return body

    def run(carry, xs, body):
        n = jax.tree.leaves(xs)[0].shape[0]
        if n_active is not None:
            xs = (jnp.arange(n), xs)
        if scans(cfg):
            return jax.lax.scan(body, carry, xs)
        # The scan's twin, unrolled: the same math, layer i on row i. One jitted layer
        # called n times: JAX lowers it (and its Pallas kernels) once, and XLA inlines the
        # calls (moe_1b on the CPU: lowering 6.2 -> 2.2 s, compile the same; on GPUs not
        # yet measured: scripts/compile_time.py).
        layer = jax.jit(body)
        counts = []
        for i in range(n):
            carry, counts_E = layer(carry, jax.tree.map(lambda x: x[i], xs))
            counts.append(counts_E)
        return carry, jnp.stack(counts)

    n_rows = jax.tree.leaves(layers_YxTree)[0].shape[0]
    ids_Y = jnp.arange(n_rows) if layer_ids_Y is None else layer_ids_Y
    zeros_B = jnp.zeros_like(hidden, shape=hidden.shape[:1], dtype=jnp.float32)
    dropped0 = jnp.zeros_like(hidden, shape=(), dtype=jnp.int32)
    carry = (hidden, residual, zeros_B, zeros_B, dropped0)
    segments = kind_segments(cfg, layer_ids_Y, n_rows) if n_active is None else None
    if segments is None:
        carry, counts_YxE = run(carry, (layers_YxTree, ids_Y), make_body())
    else:  # static layer ids: one scan per run of layers of one kind, no cond
        counts = []
        for start, end, layer_id in segments:
            part = jax.tree.map(lambda a: a[start:end], (layers_YxTree, ids_Y))
            carry, c = run(carry, part, make_body(layer_id))
            counts.append(c)
        counts_YxE = jnp.concatenate(counts)
    hidden, residual, aux_B, z_B, dropped = carry
    return hidden, residual, aux_B, z_B, counts_YxE, dropped


def kind_segments(cfg: ModelConfig, layer_ids_Y, n_rows: int):
    """[(start, end, a layer id of the run)]: the runs of rows of one mixer kind, when the
    ids are known while tracing (None: all rows; or a numpy array) in a hybrid stack. None
    otherwise (one piece: a plain stack, or traced ids, where Block.mix uses a cond)."""
    if not cfg.attn_layer_idx or not (layer_ids_Y is None
                                      or isinstance(layer_ids_Y, np.ndarray)):
        return None
    ids = list(range(n_rows)) if layer_ids_Y is None else layer_ids_Y.tolist()
    kinds = [i in cfg.attn_layer_idx for i in ids]
    cuts = [0] + [j for j in range(1, n_rows) if kinds[j] != kinds[j - 1]] + [n_rows]
    return [(a, b, int(ids[a])) for a, b in zip(cuts[:-1], cuts[1:])]


def _head_parts(params, hidden, residual, cfg: ModelConfig):
    """Final add + RMSNorm -> (normed [..., D] in the compute dtype, lm_head weight [D, V]
    in the parameters' dtype; tied to the embedding unless configured otherwise)."""
    residual = hidden.astype(residual.dtype) + residual
    h = rms_norm(residual, params["norm_f"]["scale"], cfg.rms_norm_eps, jnp.dtype(cfg.dtype))
    w_DxV = (params["embed"]["embedding"].T if cfg.tie_embeddings
             else params["lm_head"]["kernel"])
    return h, w_DxV


def head_logits(params, hidden, residual, cfg: ModelConfig):
    """Final add + RMSNorm + lm_head."""
    h, w_DxV = _head_parts(params, hidden, residual, cfg)
    return jnp.dot(h, w_DxV.astype(h.dtype))


# model.loss_chunks = 0 splits the head into chunks of about this many tokens: 8 chunks of
# 4096 cost nothing measurable on H200s, 8 of 512 cost 4.5% of a small step
# (docs/benchmarks.md, thirteenth session).
LOSS_CHUNK_TOKENS = 4096


def loss_chunk_count(cfg: ModelConfig, n_tokens: int) -> int:
    """How many chunks the head and loss of n_tokens tokens run in (1: the plain head)."""
    return cfg.loss_chunks or max(1, -(-n_tokens // LOSS_CHUNK_TOKENS))


def head_losses(params, hidden, residual, targets_BxL, mask_BxL, cfg: ModelConfig):
    """(nll_sum, correct_sum) of the head's logits: token_losses(head_logits(...)), or
    in more than one chunk (loss_chunk_count) the same through xent.linear_token_losses,
    which makes one chunk of tokens' logits at a time (no [B, L, V] array in the step)."""
    chunks = loss_chunk_count(cfg, targets_BxL.size)
    if chunks <= 1:
        return token_losses(head_logits(params, hidden, residual, cfg), targets_BxL, mask_BxL)
    h_BxLxD, w_DxV = _head_parts(params, hidden, residual, cfg)
    D = h_BxLxD.shape[-1]
    return linear_token_losses(h_BxLxD.reshape(-1, D), w_DxV, targets_BxL.reshape(-1),
                               mask_BxL.reshape(-1), chunks)


def total_loss(cfg: ModelConfig, nll_sum, n_tokens, aux_sum, z_sum, n_rows):
    """Token-weighted cross-entropy over the whole batch plus the layer-mean MoE losses.

    aux_sum and z_sum are summed over rows and layers; dividing by (rows * layers) gives
    the per-layer mean of the per-sequence losses.
    """
    ce = nll_sum / jnp.maximum(n_tokens, 1.0)
    aux = aux_sum / (n_rows * cfg.n_layer)
    z = z_sum / (n_rows * cfg.n_layer)
    loss = ce
    if cfg.mlp == "moe":
        loss = loss + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
    return loss, {"ce": ce, "aux_loss": aux, "z_loss": z}


def loss_fn(params, batch, cfg: ModelConfig, remat: str = "none"):
    """Single-device loss: the reference every parallel layout must match."""
    hidden, residual = embed(params["embed"], batch["inputs"], cfg)
    hidden, residual, aux_B, z_B, counts_YxE, dropped = run_layers(
        params["layers"], hidden, residual, cfg, remat, seq_idx_BxL=batch.get("seq_idx"))
    nll_sum, correct_sum = head_losses(params, hidden, residual, batch["targets"],
                                       batch["mask"], cfg)
    n_tokens = jnp.sum(batch["mask"].astype(jnp.float32))
    loss, parts = total_loss(cfg, nll_sum, n_tokens, jnp.sum(aux_B), jnp.sum(z_B),
                             batch["inputs"].shape[0])
    return loss, {**parts, "accuracy": correct_sum / jnp.maximum(n_tokens, 1.0),
                  "expert_counts": counts_YxE, "dropped_tokens": dropped}
