"""scripts/hlo_sources.py and trace_share.device_shares(sources=): a profile's kernels summed
by the Python line that made them (the tool issue 17's profile uses on the GPU)."""

import gzip
import inspect
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))

from hlo_sources import parse_module  # noqa: E402
from trace_share import device_shares  # noqa: E402


def _loss(x, w):
    y = jnp.tanh(x @ w)  # the matmul's line
    return jnp.sum(y * y)


def test_compiled_ops_map_to_lines_forward_and_backward():
    text = jax.jit(jax.grad(_loss, argnums=1)).lower(jnp.ones((8, 8)), jnp.ones((8, 8))) \
        .compile().as_text()
    module, table = parse_module(text)
    assert module.startswith("jit_")
    first = inspect.getsourcelines(_loss)[1]
    matmul_line = first + 1
    here = {op: s for op, s in table.items() if s.file == "test_hlo_sources.py"}
    assert here, table
    assert {s.function for s in here.values()} == {"_loss"}
    assert {s.line for s in here.values()} <= {matmul_line, matmul_line + 1}
    dots = [s for op, s in here.items() if op.startswith("dot")]
    # the forward matmul and the weight gradient's, both from the matmul's line
    assert {(s.line, s.backward) for s in dots} == {(matmul_line, False), (matmul_line, True)}
    # a fusion names the functions of the ops fused into it
    fused = [s for op, s in here.items() if "fusion" in op]
    assert fused and all(s.contents.startswith("test_hlo_sources.py _loss") for s in fused)


def test_device_time_by_line_from_a_gpu_shaped_trace(tmp_path):
    text = jax.jit(jax.grad(_loss, argnums=1)).lower(jnp.ones((8, 8)), jnp.ones((8, 8))) \
        .compile().as_text()
    module, table = parse_module(text)
    ops = sorted(table)
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
               "args": {"name": "Stream #13(Compute)"}}]
    # 1 ms for each known op, plus one op XLA made itself (no source)
    for n, op in enumerate(ops + ["copy_fusion.99"]):
        events.append({"ph": "X", "pid": 1, "tid": 7, "ts": 10.0 * n, "dur": 1000.0,
                       "name": op, "args": {"hlo_module": module, "hlo_op": op}})
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    shares = device_shares(str(path), 1.0, {(module, op): s for op, s in table.items()})
    by_fn = dict(shares["functions_ms_per_device"])
    by_line = dict(shares["lines_ms_per_device"])
    assert sum(by_fn.values()) == len(ops) + 1
    assert by_fn["(no source)"] == 1.0
    assert sum(v for k, v in by_fn.items() if "_loss" in k) == sum(
        1 for s in table.values() if s.function == "_loss")
    assert by_line["(no source) copy_fusion"] == 1.0
    assert sum(dict(shares["fusions_ms_per_device"]).values()) == len(ops) + 1
    assert any(k.startswith("bwd test_hlo_sources.py:") for k in by_line)
