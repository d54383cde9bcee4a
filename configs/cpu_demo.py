"""The default: a 4-layer Mamba2-MoE (d_model 64, 4 experts, top-2) learning associative
recall on the CPU in a few minutes. The dataclass defaults are this preset."""

from jmamba.config import Config

CONFIG = Config()
