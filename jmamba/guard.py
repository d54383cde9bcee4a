"""Stopping a run well: NaN/Inf losses, SIGINT/SIGTERM, and the hooks a checkpointer plugs in.

Exit codes (documented in README): 0 for a finished run or a clean stop on SIGTERM (the
scheduler asked, the state is saved); 130 for a clean stop on SIGINT (Ctrl-C, as shells
report it); 1 when the loss turns NaN/Inf (unless --skip_nonfinite). A second Ctrl-C
interrupts at once.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from typing import Any, Callable


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm of `step` is NaN or Inf."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step = step
        super().__init__(
            f"non-finite loss at step {step} (loss {loss}, grad_norm {grad_norm}); stopped "
            "without saving, so the last checkpoint is the last good state. Lower --lr, "
            "check the data, or pass --skip_nonfinite true to skip such steps.")


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


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`; the loop stops after its step."""

    EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # else Python refuses
            for sig in self.EXIT_CODES:
                self.previous[sig] = signal.signal(sig, self._handle)
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
