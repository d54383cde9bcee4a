"""Every shipped preset builds (shapes only, nothing allocated) with the hand-counted size."""

import jax
import pytest

from jmamba import flops, model
from jmamba.cli import available_presets, load_preset
from jmamba.config import validate


@pytest.mark.parametrize("name", available_presets())
def test_preset_shapes_match_param_formula(name):
    cfg = validate(load_preset(name))
    shapes = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert n == flops.param_count(cfg.model)


def test_preset_sizes():
    assert 0.9e9 < flops.param_count(load_preset("moe_1b").model) < 1.1e9
    big = load_preset("bamba9b_moe")
    assert (big.model.d_model, big.model.n_layer, big.model.vocab_size) == (4096, 32, 128256)
    assert big.parallel.pp * big.parallel.ep == 8
    assert big.model.attn_layer_idx == (9, 18, 27) and big.model.attn_heads == (32, 8, 128)
