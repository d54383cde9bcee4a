"""Bamba-9B's Mamba2 shape (d_model 4096, 32 layers, 128 heads of 64, d_state 128, Llama-3
vocabulary 128256, untied head) with a Mixtral-style MoE: 8 experts, top-2, expert hidden
7168, so the two active experts match Bamba-9B's dense 14336 MLP. About 26B parameters in
all, ~9.5B active per token. Laid out for 8 GPUs: 4 pipeline stages (8 layers each) x 2
expert-parallel ranks (4 experts each), 16 microbatches (GPipe bubble 3/19), full remat.
"""

import dataclasses

from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig

CONFIG = Config(
    model=dataclasses.replace(
        ModelConfig(), d_model=4096, n_layer=32, vocab_size=128256, d_state=128, headdim=64,
        chunk_size=256, tie_embeddings=False, dtype="bfloat16",
        n_experts=8, top_k=2, d_expert=7168),
    train=dataclasses.replace(
        TrainConfig(), steps=100_000, batch_size=32, seq_len=4096, lr=3e-4,
        warmup_steps=2000, log_dir="runs/bamba9b_moe"),
    parallel=dataclasses.replace(
        ParallelConfig(), pp=4, ep=2, microbatches=16, remat="full"),
)
