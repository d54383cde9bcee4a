"""Parameter counts and training FLOPs per token of the Mamba2-MoE LM, by hand formula.

Glossary: D d_model, I d_inner (expand * D), H heads, P head dim, N d_state, G groups,
X conv channels (I + 2 G N), E experts, K top-k, F expert hidden, V padded vocab,
Q chunk length, L sequence length, C chunks (ceil(L / Q)), Y layers.

FLOPs follow the usual model-FLOPs convention (Kaplan et al. 2020; PaLM appendix B):
a multiply-add is 2 FLOPs, the backward pass costs twice the forward, so a matmul with
N weights costs 6 N FLOPs per token for fwd + bwd. Only the parameters a token *uses*
count: its K experts, not all E. On top of the weight matmuls come the SSD scan's own
matmuls (chunked algorithm, Mamba-2 paper section 6), counted like attention in PaLM:
full Q x Q blocks, no discount for the causal mask, recomputation (remat) not counted.
Attention layers (hybrid stacks) count their q/k/v and output projections instead of the
Mamba2 mixer's, and PaLM's 4 L A Q forward FLOPs per token for scores and values (heads Q
of dim A, full L x L).
Elementwise work (norms, SiLU, softmax, the depthwise conv) is left out as is customary;
it is a few percent at the preset shapes.
"""

from __future__ import annotations

import math

from jmamba.config import ModelConfig

# Peak dense bf16 FLOP/s per device, by device kind (datasheet figures, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def mixer_params(m: ModelConfig) -> int:
    """One Mamba2 mixer: in_proj, conv1d, dt_bias, A_log, D, gated norm, out_proj."""
    D, I, H, G, N = m.d_model, m.d_inner, m.nheads, m.ngroups, m.d_state
    X = I + 2 * G * N
    in_out = D * (2 * I + 2 * G * N + H) + I * D
    biases = (2 * I + 2 * G * N + H + D) if m.bias else 0
    conv = m.d_conv * X + (X if m.conv_bias else 0)
    return in_out + biases + conv + 3 * H + I


def attention_biases(m: ModelConfig) -> int:
    """Attention bias entries a layer stores (every layer of a hybrid stack has the leaves)."""
    if not m.attn_layer_idx:
        return 0
    n_in, _ = m.attn_widths
    return (n_in if m.attn_qkv_bias else 0) + (m.d_model if m.attn_out_bias else 0)


def attention_params(m: ModelConfig) -> int:
    """The parameters one attention layer uses: its q/k/v and output weights (in its Mamba2
    mixer's storage) and its biases."""
    return m.d_model * sum(m.attn_widths) + attention_biases(m)


def unused_params(m: ModelConfig) -> int:
    """Stored but never read (docs/design.md, "Hybrid layers"): each attention layer's mixer
    storage beyond its attention weights, and the attention bias leaves of Mamba layers.
    Part of param_count."""
    n_attn = len(m.attn_layer_idx)
    weights = attention_params(m) - attention_biases(m)
    return n_attn * (mixer_params(m) - weights) + (m.n_layer - n_attn) * attention_biases(m)


def mlp_params(m: ModelConfig) -> int:
    """The channel mixer after each Mamba2 mixer (router + E experts, or one gated MLP)."""
    D = m.d_model
    if m.mlp == "moe":
        bias = m.n_experts if m.router_bias_rate > 0 else 0
        shared = gated_mlp_params(m, m.n_shared_experts * m.d_expert) if m.n_shared_experts else 0
        return D * m.n_experts + 3 * m.n_experts * D * m.d_expert + bias + shared
    if m.mlp == "dense":
        return gated_mlp_params(m, m.d_intermediate)
    return 0


def gated_mlp_params(m: ModelConfig, hidden: int) -> int:
    return 3 * m.d_model * hidden + ((2 * hidden + m.d_model) if m.bias else 0)


def block_params(m: ModelConfig) -> int:
    norms = m.d_model * (1 if m.mlp == "none" else 2)
    return norms + mixer_params(m) + attention_biases(m) + mlp_params(m)


def param_count(m: ModelConfig) -> int:
    """Total parameters, equal to the size of model.init_params(m, key)."""
    V, D = m.padded_vocab, m.d_model
    head = 0 if m.tie_embeddings else D * V
    return V * D + m.n_layer * block_params(m) + D + head


def active_matmul_params(m: ModelConfig) -> int:
    """Weights one token multiplies by in the layer stack (router + its K experts and the
    shared experts)."""
    D, I, H, G, N = m.d_model, m.d_inner, m.nheads, m.ngroups, m.d_state
    n_attn = len(m.attn_layer_idx)
    mixers = (m.n_layer - n_attn) * (D * (2 * I + 2 * G * N + H) + I * D)
    if n_attn:
        mixers += n_attn * D * sum(m.attn_widths)
    per_layer = 0
    if m.mlp == "moe":
        per_layer += D * m.n_experts + 3 * (m.top_k + m.n_shared_experts) * D * m.d_expert
    elif m.mlp == "dense":
        per_layer += 3 * D * m.d_intermediate
    return mixers + m.n_layer * per_layer


def ssd_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the chunked SSD's four matmul steps, one layer."""
    H, P, N, G, Q = m.nheads, m.headdim, m.d_state, m.ngroups, m.chunk_size
    C = math.ceil(seq_len / Q)
    cb = 2 * Q * G * N  # 1a. C B^T within a chunk: [Q, N] x [N, Q] per group
    diag = 2 * Q * H * P  # 1b. (C B^T o decay) X: [Q, Q] x [Q, P] per head
    states = 2 * H * P * N  # 2. chunk states: [P, Q] x [Q, N] per head
    # 3. pass states across chunks: [C+1, C+1] x [C+1, P N] per head and sequence.
    passing = 2 * H * P * N * (C + 1) ** 2 / seq_len
    off = 2 * H * P * N  # 4. state -> output: [Q, N] x [N, P] per head
    return cb + diag + states + passing + off


def attention_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one attention layer's scores and weighted values."""
    Q, _, A = m.attn_heads
    return 4 * seq_len * A * Q


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 6 N_active + SSD + attention +
    lm_head."""
    n_attn = len(m.attn_layer_idx)
    matmuls = 6 * active_matmul_params(m)
    ssd = 3 * (m.n_layer - n_attn) * ssd_flops_per_token(m, seq_len)
    attn = 3 * n_attn * attention_flops_per_token(m, seq_len) if n_attn else 0
    lm_head = 6 * m.d_model * m.padded_vocab
    return matmuls + ssd + attn + lm_head


def peak_tflops(device_kind: str, platform: str) -> float | None:
    """Peak dense bf16 TFLOP/s of one device, from its kind ('NVIDIA H100 80GB HBM3');
    None when unknown, CPUs included (no MFU is reported then; --peak_tflops sets it)."""
    del platform  # a CPU has no datasheet peak to count against
    for name, tflops in PEAK_TFLOPS.items():
        if name in device_kind:
            return tflops
    return None


def mfu(tokens_per_s: float, flops_token: float, peak_tflops_per_device: float,
        n_devices: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices used."""
    return tokens_per_s * flops_token / (peak_tflops_per_device * 1e12 * n_devices)
