"""Command-line flags: a preset from configs/, then any config field as --section.field.

Every field of every config section is a flag (`--model.d_model 128`); a field name that
is unique across sections also works bare (`--steps 100`). Unknown flags and bad values
exit with status 2 and a message that names the flag and the closest valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import pkgutil
import sys
import typing

from jmamba.config import Config, validate

DEFAULT_PRESET = "cpu_demo"


def available_presets() -> list[str]:
    import configs
    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__))


def fail(message: str, exit_code: int, hard: bool = False):
    """One line on stderr and the documented exit code (README, jmamba/guard.py).

    hard: leave at once (os._exit) without running interpreter shutdown, where TensorStore
    callbacks of a failed checkpoint read would print pages of "Event loop is closed"
    tracebacks. Only for failures after which nothing is left to flush."""
    if hard:  # (the callbacks print through sys.stderr: send them nowhere first)
        sys.stderr = open(os.devnull, "w")
        print(f"error: {message}", file=sys.__stderr__, flush=True)
        sys.stdout.flush()
        os._exit(exit_code)
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(exit_code)


def load_preset(name: str) -> Config:
    names = available_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        fail(f"unknown --config '{name}'. Presets: {', '.join(names)}.{hint}", 2)
    return importlib.import_module(f"configs.{name}").CONFIG


def _parse_value(text: str, typ, flag: str, parser):
    """Turns a flag's text into the field's type, or exits naming the flag."""
    try:
        if typ == bool | None:  # a tri-state: true, false or auto (None, settled later)
            if text.lower() == "auto":
                return None
            if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError("expected true, false or auto")
            return text.lower() in ("1", "true", "yes", "on")
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if typing.get_origin(typ) is tuple:
            item = typing.get_args(typ)[0]
            return tuple(item(v) for v in text.split(",") if v.strip())  # "": ()
        return typ(text)
    except ValueError as e:
        parser.error(f"bad value {text!r} for {flag}: {e}")


def _fields(cfg: Config):
    """(section, field, type, current value) for every config field."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            yield section.name, f.name, hints[f.name], getattr(sub, f.name)


def build_parser(cfg: Config) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="train.py", allow_abbrev=False,
        description="Train a Mamba2-MoE language model. Defaults shown are the preset's.")
    parser.add_argument("--config", default=DEFAULT_PRESET,
                        help=f"preset in configs/: {', '.join(available_presets())}")
    fields = list(_fields(cfg))
    bare_counts: dict[str, int] = {}
    for _, name, _, _ in fields:
        bare_counts[name] = bare_counts.get(name, 0) + 1
    dests = {}
    for section, name, typ, value in fields:
        flags = [f"--{section}.{name}"]
        if bare_counts[name] == 1:
            flags.insert(0, f"--{name}")
        dest = f"{section}__{name}"
        dests[dest] = (section, name, typ, "/".join(flags))
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        if typ == bool | None:
            metavar, shown = "BOOL|auto", "auto" if value is None else value
        else:
            metavar = typ.__name__.upper() if isinstance(typ, type) else "A,B"
        parser.add_argument(*flags, dest=dest, default=None, metavar=metavar,
                            help=f"(default: {shown})")
    return parser, dests


def sidecar_vocab(spec: str) -> int | None:
    """The largest vocab_size the sidecars of a token-file spec record; None when any of
    them cannot be read (preflight then reports that file in one line)."""
    from jmamba.tokens import parse_data_spec, sidecar
    try:
        metas = [sidecar(path) for path, _ in parse_data_spec(spec)]
    except (OSError, ValueError):  # a bad spec or sidecar: validate(), preflight say which
        return None
    vocabs = [m.get("vocab_size") for m in metas]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vocabs):
        return None
    return max(vocabs)


def vocab_from_token_files(cfg: Config) -> Config:
    """Token files record the vocabulary they were tokenized with: without --vocab_size the
    model takes it (with a notice), so byte-level data needs no flag."""
    t = cfg.train
    if not t.data:
        return cfg
    specs = [t.data] + ([t.eval_data] if t.eval_data and t.eval_every else [])
    vocabs = [sidecar_vocab(spec) for spec in specs]
    if None in vocabs or max(vocabs) == cfg.model.vocab_size:
        return cfg
    vocab = max(vocabs)
    print(f"jmamba: model.vocab_size {cfg.model.vocab_size} -> {vocab}, as the token files "
          "record (pass --vocab_size to choose another)", flush=True)
    return cfg.replace(model=dataclasses.replace(cfg.model, vocab_size=vocab))


