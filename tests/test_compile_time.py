"""scripts/compile_time.py --cross_lower: the train step traced and lowered for CUDA on a
CPU host, as a Hopper GPU would run it (the Pallas kernels as GPU custom calls)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cross_lowering_takes_the_gpu_paths(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compile_time.py"),
                    "--out", str(tmp_path), "--cross_lower", "--preset", "cpu_demo",
                    "--variants", "scan:full,unrolled:none"], check=True, timeout=600,
                   capture_output=True)
    rows = json.load(open(tmp_path / "compile_time.json"))
    assert [r["rc"] for r in rows] == [0, 0], rows
    for r in rows:
        assert r["compile_s"] == "-"  # lowered only
        assert r["kernel_calls"] > 0  # the SSD kernel as Triton calls, not interpret mode
