"""The training loop around the pure step: data, jit with donation, metrics, stopping."""

from __future__ import annotations

import contextlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jmamba import evaluate, flops
from jmamba.checkpoint import Checkpoints, orbax_messages_to
from jmamba.config import Config
from jmamba.data import RecallData
from jmamba.distributed import AgreedStop
from jmamba.guard import (EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY, Hooks, NonFiniteLoss, RunError,
                          SkipLimit, StopSignals, check_finite, is_out_of_memory)
from jmamba.metrics import (FIT_SHARE, Profiler, RunLog, compiled_memory, device_memory,
                            device_pool_bytes, fit_warning, fits, write_memory_report)
from jmamba.parallel.setup import (build, process_rows, remat_choices, scans_layers,
                                   uses_1f1b)
from jmamba.preflight import preflight
from jmamba.tokens import mark_documents


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def make_data(cfg: Config, rows=None):
    """Token files when --data is given, else the embedded recall task; both are
    deterministic iterators whose position is the step (state()/restore()). `rows`: the
    global batch rows this process's devices hold (process_rows), the only ones it reads."""
    m, t = cfg.model, cfg.train
    if t.data:
        if use_grain(t.loader):
            from jmamba.grain_data import GrainTokenData
            return GrainTokenData(t.data, t.batch_size, t.seq_len, m.vocab_size, t.seed,
                                  n_steps=t.steps, rows=rows)
        from jmamba.tokens import TokenData
        return TokenData(t.data, t.batch_size, t.seq_len, m.vocab_size, t.seed, rows=rows)
    return RecallData(t.seed, t.batch_size, t.seq_len, m.vocab_size, t.n_pairs, rows=rows)


def data_order(cfg: Config) -> str | None:
    """Which loader's order the token files are read in ('grain' or 'numpy'; the two
    shuffle differently); None for the embedded task."""
    return None if not cfg.train.data else "grain" if use_grain(cfg.train.loader) else "numpy"


def use_grain(loader: str) -> bool:
    """grain for loader 'grain' (an error names the fix if it is missing) or 'auto' when it
    is installed; the numpy twin otherwise (the same data definition, another order)."""
    if loader == "numpy":
        return False
    try:
        import grain  # noqa: F401
    except ImportError:
        if loader == "grain":
            raise SystemExit("error: --loader grain, but grain is not installed: "
                             "pip install grain, or pass --loader numpy")
        return False
    return True


def next_batch(data, flag: str = "--data", t=None):
    """The loader's next batch; a bad token file (an id outside the vocabulary, ...) stops
    the run with one line and exit 2, after the checkpoints already written are closed.
    With t (the train config) and token files that record document ends, the batch also
    carries their seq_idx (tokens.mark_documents)."""
    try:
        batch = next(data)
    except ValueError as e:
        raise RunError(f"{flag}: {e}", EXIT_BAD_INPUT) from None
    eos = getattr(data, "eos_id", None)
    if t is not None and t.documents and eos is not None:
        batch = mark_documents(batch, eos, t.loss_across_documents)
    return batch


def to_device(batch, run, rows, batch_size):
    """The step's global batch from this process's rows (`rows`, in the loader's order):
    one device gets plain arrays; a mesh gets arrays split over 'ep', each device given
    its own rows (from this process's copy, which holds no others)."""
    if run.batch_sharding is None:
        return jax.tree.map(jnp.asarray, batch)
    where = {g: i for i, g in enumerate(rows)}

    def place(x):
        shape = (batch_size,) + x.shape[1:]
        local = lambda index: x[[where[g] for g in range(*index[0].indices(shape[0]))]]
        return jax.make_array_from_callback(shape, run.batch_sharding, local)

    return jax.tree.map(place, batch)