def parse_config(argv: list[str]) -> Config:
    """argv -> a validated Config. Exits with status 2 and a clear message on bad input."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=DEFAULT_PRESET)
    known, _ = pre.parse_known_args(argv)
    cfg = load_preset(known.config)
    parser, dests = build_parser(cfg)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = [o for a in parser._actions for o in a.option_strings]
        flag = unknown[0].split("=")[0]
        close = difflib.get_close_matches(flag, valid, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]}?" if close else ""
        parser.error(f"unknown flag {flag}.{hint} See --help for all flags.")
    updates: dict[str, dict] = {}
    for dest, (section, name, typ, flag) in dests.items():
        text = getattr(args, dest)
        if text is not None:
            updates.setdefault(section, {})[name] = _parse_value(text, typ, flag, parser)
    cfg = cfg.replace(**{s: dataclasses.replace(getattr(cfg, s), **kw)
                         for s, kw in updates.items()})
    if "vocab_size" not in updates.get("model", {}):
        cfg = vocab_from_token_files(cfg)
    t = cfg.train
    if "warmup_steps" not in updates.get("train", {}) and t.warmup_steps > t.steps >= 1:
        # A short run asked for with --steps alone gets one: the preset's warmup shrinks
        # to a tenth of the run (an explicit --warmup_steps > --steps stays an error).
        warmup = t.steps // 10
        print(f"jmamba: --steps {t.steps} is shorter than the preset's warmup "
              f"({t.warmup_steps} steps); warming up over {warmup}", flush=True)
        cfg = cfg.replace(train=dataclasses.replace(t, warmup_steps=warmup))
    try:
        return validate(cfg)
    except ValueError as e:
        parser.error(str(e))


def simulate_cpu_devices(n: int) -> None:
    """Lets a CPU-only host run an n-device mesh: XLA's host platform splits into n devices.
    Must run before jax is imported; GPU runs ignore it (it only shapes the CPU platform)."""
    if n > 1:
        add_xla_flag(f"--xla_force_host_platform_device_count={n}")


def add_xla_flag(flag: str) -> None:
    """Appends one XLA flag to XLA_FLAGS (read when jax starts its backends)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if flag.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv)
    from jmamba import launch
    n = cfg.dist.nproc_per_node
    if n > 1 and not launch.is_child():  # the parent: start the processes, wait for them
        p = cfg.parallel
        try:
            raise SystemExit(launch.run_children(argv, n, p.pp * p.ep // n))
        except ValueError as e:  # too few GPUs named
            fail(str(e), 2)
    if cfg.train.deterministic:  # before jax starts: XLA reads its flags once
        add_xla_flag("--xla_gpu_exclude_nondeterministic_ops=true")
    # --- issue 7: many hosts; each process simulates only its share of CPU devices ---
    from jmamba.distributed import initialize, settings
    dist = settings(cfg.dist)  # None: one process
    n_procs = (dist or {}).get("num_processes", 1)
    simulate_cpu_devices(cfg.parallel.pp * cfg.parallel.ep // n_procs)
    initialize(cfg.dist)
    if dist is not None:  # many processes (SLURM's included): after jax.distributed's
        from jmamba.guard import hold_early_sigterm  # own handler
        hold_early_sigterm()
    # --- end issue 7 ---
    from jmamba.driver import train  # imports jax only after the flags are checked
    from jmamba.checkpoint import CheckpointError
    from jmamba.guard import EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY, RunError, is_out_of_memory
    try:
        train(cfg)
    except CheckpointError as e:  # a checkpoint that cannot be used: say why, no traceback
        fail(str(e), EXIT_BAD_INPUT, hard=True)  # raised before training: nothing to flush
    except RunError as e:  # a path, file or disk that fails: one line, its exit code
        # After a failed save Orbax's background threads may wait forever for signals that
        # never come (a read-only disk: a real run hung at exit, scripts/disk_faults.py);
        # the driver has closed everything of ours by now, so leave without joining them.
        fail(str(e), e.exit_code, hard=e.hard)
    except Exception as e:  # out of memory before the loop (building, restoring, compiling)
        if not is_out_of_memory(e):
            raise
        from jmamba.driver import out_of_memory_line
        fail(out_of_memory_line(e, cfg), EXIT_OUT_OF_MEMORY)
