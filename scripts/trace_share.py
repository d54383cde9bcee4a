"""Device time by kind of collective in a jax.profiler perfetto trace (perfetto_trace.json.gz).

GPU traces hold one process per device with several lines: CUDA streams (the kernels as they
ran) and derived lines ("XLA Ops", "XLA Modules", ...) that repeat the same time. Only
stream lines are summed, so nothing counts twice. A kernel is classed by its name and its
`hlo_op` argument: expert all-to-all (XLA all-to-all or ragged-all-to-all), pipeline
transfer (collective-permute), other NCCL work (all-reduce of gradients, ...).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re

from hlo_sources import lookup

KINDS = (("all_to_all", re.compile(r"all-to-all|all_to_all|alltoall", re.I)),
         ("permute", re.compile(r"collective-permute|ppermute", re.I)),
         ("other_comm", re.compile(r"nccl|all-reduce|all-gather|reduce-scatter", re.I)))


def find_trace(log_dir: str) -> str | None:
    files = sorted(glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                               recursive=True), key=os.path.getmtime)
    return files[-1] if files else None


def classify(event: dict) -> str | None:
    args = event.get("args") or {}
    text = " ".join(str(x) for x in (event.get("name", ""), args.get("hlo_op", ""),
                                     args.get("long_name", "")))
    for kind, pattern in KINDS:
        if pattern.search(text):
            return kind
    return None


def device_shares(path: str, window_s: float, sources: dict | None = None) -> dict:
    """Per-kind device seconds, averaged over devices, as a share of `window_s` (the traced
    steps' wall time). Also the busiest kernel names, to check the classification by eye,
    and with `sources` (hlo_sources.read_sources of the run's HLO dump) device ms by the
    Python line and by the function that made each kernel, forward and backward apart, and
    by what each fusion holds (the functions of its fused ops)."""
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for ev in events:
        if ev.get("ph") == "M" and ev.get("name") == "process_name":
            procs[ev["pid"]] = ev["args"].get("name", "")
        if ev.get("ph") == "M" and ev.get("name") == "thread_name":
            threads[(ev["pid"], ev.get("tid"))] = ev["args"].get("name", "")
    devices = {pid for pid, name in procs.items() if re.search(r"GPU|device", name, re.I)}
    per_device: dict[int, dict[str, float]] = {}
    top: dict[str, float] = {}
    groups: dict[str, float] = {}
    by_line: dict[str, float] = {}
    by_function: dict[str, float] = {}
    by_contents: dict[str, float] = {}
    for ev in events:
        if ev.get("ph") != "X" or ev.get("pid") not in devices:
            continue
        line = threads.get((ev["pid"], ev.get("tid")), "")
        if not re.match(r"stream", line, re.I):
            continue
        dur = ev.get("dur", 0.0) / 1e6
        kind = classify(ev) or "compute"
        d = per_device.setdefault(ev["pid"], {})
        d[kind] = d.get(kind, 0.0) + dur
        key = f"{kind}: {(ev.get('args') or {}).get('hlo_op', '') or ev.get('name', '')}"[:70]
        top[key] = top.get(key, 0.0) + dur
        g = group_key(ev)
        groups[g] = groups.get(g, 0.0) + dur
        if sources is not None:
            args = ev.get("args") or {}
            src = lookup(sources, str(args.get("hlo_module", "")), str(args.get("hlo_op", "")))
            line_key = src.label() if src else f"(no source) {g}"
            fn_key = (f"{src.phase} {src.file} {src.function}"
                      + (f" < {src.caller}" if src.caller else "") if src else "(no source)")
            by_line[line_key] = by_line.get(line_key, 0.0) + dur
            by_function[fn_key] = by_function.get(fn_key, 0.0) + dur
            what = f"{src.phase} {src.contents or src.where()}" if src else f"(no source) {g}"
            by_contents[what] = by_contents.get(what, 0.0) + dur
    n = max(len(per_device), 1)
    kinds = {k for d in per_device.values() for k in d}
    share = {k: sum(d.get(k, 0.0) for d in per_device.values()) / n / window_s
             for k in sorted(kinds)}
    busiest = sorted(top.items(), key=lambda kv: -kv[1])[:12]
    lines = sorted({name for (pid, _), name in threads.items() if pid in devices})[:12]
    def per_device_ms(table, top):
        return [(k, round(1e3 * v / n, 2)) for k, v in
                sorted(table.items(), key=lambda kv: -kv[1])[:top]]
    out = {"devices": len(per_device), "share": share, "processes": sorted(procs.values()),
           "device_lines": lines,
           "top_ms_all_devices": [(k, round(1e3 * v, 2)) for k, v in busiest],
           "groups_ms_per_device": per_device_ms(groups, 30)}
    if sources is not None:
        out["lines_ms_per_device"] = per_device_ms(by_line, 60)
        out["functions_ms_per_device"] = per_device_ms(by_function, 40)
        out["fusions_ms_per_device"] = per_device_ms(by_contents, 40)
    return out


def group_key(event: dict) -> str:
    """A kernel's kind of work: its HLO op without the numeric suffix (loop_gather_fusion,
    all-to-all-start, ...), or for custom calls (Pallas, Mosaic, cuBLAS) the kernel name
    without digits (each Pallas kernel apart, e.g. the SSD backward's two). Meaningful when
    XLA's command buffers are off (XLA_FLAGS=--xla_gpu_enable_command_buffer=), else most
    time is one command_buffer."""
    args = event.get("args") or {}
    op = re.sub(r"[.\d]+$", "", str(args.get("hlo_op", "")))
    if not op or op.startswith(("custom-call", "command_buffer", "pallas_call")):
        name = re.sub(r"\d+", "", str(event.get("name", "")))[:48]
        return f"{op or '?'}:{name}"
    return op
