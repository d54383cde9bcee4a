"""The GPU kernels inside the pipeline's shard_map, with vma checking on, at the layouts users
run: loss and every gradient equal the single-device model on its plain twins.

On the CPU the Pallas SSD and add + norm kernels run in interpret mode and the Mosaic
grouped matmul as a stand-in typed like the real kernel (tests/conftest.py). A second test traces the GPU path
itself (Triton lowering, not interpreted): vma typing errors are raised at trace time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
from jmamba.data import recall_batch
from jmamba.kernels import norm_pallas
from jmamba.kernels import ssd_pallas as ssd_pallas_mod
from tests.test_pp_ep import assert_grads_match, pipeline_parts, run, single_device

# Sizes the Triton kernel takes (headdim, d_state, chunk: powers of two >= 16).
MODEL = ModelConfig(d_model=16, n_layer=4, vocab_size=40, headdim=16, d_state=16,
                    chunk_size=16, n_experts=4, top_k=2, d_expert=16, ssm_impl="chunked")


def the_batch():
    return {k: jnp.asarray(v) for k, v in recall_batch(2, 0, 8, 24, 40, 4).items()}


def make_cfg(pp, ep, M, ssm_impl="kernel", schedule="1f1b", **parallel):
    # With the kernels, the block's add + norm runs as its Pallas kernel too (norm_pallas).
    norm_impl = "pallas" if ssm_impl == "kernel" else "xla"
    return validate(Config(
        model=ModelConfig(**{**MODEL.__dict__, "ssm_impl": ssm_impl, "norm_impl": norm_impl}),
        train=TrainConfig(batch_size=8, seq_len=24, n_pairs=4),
        parallel=ParallelConfig(pp=pp, ep=ep, microbatches=M,  # default EP: dropless
                                pp_schedule=schedule, **parallel)))


@pytest.fixture(scope="module")
def reference():
    return single_device(MODEL, the_batch())


# (2, 2, 2) with the kernels: test_packed_documents_in_shard_map_equal_single_device below
# (the same program plus document masks; one compile fewer for the suite's time).
@pytest.mark.parametrize("pp,ep,M", [(1, 1, 2), (2, 1, 2), (1, 2, 2)])
def test_kernels_in_shard_map_equal_single_device(reference, mosaic_standin, pp, ep, M):
    params, loss_ref, metrics_ref, grads_ref = reference
    loss, metrics, grads = run(make_cfg(pp, ep, M), params, the_batch())
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    np.testing.assert_array_equal(metrics["expert_counts"], metrics_ref["expert_counts"])
    assert int(metrics["dropped_tokens"]) == 0
    assert_grads_match(grads, grads_ref, atol=1e-4)


@pytest.mark.parametrize("schedule,stash", [("1f1b", "inputs"), ("gpipe", "inputs"),
                                            ("1f1b", "residuals")])
def test_gpu_path_types_trace_in_shard_map(reference, mosaic_standin, monkeypatch, schedule,
                                           stash):
    """The Triton path (interpret=False) traced, forward and backward, at (pp, ep, M) =
    (2, 2, 2) under 1F1B (its own VJP; with either stash) and GPipe (autodiff through the
    loop): every pallas_call output and custom-VJP cotangent must be typed, or tracing
    raises as it did on GPUs (and as the residual stash did before its leaves kept their
    types). The gradients' types must equal the parameters'."""
    monkeypatch.setattr(ssd_pallas_mod, "ssd_pallas",
                        functools.partial(ssd_pallas_mod.ssd_pallas, interpret=False))
    for name in ("add_rms_norm", "gated_rms_norm"):
        monkeypatch.setattr(norm_pallas, name,
                            functools.partial(getattr(norm_pallas, name), interpret=False))
    _, vg, stage_params = pipeline_parts(make_cfg(2, 2, 2, schedule=schedule, pp_stash=stash),
                                         reference[0])
    (loss, _), grads = jax.eval_shape(vg, stage_params, the_batch())
    assert loss.shape == ()
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(stage_params)):
        assert (g.shape, g.dtype) == (p.shape, p.dtype)


def packed_batch():
    """the_batch() with packed documents: boundaries at random places in every row."""
    from jmamba.tokens import mark_documents
    batch = {k: np.asarray(v) for k, v in the_batch().items()}
    rng = np.random.default_rng(3)
    inputs = batch["inputs"].copy()
    inputs[rng.random(inputs.shape) < 0.15] = 39  # 39 plays EOS
    batch["inputs"] = inputs
    return {k: jnp.asarray(v) for k, v in mark_documents(batch, 39).items()}


# (2, 1, 2) 1F1B is within (2, 2, 2); hybrid stacks run documents through more layouts
# (tests/test_attention.py). GPipe carries the documents through its own loop: checked
# on the chunked SSD (the interpreted kernel under GPipe's autodiff took ~97 s of the
# suite); the kernel's GPU path under GPipe is traced in test_gpu_path_types_trace_...
# The residual stash (off by default; slower than the default on GPUs, docs/benchmarks.md)
# runs at (2, 1, 2): at (2, 2, 2) it took ~75 s; its (2, 2, 2) GPU path is traced above.
@pytest.mark.parametrize("pp,ep,M,schedule,ssm_impl,parallel", [
    (2, 2, 2, "1f1b", "kernel", {}), (2, 1, 2, "gpipe", "chunked", {}),
    (2, 1, 2, "1f1b", "kernel", dict(pp_stash="residuals", pp_split="1,3"))])
def test_packed_documents_in_shard_map_equal_single_device(mosaic_standin, pp, ep, M,
                                                           schedule, ssm_impl, parallel):
    """seq_idx through the pipelines' microbatches and stages (the kernel in shard_map
    under 1F1B, with either stash; the residual one on uneven stages): loss and gradients
    equal one device's (chunked twin), which seq_idx changes."""
    batch = packed_batch()
    params, loss_ref, _, grads_ref = single_device(MODEL, batch)
    no_docs = {k: v for k, v in batch.items() if k != "seq_idx"}
    assert abs(float(single_device(MODEL, no_docs)[1]) - float(loss_ref)) > 1e-4
    cfg = make_cfg(pp, ep, M, ssm_impl=ssm_impl, schedule=schedule, **parallel)
    loss, _, grads = run(cfg, params, batch)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    assert_grads_match(grads, grads_ref, atol=1e-4)
