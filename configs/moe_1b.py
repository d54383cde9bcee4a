"""A Mamba2-MoE of about 1B total parameters (~0.26B active) for one 80 GB GPU.

16 layers of d_model 1024 (mamba_ssm's 370M shape: headdim 64, d_state 128, chunk 256),
each followed by 16 SwiGLU experts of hidden 1024 with top-2 routing; GPT-NeoX vocabulary.
Train on token files: `python train.py --config moe_1b --data path/to/tokens`.
"""

import dataclasses

from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig

CONFIG = Config(
    model=dataclasses.replace(
        ModelConfig(), d_model=1024, n_layer=16, vocab_size=50277, pad_vocab_size_multiple=16,
        d_state=128, headdim=64, chunk_size=256, dtype="bfloat16",
        n_experts=16, top_k=2, d_expert=1024),
    train=dataclasses.replace(
        TrainConfig(), steps=10_000, batch_size=8, seq_len=2048, lr=3e-4, warmup_steps=500,
        log_dir="runs/moe_1b"),
    # On one GPU --scan_layers auto unrolls the layers and --remat auto then runs without
    # remat where that fits (47.2 GB at batch 16 on an H200: 200.4 ms against 257.9 with the
    # scan and full remat; a 36-s compile); other layouts scan with full remat
    # (docs/benchmarks.md, fourteenth session).
    parallel=ParallelConfig(),
)
