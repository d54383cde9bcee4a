"""Bamba-9B's hybrid shape (d_model 4096, 32 layers, 128 Mamba2 heads of 64, d_state 128,
attention at layers 9, 18 and 27 with 32 query and 8 key/value heads of 128 and rotary on
64 dims, Llama-3 vocabulary 128256, untied head) with a Mixtral-style MoE: 8 experts,
top-2, expert hidden 7168, so the two active experts match Bamba-9B's dense 14336 MLP.
About 26.9B parameters stored (0.18B of them the attention layers' unread Mamba2 storage,
docs/design.md), ~8.7B multiplied per token in the layer stack. Laid out for 8 GPUs: 4
pipeline stages (8 layers each) x 2 expert-parallel ranks (4 experts each), 16
microbatches (GPipe bubble 3/19), full remat.
"""

import dataclasses

from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig

CONFIG = Config(
    model=dataclasses.replace(
        ModelConfig(), d_model=4096, n_layer=32, vocab_size=128256, d_state=128, headdim=64,
        chunk_size=256, tie_embeddings=False, dtype="bfloat16",
        n_experts=8, top_k=2, d_expert=7168,
        attn_layer_idx=(9, 18, 27), attn_num_heads=32, attn_num_heads_kv=8,
        attn_head_dim=128, attn_rotary_dim=64),
    train=dataclasses.replace(
        TrainConfig(), steps=100_000, batch_size=32, seq_len=4096, lr=3e-4,
        warmup_steps=2000, log_dir="runs/bamba9b_moe"),
    parallel=dataclasses.replace(
        ParallelConfig(), pp=4, ep=2, microbatches=16, remat="full"),
)
