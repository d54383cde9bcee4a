"""Checkpoints with Orbax: the training state in the canonical (layout-independent) form,
saved asynchronously with the run's metadata as JSON, restored into any (pp, ep) layout.

<ckpt_dir>/<step>/ holds two Orbax items (see docs/checkpoints.md):
    state/  {'step', 'params', 'opt_state'}: parameters and the AdamW moments mu, nu in the
            canonical layout of model.py (row i of layers/<path> is global layer i, experts in
            global order), whatever pipeline or expert layout wrote them.
    meta/   JSON: format version, the whole config, data position, RNG seed, and each saved
            array's shape, dtype and fingerprint (an exact checksum of its bits).
Orbax writes a step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no step that a later run could pick up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jmamba import model
from jmamba.config import Config
from jmamba.guard import EXIT_DISK, RunError
from jmamba.optim import make_optimizer
from jmamba.parallel.layout import canonical_io, canonical_leaf, stage_io, stage_leaf
from jmamba.parallel.mesh import canonical_layer_shardings, spread_shardings
from jmamba.step import TrainState

FORMAT = 1  # bump when the saved tree or the metadata change meaning

# Config fields a resumed run may change: its layout, hosts, length and bookkeeping. Every
# other field must equal the checkpoint's (the parameter shapes, data and optimizer depend on
# them).
MAY_DIFFER = {"train.steps", "train.log_every", "train.log_dir", "train.ckpt_dir",
              "train.ckpt_every", "train.keep", "train.resume", "train.profile_steps",
              "train.progress", "train.peak_tflops", "train.max_skipped_steps",
              "train.skip_nonfinite", "train.loader", "train.eval_data", "train.eval_every",
              "train.eval_steps", "train.deterministic", "model.ssm_impl", "model.dtype",
              "model.chunk_size", "model.scan_layers", "model.attn_impl", "model.norm_impl",
              "model.loss_chunks"}
MAY_DIFFER_SECTIONS = {"parallel", "dist"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. Raised before anything is loaded into the run."""


# ----------------------------------------------------------------------------- config JSON

