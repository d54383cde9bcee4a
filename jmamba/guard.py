"""Stopping a run well: NaN/Inf losses, SIGINT/SIGTERM, and the hooks a checkpointer plugs in.

Exit codes (documented in README): 0 for a finished run or a clean stop on SIGTERM (the
scheduler asked, the state is saved); 130 for a clean stop on SIGINT (Ctrl-C, as shells
report it); 1 when the loss turns NaN/Inf (unless --skip_nonfinite, then after more than
--max_skipped_steps bad steps in a row); 2 for flags, config, paths or files that cannot
work (checked before the model is built); 1 also when a checkpoint save fails during the
run (a full or read-only disk: the run stops, the last complete checkpoint is named); 3
when a device runs out of memory (the line gives XLA's plan against the device pool and
what to change; checkpoints already saved stay). A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from typing import Any, Callable


# A save that fails mid-run exits 1, as issue 18 asks (the line says which failure it was).
EXIT_NONFINITE, EXIT_BAD_INPUT, EXIT_DISK, EXIT_OUT_OF_MEMORY = 1, 2, 1, 3


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a runtime error from a device is an allocation failure (XLA's status
    RESOURCE_EXHAUSTED, e.g. "Out of memory while trying to allocate 113.85GiB")."""
    return type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and (
        "RESOURCE_EXHAUSTED" in str(error))


class RunError(Exception):
    """A run that cannot go on: one line for the user and the exit code to leave with."""

    def __init__(self, message: str, exit_code: int, hard: bool = False):
        """hard: leave without interpreter shutdown (cli.fail), as after a failed save."""
        super().__init__(message)
        self.exit_code, self.hard = exit_code, hard


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm of `step` is NaN or Inf."""

    def __init__(self, step: int, loss: float, grad_norm: float, why: str = ""):
        self.step = step
        hint = ("Lower --lr or check the data" if why else
                "Lower --lr, check the data, or pass --skip_nonfinite true to skip such steps")
        super().__init__(
            f"non-finite loss at step {step} (loss {loss}, grad_norm {grad_norm})"
            f"{'; ' + why if why else ''}; stopped without saving, so the last checkpoint is "
            f"the last good state. {hint}.")


@dataclasses.dataclass
class Hooks:
    """How the driver talks to a checkpointer (or anything else), without knowing it.

    wants_save(step): save the state after this step? The driver then first checks that
    the step's loss is finite (so a NaN state is never saved), then calls save(step, state).
    On SIGINT/SIGTERM the driver finishes the current step and calls save once more.
    """

    wants_save: Callable[[int], bool] = lambda step: False
    save: Callable[[int, Any], None] | None = None
    after_log: Callable[[dict], None] = lambda record: None  # e.g. tests, early stopping


def check_finite(step: int, metrics: dict, skip: bool) -> bool:
    """Raises NonFiniteLoss on a bad step unless `skip`; returns whether the step was bad.

    With skip, the step itself already kept the old parameters (step.py) and reports
    `skipped` = 1.
    """
    loss, g = float(metrics["loss"]), float(metrics["grad_norm"])
    bad = not (math.isfinite(loss) and math.isfinite(g))
    if bad and not skip:
        raise NonFiniteLoss(step, loss, g)
    return bad


class SkipLimit:
    """--skip_nonfinite's bound: more than `limit` bad steps in a row is a diverged run, not
    a bad batch, and stops it (exit 1) instead of training on frozen parameters."""

    def __init__(self, limit: int):
        self.limit, self.run = limit, 0

    def see(self, step: int, bad: bool, metrics: dict) -> None:
        self.run = self.run + 1 if bad else 0
        if self.run > self.limit:
            raise NonFiniteLoss(step, metrics["loss"], metrics["grad_norm"],
                                f"{self.run} steps in a row were non-finite and skipped "
                                f"(--max_skipped_steps {self.limit}): the run has diverged")


_HELD: list[int] = []  # SIGTERMs received before the training loop (hold_early_sigterm)
_BEFORE_HOLD: list = []  # the SIGTERM handler hold_early_sigterm replaced


def _hold(sig, frame):
    _HELD.append(sig)


def hold_early_sigterm() -> None:
    """Until the training loop starts (compiling can take minutes), hold a SIGTERM for it:
    the loop then stops after its first steps, on every process (distributed.AgreedStop).
    Used with many processes, where jax.distributed's preemption handler would otherwise
    take the signal and the run would go on; one process keeps Python's default (exit).
    The loop's StopSignals puts the handler it replaced back when it ends."""
    if threading.current_thread() is threading.main_thread():
        before = signal.signal(signal.SIGTERM, _hold)
        if before is not _hold:
            _BEFORE_HOLD[:] = [signal.SIG_DFL if before is None else before]


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`; the loop stops after its step.
    A SIGTERM held since start-up (hold_early_sigterm) counts as received on entry, and
    on exit the handler from before the hold comes back, not the hold."""

    EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # else Python refuses
            for sig in self.EXIT_CODES:
                self.previous[sig] = signal.signal(sig, self._handle)
            if self.previous.get(signal.SIGTERM) is _hold:
                self.previous[signal.SIGTERM] = (_BEFORE_HOLD or [signal.SIG_DFL])[0]
        if _HELD:
            self.received = signal.Signals(_HELD[-1])
        _HELD.clear()
        return self

    def _handle(self, sig, frame):
        if self.received == signal.SIGINT and sig == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = sig

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def exit_code(self) -> int:
        return 0 if self.received is None else self.EXIT_CODES[self.received]
