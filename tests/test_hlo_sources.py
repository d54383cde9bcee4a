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
    assert {(s.line, s.phase) for s in dots} == {(matmul_line, "fwd"), (matmul_line, "bwd")}
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


SYNTHETIC = """HloModule jit_x, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

FileNames
1 "/src/jmamba/kernels/launch.py"
2 "/src/jmamba/kernels/norm_pallas.py"

FunctionNames
1 "typed_call.<locals>.run"
2 "_forward"
3 "add_rms_norm"

FileLocations
1 {file_name_id=1 function_name_id=1 line=31 end_line=31 column=1 end_column=9}
2 {file_name_id=2 function_name_id=2 line=80 end_line=80 column=1 end_column=9}
3 {file_name_id=2 function_name_id=3 line=120 end_line=120 column=1 end_column=9}

StackFrames
1 {file_location_id=3 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=1 parent_frame_id=3}

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %multiply.1 = f32[4]{0} multiply(%param_0, %param_0), metadata={op_name="jit(x)/transpose(jvp(x))/mul" stack_frame_id=2}
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %custom-call.1 = f32[4]{0} custom-call(%p), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(x)/pallas_call" stack_frame_id=3}
  ROOT %loop_multiply_fusion = f32[4]{0} fusion(%custom-call.1), kind=kLoop, calls=%fused_computation
}
"""


def test_kernel_launches_are_charged_past_the_launcher_and_bare_fusions_by_contents():
    """The dump prints a frame's parent id plus one (0: none). A kernel launched from
    launch.py is charged to the frame that called the launcher (with its caller); a fusion
    without metadata to the ops it holds."""
    module, table = parse_module(SYNTHETIC)
    assert module == "jit_x"
    kernel = table["custom-call.1"]
    assert (kernel.file, kernel.line, kernel.function, kernel.caller, kernel.phase) == (
        "norm_pallas.py", 80, "_forward", "add_rms_norm", "fwd")
    fusion = table["loop_multiply_fusion"]
    assert (fusion.file, fusion.line, fusion.function, fusion.phase) == (
        "norm_pallas.py", 0, "_forward", "bwd")
    assert fusion.contents == "norm_pallas.py _forward"
