"""cpu_demo with attention: the 4-layer Mamba2-MoE whose layer 1 is causal grouped-query
attention (4 query heads, 2 key/value heads of 16, rotary on half of each head), the
Bamba / Nemotron-H pattern at CPU size. Trains associative recall in a few minutes."""

import dataclasses

from jmamba.config import Config, ModelConfig

CONFIG = Config(model=dataclasses.replace(
    ModelConfig(), attn_layer_idx=(1,), attn_num_heads=4, attn_num_heads_kv=2,
    attn_rotary_dim=8))
