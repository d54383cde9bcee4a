"""Watching a run: metrics to JSONL and TensorBoard, a progress bar or log lines, device
memory, and jax.profiler traces of chosen steps."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax

# Keys every logged step carries (more may come from the step: ce, accuracy, aux_loss...).
SHOWN = (("loss", "loss {:.4f}"), ("accuracy", "acc {:.3f}"), ("grad_norm", "gnorm {:.3f}"),
         ("lr", "lr {:.2e}"), ("tokens_per_s", "{:.0f} tok/s"), ("mfu", "mfu {:.1%}"),
         ("eval_loss", "eval_loss {:.4f}"), ("eval_accuracy", "eval_acc {:.3f}"))


def device_memory() -> dict[str, float]:
    """Bytes in use and peak, summed over this process's devices, from memory_stats(), and
    the largest single device's peak (what must fit on one GPU).

    The CPU backend has no memory_stats (returns None), so on CPU the keys are left out
    rather than reported as a misleading 0.
    """
    used = peak = device_peak = 0
    for d in jax.local_devices():
        stats = d.memory_stats()
        if not stats:
            return {}
        used += stats.get("bytes_in_use", 0)
        peak += stats.get("peak_bytes_in_use", 0)
        device_peak = max(device_peak, stats.get("peak_bytes_in_use", 0))
    return {"memory_gb": used / 2**30, "peak_memory_gb": peak / 2**30,
            "device_peak_memory_gb": device_peak / 2**30}


MEMORY_KEYS = ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes")


def compiled_memory(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled step from XLA's memory analysis (every device of an
    SPMD mesh runs the same program, so this is the fullest device's): its arguments,
    outputs and temporaries, and their total less the donated (aliased) bytes, which
    outputs reuse. {} where the backend gives no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    arg, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
    temp, alias = stats.temp_size_in_bytes, stats.alias_size_in_bytes
    return {"argument_bytes": int(arg), "output_bytes": int(out), "temp_bytes": int(temp),
            "total_bytes": int(arg + out + temp - alias)}


def write_memory_report(log_dir: str, report: dict) -> str:
    """<log_dir>/memory.json, and the line train.py prints before the first step."""
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "memory.json"), "w") as f:
        json.dump(report, f, indent=1)
    gb = lambda k: report[k] / 2**30
    return (f"jmamba: the compiled step needs {gb('total_bytes'):.2f} GB per device "
            f"(arguments {gb('argument_bytes'):.2f}, outputs {gb('output_bytes'):.2f}, "
            f"temporaries {gb('temp_bytes'):.2f}; XLA's estimate, in "
            f"{os.path.join(log_dir, 'memory.json')})")


def device_pool_bytes() -> int | None:
    """The bytes one device's allocator may hold (JAX's pool: by default 75% of a GPU), or
    None where the backend does not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


# The share of the device pool a step may plan to use and still count as fitting: XLA's
# estimate matched the measured peak within 0.2% on H200s (docs/benchmarks.md); the rest is
# room for fragmentation and the loop's own arrays.
FIT_SHARE = 0.95


def fits(report: dict, pool_bytes: int | None) -> bool:
    """Whether XLA's estimate fits the pool (True where either is unknown, as on the CPU)."""
    return not report or not pool_bytes or report["total_bytes"] <= FIT_SHARE * pool_bytes


def fit_warning(report: dict, pool_bytes: int | None, fixes: list[str]) -> str | None:
    """One line naming what to change (`fixes`, the layout's: driver.memory_fixes) when
    XLA's estimate exceeds the device pool."""
    if not report or not pool_bytes or report["total_bytes"] <= pool_bytes:
        return None
    return (f"jmamba: warning: the step needs {report['total_bytes'] / 2**30:.1f} GB per "
            f"device but the device pool holds {pool_bytes / 2**30:.1f} GB, so it will likely "
            f"run out of memory: {', '.join(fixes)}, or let JAX take more of "
            f"the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION)")