def compile_step(run, cfg: Config, state, batch, note):
    """The compiled step and XLA's per-device memory report for it. Under --remat auto the
    step compiles without remat first and, when XLA's estimate does not fit the device's
    pool, again with full remat (setup.remat_choices): the fastest policy that fits. Every
    process takes process 0's decision, so all run one program."""
    choices = remat_choices(cfg)
    pool = device_pool_bytes()
    for i, remat in enumerate(choices):
        compiled = (run.step_fn if i == 0 else run.step_for(remat)).lower(state, batch).compile()
        memory = compiled_memory(compiled)
        ok = fits(memory, pool)
        if jax.process_count() > 1:
            ok = bool(multihost_utils.broadcast_one_to_all(np.bool_(ok)))
        if ok or i == len(choices) - 1:
            break
        note(f"jmamba: --remat auto: without remat the step needs "
             f"{memory['total_bytes'] / 2**30:.1f} GB per device, more than the pool's "
             f"{FIT_SHARE * pool / 2**30:.1f} GB; compiling with --remat {choices[i + 1]}")
    if cfg.model.scan_layers is None:
        scan = scans_layers(cfg)
        memory = {**memory, "scan_layers": scan} if memory else memory
        note(f"jmamba: --scan_layers auto chose {'the scan' if scan else 'unrolled layers'}")
    if cfg.parallel.remat == "auto":
        memory = {**memory, "remat": remat} if memory else memory
        note(f"jmamba: --remat auto chose {remat}")
    return compiled, memory


def peak_tflops(cfg: Config) -> float | None:
    device = jax.devices()[0]
    return cfg.train.peak_tflops or flops.peak_tflops(device.device_kind, device.platform)


