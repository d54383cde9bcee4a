"""scripts/compile_time.py --cross_lower: the train step traced and lowered for CUDA on a
CPU host, as a Hopper GPU would run it (the Pallas kernels as GPU custom calls)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cross_lower(out, *flags):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compile_time.py"),
                           "--out", str(out), "--cross_lower", *flags], timeout=900,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.load(open(out / "compile_time.json"))


def test_cross_lowering_takes_the_gpu_paths(tmp_path):
    """moe_1b at ep=2 (the script simulates the 2 devices): the SSD kernel as Triton calls
    (not interpret mode) and the Hopper grouped matmul as Mosaic GPU calls."""
    [row] = cross_lower(tmp_path, "--preset", "moe_1b", "--layouts", "1x2",
                        "--variants", "scan:full")
    assert row["rc"] == 0 and row["compile_s"] == "-", row  # lowered only
    assert row["triton_calls"] > 0 and row["mosaic_calls"] > 0, row


def test_norm_kernels_lower_for_cuda(tmp_path):
    """--norm_impl pallas: the add + norm and gated norm kernels pass Pallas' Triton lowering
    (every primitive they use has a GPU lowering), none falling back to XLA."""
    rows = {}
    for name, extra in (("xla", ""), ("pallas", " --norm_impl pallas")):
        [rows[name]] = cross_lower(tmp_path / name, "--preset", "cpu_demo", "--layouts", "1x1",
                                   "--variants", "scan:full", "--flags", "--n_layer 2" + extra)
    assert rows["xla"]["rc"] == 0 and rows["pallas"]["rc"] == 0, rows
    # Three norms a layer (two add + norm, one gated), each a forward, a backward and, under
    # full remat, a forward again: 9 kernels more in the scanned layer's body.
    assert rows["pallas"]["triton_calls"] - rows["xla"]["triton_calls"] == 9, rows