def _tensorboard(log_dir: str):
    """A tensorboardX SummaryWriter, or None (with a note) when tensorboardX is missing."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        print("jmamba: tensorboardX not installed; metrics go to metrics.jsonl only",
              file=sys.stderr)
        return None
    return SummaryWriter(log_dir, flush_secs=10)


def keep_records_up_to(path: str, step: int) -> None:
    """Rewrites a metrics.jsonl without the records of steps after `step` (atomically: a
    temporary file renamed over it). Lines that do not parse are kept as they are."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                later = json.loads(line).get("step", 0) > step
            except (ValueError, AttributeError, TypeError):
                later = False
            if not later:
                kept.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class RunLog:
    """One record per logged step: appended to <log_dir>/metrics.jsonl, written as
    TensorBoard scalars under <log_dir>, and shown as a progress bar (terminal) or a line."""

    def __init__(self, log_dir: str, total_steps: int, progress: str = "auto",
                 enabled: bool = True, stream=None, start_step: int = 0):
        """start_step: the step a resumed run starts after. Records of later steps already
        in metrics.jsonl (logged by a run that stopped before its next checkpoint) are
        dropped, so the resumed run's records replace them instead of repeating them."""
        self.stream = stream or sys.stdout
        self.enabled = enabled  # only process 0 writes files and prints
        self.total = total_steps
        self.bar = progress == "bar" or (progress == "auto" and self.stream.isatty())
        self.start_time, self.start_step = None, 0
        self.last = {}
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, "metrics.jsonl")
            if start_step and os.path.exists(path):
                keep_records_up_to(path, start_step)
            self.file = open(path, "a")
            self.tb = _tensorboard(log_dir)

    def step_done(self, step: int) -> None:
        """Called every step (no device sync): moves the bar and its ETA."""
        if self.start_time is None:  # start the clock after the first (compiling) step
            self.start_time, self.start_step = time.perf_counter(), step
        if self.enabled and self.bar:
            self._draw(step)

    def eta_s(self, step: int) -> float:
        if self.start_time is None or step <= self.start_step:
            return math.nan
        rate = (time.perf_counter() - self.start_time) / (step - self.start_step)
        return rate * (self.total - step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.last = record
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self.tb.add_scalar(tag, value, record["step"])
        if self.bar:
            self._draw(record["step"])
        else:
            print(f"step {record['step']:6d}  " + self._summary(record), file=self.stream,
                  flush=True)

    def note(self, text: str) -> None:
        """A message that must not be overwritten by the bar."""
        if self.enabled:
            print(("\n" if self.bar else "") + text, file=self.stream, flush=True)

    def _summary(self, record: dict) -> str:
        return "  ".join(fmt.format(record[k]) for k, fmt in SHOWN if k in record)

    def _draw(self, step: int) -> None:
        width = 24
        filled = int(width * step / self.total)
        eta = self.eta_s(step)
        eta_text = "--:--" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
                          f"ETA {eta_text}  {self._summary(self.last)}\033[K")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.stream.write("\n")
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'10:13' -> (10, 13): trace steps 10, 11, 12 (half-open, like a Python slice)."""
    if not text:
        return None
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        start = stop = -1
    if not 1 <= start < stop:
        raise ValueError(f"config field 'train.profile_steps' = {text!r}: expected "
                         "'START:STOP' with 1 <= START < STOP, e.g. '10:13'")
    return start, stop


class Profiler:
    """Traces steps [start, stop) with jax.profiler into <log_dir>/plugins/profile/<run>/:
    an .xplane.pb (TensorBoard's profile plugin, XProf) and a perfetto_trace.json.gz
    (ui.perfetto.dev); each step is a StepTraceAnnotation."""

    def __init__(self, log_dir: str, steps: str, enabled: bool = True):
        window = parse_profile_steps(steps) if enabled else None
        self.start, self.stop = window or (0, 0)
        self.log_dir, self.active = log_dir, False

    def step(self, step: int):
        """Context manager around one step: starts/stops the trace at the window's edges."""
        if step == self.start:
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self.active = True
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, state) -> None:
        """Ends the trace after the window's last step, once its work has finished."""
        if self.active and step == self.stop - 1:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False

    def close(self) -> None:
        if self.active:  # the run ended inside the window
            jax.profiler.stop_trace()
            self.active = False