def train(cfg: Config, hooks: Hooks | None = None) -> list[dict]:
    """Runs cfg.train.steps steps; returns the logged records. Stops early (after a full
    step, saving through hooks) on SIGINT/SIGTERM: SIGINT then raises SystemExit(130)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    # Paths, data files, disk space and the resume step, before anything heavy (RunError).
    resume_step = preflight(cfg)
    if resume_step == t.steps:
        print(f"jmamba: {t.ckpt_dir} already holds step {t.steps} = --steps: nothing to "
              "train (raise --steps to train on)", flush=True)
        return []
    # A run that will restore builds its state abstract: no memory for parameters the
    # checkpoint overwrites.
    run = build(cfg, abstract=resume_step is not None)
    state = run.state
    # Checkpoints (jmamba/checkpoint.py): resume if ckpt_dir holds any, save every N steps,
    # at the end and on SIGINT/SIGTERM, through the driver's save hooks.
    ckpt = (Checkpoints(cfg, run, data_order(cfg), orbax_messages_to(t.log_dir))
            if t.ckpt_dir else None)
    start = 0
    if ckpt is not None:
        state, start = ckpt.resume(state)
        hooks = Hooks(wants_save=lambda s: s % t.ckpt_every == 0 or s == t.steps,
                      save=lambda s, st: ckpt.maybe_save(s, st, last=True),
                      after_log=(hooks or Hooks()).after_log)
    hooks = hooks or Hooks()
    rows = process_rows(run.batch_sharding, t.batch_size)
    data = make_data(cfg, rows)
    data.restore({"step": start})  # batches are a pure function of (seed, step)
    n_params = count_params(run.canonical(state.params))
    main = jax.process_index() == 0
    log = RunLog(t.log_dir, t.steps, t.progress, enabled=main, start_step=start)
    source = f"token files via {data.ORDER}" if t.data else "the embedded recall task"
    unused = flops.unused_params(m)  # attention layers' unread Mamba2 storage
    held = f" ({unused / 1e6:.2f}M stored unused by attention layers)" if unused else ""
    log.note(f"jmamba: {n_params / 1e6:.2f}M params{held}, mesh pp={p.pp} x ep={p.ep} on "
             f"{jax.default_backend()}, {p.microbatches} microbatch(es), {t.steps} steps of "
             f"{t.batch_size}x{t.seq_len} tokens of {source}, logging to {t.log_dir}")
    peak = peak_tflops(cfg)
    if peak is None and jax.default_backend() != "cpu":
        log.note("jmamba: unknown peak FLOP/s for this device; pass --peak_tflops for MFU")
    # MFU counts the devices of the mesh, not every visible one (a 1-GPU run on a 4-GPU host).
    rate = RateMeter(t.batch_size * t.seq_len, flops.flops_per_token(m, t.seq_len), peak,
                     p.pp * p.ep, start)
    profiler = Profiler(t.log_dir, t.profile_steps, enabled=main)
    records, pending = [], None
    skips = SkipLimit(t.max_skipped_steps)
    # Compile before the first step and say what it needs per device, so a layout that
    # cannot fit is known before it runs out of memory. The loop runs this executable.
    try:
        first = to_device(next_batch(data, t=t), run, rows, t.batch_size)
        # Validation batches (fixed, held out) placed once; None when validation is off.
        held_out = evaluate.eval_source(cfg, rows)
        evaluator = None if held_out is None else evaluate.Evaluator(run.eval_fn, [
            to_device(next_batch(held_out, "--eval_data", t), run, rows, t.batch_size)
            for _ in range(t.eval_steps)])
    except RunError:
        log.close()
        if ckpt is not None:
            ckpt.close()
        raise
    step_fn, memory = compile_step(run, cfg, state, first, log.note)
    if memory and main:
        log.note(write_memory_report(t.log_dir, memory))
        warning = fit_warning(memory, device_pool_bytes(), memory_fixes(cfg, memory))
        if warning:
            log.note(warning)

    def flush(pending, evaluated=None):  # read a dispatched step's metrics (syncs on it)
        step, metrics, dispatched_at = pending
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        rate.see(step, dispatched_at)
        bad = check_finite(step, values, t.skip_nonfinite)
        if bad:
            log.note(f"jmamba: skipped step {step} (non-finite loss or gradient)")
        skips.see(step, bad, values)
        if step % t.log_every == 0 or step == t.steps or evaluated:
            record = {"step": step, **values, **rate.lap(step, dispatched_at),
                      **device_memory(), **(evaluated or {})}
            log.write(record)
            records.append(record)
            hooks.after_log(record)

    step = start
    with StopSignals() as signals:
        try:
            stop = AgreedStop(signals)
            for step in range(start + 1, t.steps + 1):
                batch = (first if step == start + 1 else
                         to_device(next_batch(data, t=t), run, rows, t.batch_size))
                with profiler.step(step):
                    state, metrics = step_fn(state, batch)
                dispatched_at = time.perf_counter()
                # Read step t's metrics only after step t+1 is dispatched, so the host never
                # stalls the device (nanodo's pattern); a save waits for its own step.
                if pending is not None:
                    flush(pending)
                # Steps are timed between dispatch returns: the host is never more than one
                # step ahead (each flush waits for its step), so their spacing is the step
                # time whether dispatch returns at once or only when the device is done
                # (timing at flush would give the last step ~0 s in the second case).
                pending = (step, metrics, dispatched_at)
                if evaluator is not None and evaluate.is_due(cfg, step):
                    flush(pending, evaluator(state.params))  # logged with this step
                    pending = None
                    rate.restart(step)  # the evaluation is not a step's time
                profiler.after(step, state)
                log.step_done(step)
                if ckpt is not None:
                    ckpt.check()  # a failed asynchronous save stops the run now
                stop_on = stop.after_dispatch()  # every process: the same, after this step
                if hooks.wants_save(step) or stop_on is not None:
                    if pending is not None:  # (an evaluation may have flushed it)
                        flush(pending)
                    pending = None
                    if hooks.save is not None:
                        hooks.save(step, state)
                    rate.restart(step)  # the save's wait is not a step's time
                if stop_on is not None:
                    signals.received = stop_on  # the agreed signal decides the exit code
                    log.note(f"jmamba: stopped cleanly after step {step} on signal "
                             f"{stop_on}; exit code {signals.exit_code}")
                    break
            else:  # the last step: every process leaves with the same signal (or none)
                stop.finish()
            if pending is not None:
                flush(pending)
        except NonFiniteLoss as e:
            log.close()
            raise SystemExit(f"jmamba: {e}") from None
        except RunError:
            if pending is not None:  # the step before a bad batch still gets its record
                with contextlib.suppress(Exception):
                    flush(pending)
            log.close()
            raise
        except Exception as e:  # a device allocation that failed: one line, exit 3
            log.close()
            if not is_out_of_memory(e):
                raise
            raise RunError(out_of_memory_line(e, cfg, step, memory, device_pool_bytes()),
                           EXIT_OUT_OF_MEMORY) from None
        finally:
            profiler.close()
            if ckpt is not None:
                ckpt.close()  # waits for the asynchronous saves
    log.close()
    if signals.exit_code:
        raise SystemExit(signals.exit_code)
    return records


def out_of_memory_line(error, cfg: Config, step: int | None = None, memory: dict | None = None,
                       pool_bytes: int | None = None) -> str:
    """The one line for a device that ran out of memory (by step `step`; None: before the
    first step): the allocation that failed, what XLA planned against the pool, what to
    change for this layout."""
    first = str(error).split("\n")[0]
    failed = first.split("RESOURCE_EXHAUSTED:", 1)[-1].split("[", 1)[0].strip().rstrip(".")
    gb = lambda b: f"{b / 2**30:.1f} GB"
    plan = (f"XLA planned {gb(memory['total_bytes'])} per device"
            + (f" against a pool of {gb(pool_bytes)}" if pool_bytes else "")
            + f" ({os.path.join(cfg.train.log_dir, 'memory.json')}); " if memory else "")
    saved = (f"; checkpoints already saved in {cfg.train.ckpt_dir} stay"
             if cfg.train.ckpt_dir else "")
    when = "before the first step" if step is None else f"by step {step}"
    return (f"jmamba: a device ran out of memory {when} ({failed}); {plan}"
            f"{', '.join(memory_fixes(cfg, memory))}, or let JAX take more of the GPU "
            f"(XLA_PYTHON_CLIENT_MEM_FRACTION){saved}")


def memory_fixes(cfg: Config, memory: dict | None = None) -> list[str]:
    """What lowers the per-device memory of cfg's layout (memory: XLA's report, which says
    what --remat auto chose)."""
    p = cfg.parallel
    fixes = ["lower --batch_size"]
    remat = (memory or {}).get("remat", p.remat)
    if remat in ("auto", "none", "dots") and not uses_1f1b(cfg):  # 1F1B stages recompute
        fixes.append("use --remat full")                          # whatever it says
    if p.pp > 1:
        fixes.append("raise --microbatches")
    if p.pp_stash == "residuals" and p.pp > 1:
        fixes.append("use --pp_stash inputs")
    elif not scans_layers(cfg):
        fixes.append("use --scan_layers true")
    return fixes


class RateMeter:
    """tokens/s, step time and MFU between two logged steps (wall clock, host side), from
    the times at which steps were dispatched.

    Dispatch times are spaced by the step time only in the steady state, where the host
    waits for step t-1 before dispatching step t+1. After the host has waited for the
    device (the first step, whose dispatch follows the compile; a save, which waits for its
    step), the next two dispatches return at once, so the meter restarts: it times from
    the dispatch of the second step after such a wait, and records before that carry no
    rate (they used to show e.g. 1.2M tok/s and 1805% MFU after every save)."""

    def __init__(self, tokens_per_step, flops_per_token, peak_tflops, n_devices, step=0):
        self.tokens, self.flops, self.peak, self.n = (tokens_per_step, flops_per_token,
                                                      peak_tflops, n_devices)
        self.restart(step)

    def restart(self, step: int) -> None:
        """The host waited for the device after `step`: time again from step + 2."""
        self.step, self.time = step + 2, None

    def see(self, step: int, dispatched_at: float) -> None:
        """Every step's dispatch time, logged or not (the meter's start may be unlogged)."""
        if step == self.step and self.time is None:
            self.time = dispatched_at

    def lap(self, step: int, now: float | None = None) -> dict:
        now = time.perf_counter() if now is None else now
        self.see(step, now)
        if self.time is None or step <= self.step:
            return {}
        dt, n = now - self.time, step - self.step
        self.time, self.step = now, step
        out = {"step_time_s": dt / n, "tokens_per_s": self.tokens * n / dt}
        if self.peak:
            out["mfu"] = flops.mfu(out["tokens_per_s"], self.flops, self.peak, self.n)
        return out