def config_to_dict(cfg: Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(stored: dict) -> Config:
    """The inverse of config_to_dict; fields the stored dict lacks keep their defaults."""
    sections = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        values = stored.get(section.name, {})
        kw = {f.name: tuple(values[f.name]) if isinstance(values[f.name], list)
              else values[f.name] for f in dataclasses.fields(cls) if f.name in values}
        sections[section.name] = cls(**kw)
    return Config(**sections)


def config_mismatches(stored: dict, cfg: Config) -> list[str]:
    """Fields that differ between the checkpoint's config and this run's, as messages."""
    current, defaults = config_to_dict(cfg), config_to_dict(Config())
    out = []
    for section, fields in current.items():
        if section in MAY_DIFFER_SECTIONS:
            continue
        for name, value in fields.items():
            key = f"{section}.{name}"
            if key in MAY_DIFFER:
                continue
            old = stored.get(section, {})
            if name not in old:  # written before the field existed: it had the default
                if value != defaults[section][name]:
                    out.append(f"'{key}' = {value!r}, but the checkpoint predates the field "
                               f"(default {defaults[section][name]!r})")
            elif old[name] != value:
                out.append(f"'{key}' = {value!r}, but the checkpoint was written with "
                           f"{old[name]!r}")
    return out


# ----------------------------------------------------------------------------- saved tree

def _is_params(x) -> bool:
    """The root of a parameter tree (canonical or stage-stacked) inside an optimizer state."""
    return isinstance(x, dict) and "layers" in x


def map_state(convert, step, params, opt_state, optimizer) -> dict:
    """Applies a whole-tree params conversion to params and every params-shaped copy in the
    optimizer state (AdamW's mu and nu); counts pass through."""
    return {"step": step, "params": convert(params),
            "opt_state": optax.tree_map_params(optimizer, convert, opt_state,
                                               is_leaf=_is_params)}


def relay_leaves(tree, convert_leaf, shardings):
    """convert_leaf on every leaf, each in its own compiled call with its own output
    sharding; each source is deleted once its result is dispatched.
    Hand-made because XLA lowers a re-layout between unrelated splits (a non-contiguous
    stage layout against the evenly split checkpoint form) by replicating whole arrays,
    and in one program for the whole state those copies add up: one leaf at a time, the
    extra memory is one leaf's (scripts/relayout_memory.py, docs/benchmarks.md)."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf, sh in zip(leaves, jax.tree.leaves(shardings)):
        out.append(jax.jit(convert_leaf, out_shardings=sh)(leaf))
        leaf.delete()
    return jax.tree.unflatten(treedef, out)


def saved_shapes(cfg: Config) -> dict:
    """ShapeDtypeStructs of the saved tree for this config (no arrays are made)."""
    def init():
        params = model.init_params(cfg.model, jax.random.key(0))
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": make_optimizer(cfg.train).init(params)}
    return jax.eval_shape(init)


def fingerprint(x) -> jax.Array:
    """An exact, position-sensitive uint32 checksum of an array's bits. Integer sums wrap
    mod 2^32 in any order, so it is the same however the array is sharded."""
    unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[jnp.dtype(x.dtype).itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    # Each element's row-major position (mod 2^32) from per-axis iotas, not a flattened
    # arange: flattening an array split over two axes made XLA gather it whole.
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for axis in reversed(range(x.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
        index, stride = index + iota * jnp.uint32(stride % 2**32), stride * x.shape[axis]
    return jnp.sum(bits * (index * 2 + 1), dtype=jnp.uint32)


def leaf_name(path) -> str:
    """'opt_state/0/mu/layers/mixer/in_proj/kernel' for a jax key path."""
    parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(p) for p in parts)


def leaf_table(tree) -> dict:
    return {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


_fingerprint = jax.jit(fingerprint)


def fingerprints(tree) -> dict:
    """{leaf name: fingerprint} of a restored tree, one leaf at a time: one program for the
    whole tree took temporaries the size of the state on the CPU (bamba9b_moe: 45 GB a
    device, where the GPU would fuse them away), one leaf's at most this way."""
    return {name: int(_fingerprint(x)) for name, x in leaf_table(tree).items()}


@dataclasses.dataclass(frozen=True)
class _Saved:
    """A saved leaf (in host memory) and its fingerprint; a pytree leaf, not a node."""
    array: jax.Array
    fingerprint: jax.Array


# ----------------------------------------------------------------------------- reading

def _short(e: Exception) -> str:
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


_ORBAX_LOG: list = []  # the one handler that keeps Orbax's messages in the run's log dir


def orbax_messages_to(log_dir: str) -> str:
    """Sends the "absl" logger's records (Orbax logs through it, a failed save as pages of
    tracebacks from its background threads) to <log_dir>/orbax.log (one file per process)
    instead of stderr, where a failure is one line of ours. Returns the file's path."""
    name = "orbax.log" if jax.process_count() == 1 else f"orbax.{jax.process_index()}.log"
    path = os.path.join(log_dir, name)
    absl = logging.getLogger("absl")
    for handler in _ORBAX_LOG:
        absl.removeHandler(handler)
        handler.close()
    _ORBAX_LOG[:] = [logging.FileHandler(path)]
    _ORBAX_LOG[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    absl.addHandler(_ORBAX_LOG[0])
    absl.propagate = False
    _unraisable_to(path)
    return path


def _unraisable_to(path: str) -> None:
    """A failing write (a full disk) leaves TensorStore callbacks calling into Orbax's
    closed event loop; Python reports each as an unraisable RuntimeError, pages of
    tracebacks on stderr while training goes on. Those go to the Orbax log too; any
    other unraisable exception still goes to the previous hook."""
    previous = getattr(sys.unraisablehook, "jmamba_previous", sys.unraisablehook)

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
            with open(path, "a") as f:
                traceback.print_exception(u.exc_type, u.exc_value, u.exc_traceback, file=f)
        else:
            previous(u)

    hook.jmamba_previous = previous
    sys.unraisablehook = hook


def open_manager(directory: str, keep: int = 1, read_only: bool = False):
    if read_only:  # (these settings are what Orbax would force, less its warnings)
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                               save_interval_steps=0)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True)
    absl = logging.getLogger("absl")  # Orbax says "Given directory is read only" at WARNING
    level = absl.level
    absl.setLevel(logging.ERROR if read_only else level)
    try:
        # Reads and writes in flight are bounded (Orbax's default is 96 GB), so a restore or
        # save holds its shards plus about this much, not several copies of the state.
        handlers = {"state": ocp.StandardCheckpointHandler(save_concurrent_gb=1,
                                                           restore_concurrent_gb=1),
                    "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                     item_handlers=handlers)
    finally:
        absl.setLevel(level)


def _damaged_hint(manager, step: int) -> str:
    """What to do about a damaged step: a resume must start from the latest step, so the
    damaged one has to move away first (--resume alone cannot skip it)."""
    where = os.path.join(str(manager.directory), str(step))
    earlier = [s for s in manager.all_steps() if s < step]
    if earlier:
        return (f"move {where} out of the directory (and any later steps) to resume from "
                f"step {max(earlier)}")
    return f"move {where} out of the directory to start fresh"


def read_checked(manager, step: int, cfg: Config | None, sharding) -> tuple[dict, dict]:
    """Reads and checks one checkpoint: metadata, format, config (against cfg unless None),
    every array's shape and fingerprint. `sharding`: one sharding for every array, or a
    tree of them shaped like the saved tree. Returns (saved tree, meta); raises
    CheckpointError."""
    where = os.path.join(str(manager.directory), str(step))
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise CheckpointError(f"checkpoint {where}: its metadata cannot be read ({_short(e)}); "
                              f"it is incomplete or damaged: {_damaged_hint(manager, step)}"
                              ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {where} has format {found!r}, but this code reads "
                              f"format {FORMAT}: convert it with the code that wrote it")
    missing = [k for k in ("config", "data", "leaves") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {where}: its metadata lacks {missing}; it is "
                              f"damaged: {_damaged_hint(manager, step)}")
    if cfg is None:
        cfg = config_from_dict(meta["config"])
    bad = config_mismatches(meta["config"], cfg)
    if bad:
        raise CheckpointError(f"checkpoint {where} does not match this run's config: "
                              + "; ".join(bad) + ". Set these fields as the checkpoint has "
                              "them, or use another --ckpt_dir")
    shapes = saved_shapes(cfg)
    stored = meta["leaves"]
    for name, want in leaf_table(shapes).items():
        got = stored.get(name)
        if got is None or (tuple(got["shape"]), got["dtype"]) != (want.shape, str(want.dtype)):
            have = "absent" if got is None else f"{tuple(got['shape'])} {got['dtype']}"
            raise CheckpointError(f"checkpoint {where}: array '{name}' is {have}, but this "
                                  f"config needs {want.shape} {want.dtype}")
    if not isinstance(sharding, dict):
        sharding = jax.tree.map(lambda _: sharding, shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, sharding)
    # A failed read makes TensorStore's callbacks print pages of "Event loop is closed"
    # tracebacks from other threads, during the read and just after it: they go nowhere.
    error = None
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            saved = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:
            error = e
            time.sleep(0.5)
    if error is not None:
        raise CheckpointError(f"checkpoint {where}: its arrays cannot be read ({_short(error)}); "
                              f"files are missing, truncated or corrupt: "
                              f"{_damaged_hint(manager, step)}") from None
    for name, value in fingerprints(saved).items():
        if value != stored[name]["fingerprint"]:
            raise CheckpointError(f"checkpoint {where}: array '{name}' does not match the "
                                  f"fingerprint recorded when it was saved; the files are "
                                  f"damaged: {_damaged_hint(manager, step)}")
    return saved, meta


def load(directory: str, step: int | None = None) -> tuple[dict, Config, dict]:
    """(canonical saved tree as host numpy arrays, its Config, meta) from a checkpoint
    directory, checked as for a resume. step None: the latest."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    manager = open_manager(directory, read_only=True)
    steps = list(manager.all_steps())
    if not steps or (step is not None and step not in steps):
        raise CheckpointError(f"no checkpoint for step {step if step is not None else 'latest'}"
                              f" in {directory}; it holds steps {steps}")
    step = max(steps) if step is None else step
    try:
        saved, meta = read_checked(manager, step, None, SingleDeviceSharding(jax.devices()[0]))
    finally:
        manager.close()
    return jax.device_get(saved), config_from_dict(meta["config"]), meta


# ----------------------------------------------------------------------------- the run's side

class Checkpoints:
    """Saves every train.ckpt_every steps and at the end; resumes at the start of a run."""

    def __init__(self, cfg: Config, run, data_order: str | None = None,
                 orbax_log: str | None = None):
        """data_order: the token-file loader's order ('grain' or 'numpy'; None for the
        embedded task), recorded with each save and required of a resume. orbax_log: the
        file Orbax's messages go to (orbax_messages_to; train.py sets it), named by a
        failed save's error and where the wind-down's stderr noise is sent."""
        t = cfg.train
        self.cfg, self.run, self.directory = cfg, run, t.ckpt_dir
        self.data_order, self.orbax_log = data_order, orbax_log
        self.failed, self._log_file = False, None
        self.optimizer = make_optimizer(t)
        self.manager = open_manager(t.ckpt_dir, keep=t.keep)
        # Saves write and restores read the canonical arrays in the run's own split where the
        # layout allows (stage <-> canonical is then a reshape on each device, no exchange),
        # else split evenly over all devices.
        spread = None if run.mesh is None else spread_shardings(saved_shapes(cfg), run.mesh)
        self._restore_sh = None if spread is None else self._restore_shardings(spread, run)
        self._to_saved = self._to_saved_on_host(self._restore_sh)

    def _to_saved_on_host(self, spread):
        """state -> (canonical tree in host memory, fingerprints), one compiled call per
        leaf (the io part in one): each canonical leaf is made on the devices, fingerprinted
        and lands in pinned host memory, split as `spread` says (None: one device), before
        the next. A save then holds the state plus one leaf on a device, where a whole
        canonical copy held it twice (bamba9b_moe: ~95 GB a GPU, docs/benchmarks.md), and the
        step may donate the live state while Orbax writes the host copy in the background.
        Hand-made: Orbax saves the arrays it is given; making the canonical form is ours."""
        run, layout = self.run, self.run.layout
        if spread is None:  # one device: its own sharding, the layout is canonical already
            one = jax.tree.leaves(run.state.params)[0].sharding
            spread = jax.tree.map(lambda _: one, saved_shapes(self.cfg))
            scalar = one
        else:
            scalar = NamedSharding(run.mesh, P())
        kinds = {m.kind for m in jax.local_devices()[0].addressable_memories()}
        # (a backend without host memory spaces keeps the copies on the devices)
        host = (jax.tree.map(lambda sh: sh.with_memory_kind("pinned_host"), spread)
                if "pinned_host" in kinds else spread)

        def with_print(convert, out_sh):
            def f(x):
                y = convert(x)
                return y, jax.tree.map(fingerprint, y)
            prints_sh = jax.tree.map(lambda _: scalar, out_sh)
            return jax.jit(f, out_shardings=(out_sh, prints_sh))

        copies = {}  # host sharding -> its copy-and-fingerprint call (step, counts, ...)

        def saved(x, sh):
            if isinstance(x, _Saved):
                return x
            if sh not in copies:
                copies[sh] = with_print(jnp.copy, sh)
            return _Saved(*copies[sh](x))

        host_p = host["params"]  # mu and nu have the params' shapes, so their shardings
        if layout is None:
            leaf_fns = [with_print(jnp.copy, sh) for sh in jax.tree.leaves(host_p)]
        else:
            leaf_fns = [with_print(lambda x: canonical_leaf(x, layout), sh)
                        for sh in jax.tree.leaves(host_p["layers"])]
            io_fn = with_print(lambda io: canonical_io(io, layout),
                               {k: v for k, v in host_p.items() if k != "layers"})
            # What scripts/relayout_memory.py compiles to size a save per device.
            self.save_programs = {"layers": leaf_fns, "io": io_fn}

        def by_leaf(fns, tree):
            # Each leaf finishes before the next starts (with the leaf programs queued back
            # to back, XLA's CPU collectives once timed out a rendezvous, on a loaded host).
            leaves, treedef = jax.tree.flatten(tree)
            return jax.tree.unflatten(treedef, [_Saved(*jax.block_until_ready(f(x)))
                                                for f, x in zip(fns, leaves)])

        def convert(params):  # a params-shaped tree -> a tree of _Saved
            if layout is None:
                return by_leaf(leaf_fns, params)
            io, io_prints = io_fn(params["io"])
            return {**jax.tree.map(_Saved, io, io_prints),
                    "layers": by_leaf(leaf_fns, params["layers"])}

        def to_saved(state):
            pairs = map_state(convert, state.step, state.params, state.opt_state,
                              self.optimizer)
            pairs = jax.tree.map(saved, pairs, host)  # the step and the optimizer's counts
            return (jax.tree.map(lambda x: x.array, pairs),
                    jax.tree.map(lambda x: x.fingerprint, pairs))

        return to_saved

    def _restore_shardings(self, spread, run):
        """`spread`, except that where the layout splits like the canonical form (contiguous,
        one stage per device) each layer leaf is split the way the run splits its
        stage-stacked form (layer axis over 'pp', experts over 'ep'): then stage <->
        canonical is a reshape on each device, with no exchange (XLA's re-layout of a gather
        between unrelated shardings replicates whole arrays)."""
        if run.layout is None or not run.layout.splits_like_canonical:
            return spread

        layers = canonical_layer_shardings(
            jax.tree.map(lambda x: x.sharding, run.state.params["layers"]), run.mesh)
        return map_state(lambda params: {**params, "layers": layers}, spread["step"],
                         spread["params"], spread["opt_state"], self.optimizer)

    def sharding(self):
        """Where restored canonical arrays land before they are laid out for the run: one
        device's, or split over the mesh (spread_shardings)."""
        if self.run.mesh is None:
            return jax.tree.leaves(self.run.state.params)[0].sharding
        return self._restore_sh

    def from_saved(self, state: TrainState):
        """The re-layout of a restored canonical tree into the run's state, laid out like
        `state` (whose shardings alone are used): on a mesh one compiled call per layer
        leaf that frees each restored leaf as it goes, so a resume holds the state once
        plus one leaf (one call for the whole tree held it twice: ~125 GB a GPU for
        bamba9b_moe, docs/benchmarks.md); one device keeps one call."""
        layout = self.run.layout
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        if layout is None:  # one device: the saved tree is the state
            return jax.jit(lambda saved: TrainState(saved["step"], saved["params"],
                                                    saved["opt_state"]),
                           out_shardings=state_sh)
        io_fn = jax.jit(lambda p: stage_io(p, layout), out_shardings=state_sh.params["io"])

        def to_run_by_leaf(params):
            io = io_fn(params)
            layers = relay_leaves(params["layers"], lambda x: stage_leaf(x, layout),
                                  state_sh.params["layers"])
            return {"layers": layers, "io": io}

        def from_saved_by_leaf(saved):
            s = map_state(to_run_by_leaf, saved["step"], saved["params"],
                          saved["opt_state"], self.optimizer)
            return jax.device_put(TrainState(s["step"], s["params"], s["opt_state"]),
                                  state_sh)

        return from_saved_by_leaf

    def saved_abstract(self):
        """The canonical tree as a restore lays it out (shapes, dtypes, shardings)."""
        sh = self.sharding()
        shardings = sh if isinstance(sh, dict) else jax.tree.map(lambda _: sh,
                                                                 saved_shapes(self.cfg))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            saved_shapes(self.cfg), shardings)

    def resume(self, state: TrainState) -> tuple[TrainState, int]:
        """(state, data step) from the checkpoint train.resume names; (state, 0) if the
        directory holds none."""
        steps = list(self.manager.all_steps())
        want = self.cfg.train.resume
        if not steps:
            if want != "latest":
                raise CheckpointError(f"--resume {want}: {self.directory} holds no checkpoints")
            return state, 0
        step = max(steps) if want == "latest" else int(want)
        if step not in steps:
            raise CheckpointError(f"--resume {want}: no checkpoint for step {step} in "
                                  f"{self.directory}; it holds steps {steps}")
        if step < max(steps):
            raise CheckpointError(f"--resume {want}: {self.directory} also holds later steps "
                                  f"{[s for s in steps if s > step]}, which training on from "
                                  f"step {step} would have to overwrite; move them away")
        saved, meta = read_checked(self.manager, step, self.cfg, self.sharding())
        # (only the shardings of `state` are used; train.py builds it abstract when resuming)
        state = self.from_saved(state)(saved)
        del saved
        data_step = meta["data"]["step"]
        order = meta["data"].get("order")
        if order is not None and self.data_order is not None and order != self.data_order:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} was trained on the {order} loader's data "
                f"order, and this run reads with the {self.data_order} loader (another "
                f"order): pass --loader {order} to resume it")
        print(f"jmamba: resuming from checkpoint {self.directory}/{step} (data position "
              f"{data_step}, {self.cfg.train.steps - step} steps to go)", flush=True)
        return state, data_step

    def _to_log(self):
        """While a failed save winds down, TensorStore's callbacks print pages of "Event
        loop is closed" tracebacks through sys.stderr (a real full disk: ~300 lines): they
        go to the Orbax log, and the failure stays one line of ours."""
        if self.orbax_log is None:
            return contextlib.nullcontext()
        self._log_file = self._log_file or open(self.orbax_log, "a")
        return contextlib.redirect_stderr(self._log_file)

    def _failed(self, e: Exception):
        """A save that failed (full or read-only disk, ...) stops the run: RunError with
        exit code 1 (EXIT_DISK), naming the last checkpoint that is complete on disk."""
        self.failed = True
        with self._to_log():
            return self._failed_quietly(e)

    def _failed_quietly(self, e: Exception):
        try:  # saves still in flight may land: wait for them (their errors are this one)
            self.manager.wait_until_finished()
        except Exception:
            pass
        try:  # what is on disk now (a read-only manager sees only finished steps)
            reader = open_manager(self.directory, read_only=True)
            done = list(reader.all_steps())
            reader.close()
        except Exception:  # the directory may be unreadable too
            done = []
        last = f"step {max(done)}" if done else "none"
        return RunError(f"saving a checkpoint to {self.directory} failed ({_short(e)}); the "
                        f"last complete checkpoint is {last}. Free space or fix the disk, then "
                        f"run the same command to resume from it"
                        + (f" (Orbax's messages: {self.orbax_log})" if self.orbax_log else ""),
                        EXIT_DISK, hard=True)

    def check(self) -> None:
        """Raises RunError if an asynchronous save has failed (cheap: call every step)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._failed(e) from None

    def maybe_save(self, step: int, state: TrainState, last: bool = False) -> bool:
        """Starts an asynchronous save at every ckpt_every-th step and at the last one."""
        if not (last or step % self.cfg.train.ckpt_every == 0):
            return False
        self.check()
        saved, prints = self._to_saved(state)
        prints = leaf_table(jax.device_get(prints))
        t = self.cfg.train
        leaves = {name: {"shape": list(x.shape), "dtype": str(x.dtype),
                         "fingerprint": int(prints[name])}
                  for name, x in leaf_table(saved).items()}
        meta = {"format": FORMAT, "step": step, "config": config_to_dict(self.cfg),
                # Batches are a pure function of (seed, step): the step is the data position.
                "data": {"task": t.task, "seed": t.seed, "step": step,
                         **({"order": self.data_order} if self.data_order else {})},
                "rng": {"init_seed": t.seed},
                "leaves": leaves}
        try:
            return self.manager.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(saved), meta=ocp.args.JsonSave(meta)))
        except Exception as e:
            raise self._failed(e) from None

    def close(self) -> None:
        """Waits for saves in flight (a run must not exit before they are on disk), then
        closes the manager whatever happened, so no checkpoint thread outlives the run (a
        failed save left threads that hung the interpreter at exit). Raises RunError if a
        save failed."""
        error = None
        with self._to_log() if self.failed else contextlib.nullcontext():
            try:
                self.manager.wait_until_finished()
                self.manager.check_for_errors()
            except Exception as e:
                error = e
            finally:
                try:
                    self.manager.close()
                except Exception as e:
                    error = error or e
        if error is not None:
            raise self._failed(error) from None
