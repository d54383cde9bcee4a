"""Checks that run before anything heavy: the paths a run writes to and reads from.

Each failure is one line that names the flag to change, raised as RunError with the exit
code the README documents (guard.EXIT_*), before the model is built or compiled.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from jmamba.guard import EXIT_BAD_INPUT, RunError


def check_writable_dir(path: str, flag: str) -> None:
    """Creates `path` if needed and writes, syncs and removes a probe file in it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"{flag} {path} is a file, not a directory; pass another {flag}",
                       EXIT_BAD_INPUT)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".jmamba_probe_") as f:
            f.write(b"jmamba")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RunError(f"{flag} {path} is not a writable directory ({e.strerror or e}); "
                       f"pass another {flag}", EXIT_BAD_INPUT) from None


def check_free_space(path: str, need_bytes: int, flag: str, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise RunError(f"{flag} {path}: {what} needs about {need_bytes / 2**30:.2f} GB, but "
                       f"only {free / 2**30:.2f} GB are free there; free space or pass "
                       f"another {flag}", EXIT_BAD_INPUT)


def checkpoint_bytes(cfg) -> int:
    """Bytes of one checkpoint of this config: parameters and AdamW moments (abstract
    shapes only; nothing is allocated)."""
    from jmamba.checkpoint import saved_shapes
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(saved_shapes(cfg)))


def check_data_files(cfg, spec: str, flag: str) -> None:
    """Every token file of `spec` (--data or --eval_data) opens and holds at least one
    sequence."""
    from jmamba.tokens import TokenFile, parse_data_spec
    t = cfg.train
    for path, _ in parse_data_spec(spec):
        try:
            TokenFile(path, cfg.model.vocab_size, t.seq_len)
        except (OSError, ValueError) as e:
            raise RunError(f"{flag}: {e}", EXIT_BAD_INPUT) from None


def check_resume_step(cfg) -> int | None:
    """The step a resume would start from (None: nothing to resume); a checkpoint at or past
    --steps leaves nothing to train, which is an error unless it is exactly --steps."""
    from jmamba.checkpoint import open_manager
    t = cfg.train
    if not os.path.isdir(t.ckpt_dir):
        return None
    manager = open_manager(t.ckpt_dir, read_only=True)
    try:
        steps = list(manager.all_steps())
    finally:
        manager.close()
    if not steps:
        return None
    step = max(steps) if t.resume == "latest" else int(t.resume)
    if step > t.steps:
        raise RunError(f"--steps {t.steps}, but {t.ckpt_dir} resumes from step {step}: "
                       f"nothing to train; raise --steps above {step} or pass another "
                       "--ckpt_dir", EXIT_BAD_INPUT)
    return step


def preflight(cfg) -> int | None:
    """All checks, in the order a user would fix them. Returns the step a resume starts
    from (None when there is no checkpoint to resume)."""
    t = cfg.train
    check_writable_dir(t.log_dir, "--log_dir")
    if t.data:
        check_data_files(cfg, t.data, "--data")
    if t.eval_data and t.eval_every:
        check_data_files(cfg, t.eval_data, "--eval_data")
    if not t.ckpt_dir:
        return None
    check_writable_dir(t.ckpt_dir, "--ckpt_dir")
    start = check_resume_step(cfg)
    check_free_space(t.ckpt_dir, checkpoint_bytes(cfg), "--ckpt_dir", "one checkpoint")
    return start
