"""Checkpoints: layout-independent restore, exact resume after SIGKILL, and bad input."""

import dataclasses
import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmamba import checkpoint as ck
from jmamba import model
from jmamba.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate
from jmamba.data import RecallData, recall_batch
from jmamba.parallel.pipeline import make_pipeline_loss
from jmamba.parallel.setup import build, experts_fn_for

MODEL = ModelConfig(d_model=16, n_layer=8, vocab_size=40, headdim=8, d_state=8, chunk_size=8,
                    n_experts=8, top_k=2, d_expert=16)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(ckpt_dir, pp=1, ep=1, M=1, schedule="gpipe", steps=4, model=MODEL, split="",
             **train):
    return validate(Config(
        model=model,
        train=TrainConfig(batch_size=8, seq_len=24, n_pairs=4, steps=steps, warmup_steps=1,
                          ckpt_dir=str(ckpt_dir), **train),
        parallel=ParallelConfig(pp=pp, ep=ep, microbatches=M, ep_capacity_factor=8.0,
                                pp_schedule=schedule, pp_split=split)))


def run_steps(run, state, cfg, start, n):
    data = RecallData(cfg.train.seed, 8, 24, MODEL.vocab_size, 4, step=start)
    losses = []
    for _ in range(n):
        state, metrics = run.step_fn(state, jax.tree.map(jnp.asarray, next(data)))
        losses.append(float(metrics["loss"]))
    return state, losses


def batch_at(step):
    return {k: jnp.asarray(v) for k, v in recall_batch(0, step, 8, 24, MODEL.vocab_size,
                                                        4).items()}


def forward_loss(cfg, run, state, step):
    """The loss the next train step would report, without compiling a whole train step."""
    if run.layout is None:
        loss_fn = functools.partial(model.loss_fn, cfg=cfg.model)
    else:
        loss_fn = make_pipeline_loss(cfg, run.layout, run.mesh, experts_fn_for(cfg))
    return float(jax.jit(loss_fn)(state.params, batch_at(step))[0])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A checkpoint written at (pp=2, ep=2) after two AdamW steps, and the loss of step 3.

    The two steps run on one device (one train-step compile instead of a pipelined one;
    tests/test_pp_ep.py holds the layouts' steps equal); the state then moves to (2, 2)
    through a checkpoint and is saved from there.
    """
    root = tmp_path_factory.mktemp("ckpt")
    cfg = make_cfg(root / "one_device")
    run = build(cfg)
    state, _ = run_steps(run, run.state, cfg, 0, 2)
    saver = ck.Checkpoints(cfg, run)
    assert saver.maybe_save(2, state, last=True)
    saver.close()
    _, (loss3,) = run_steps(run, state, cfg, 2, 1)
    cfg22 = make_cfg(root / "one_device", pp=2, ep=2, M=2)
    run22 = build(cfg22)
    state22, _ = ck.Checkpoints(cfg22, run22).resume(run22.state)
    saver = ck.Checkpoints(make_cfg(root / "pp2_ep2", pp=2, ep=2, M=2), run22)
    assert saver.maybe_save(2, state22, last=True)
    saver.close()
    return root / "pp2_ep2", loss3


def copy_of(written, tmp_path):
    shutil.copytree(written[0], tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("pp,ep,M,schedule,split", [
    (1, 1, 1, "gpipe", ""), (4, 2, 4, "circular", ""),
    (2, 2, 2, "1f1b", "3,5")])  # the last is not contiguous: re-laid leaf by leaf
def test_restore_into_another_layout_gives_the_same_next_loss(written, tmp_path, pp, ep, M,
                                                              schedule, split):
    directory, loss3 = written
    saved, _, meta = ck.load(str(directory))
    # The layout and log_dir may differ from the writer's (steps too, but they reshape the
    # learning-rate schedule).
    cfg = make_cfg(directory, pp, ep, M, schedule, split=split, log_dir=str(tmp_path / "log"))
    run = build(cfg)
    state, data_step = ck.Checkpoints(cfg, run).resume(run.state)
    assert data_step == meta["data"]["step"] == int(state.step) == 2
    if pp > 1:  # tied embedding: both ends hold the same table again
        table = np.asarray(state.params["io"]["table"])
        np.testing.assert_array_equal(table[0], table[-1])
    # Saved again from this layout, the checkpoint holds the same arrays (params, mu, nu)
    # bit for bit.
    saver = ck.Checkpoints(make_cfg(tmp_path / "again", pp, ep, M, schedule, split=split),
                           run)
    saver.maybe_save(2, state, last=True)
    saver.close()
    # What a save hands Orbax lives in host memory, one leaf made at a time on the devices.
    host_tree, _ = saver._to_saved(state)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(host_tree)} == {"pinned_host"}
    resaved, _, meta_again = ck.load(str(tmp_path / "again"))
    assert meta_again["leaves"] == meta["leaves"]
    for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(saved)[0],
                                 jax.tree.leaves(resaved)):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    np.testing.assert_allclose(forward_loss(cfg, run, state, 2), loss3, rtol=1e-5)


def test_saved_tree_names_modules_in_canonical_layout(written):
    saved, cfg, meta = ck.load(str(written[0]))
    names = set(meta["leaves"])
    for name in ("step", "params/embed/embedding", "params/layers/mixer/in_proj/kernel",
                 "params/layers/mlp/w_gate", "params/norm_f/scale",
                 "opt_state/0/mu/layers/mlp/w_gate", "opt_state/0/nu/embed/embedding"):
        assert name in names, name
    assert meta["leaves"]["params/layers/mlp/w_gate"]["shape"] == [8, 8, 16, 16]  # [Y, E, D, F]
    assert cfg == make_cfg(written[0], pp=2, ep=2, M=2)
    assert meta["format"] == ck.FORMAT and meta["data"] == {"task": "recall", "seed": 0,
                                                            "step": 2}
    assert meta["rng"] == {"init_seed": 0}
    config_json = json.load(open(f"{written[0]}/2/meta/metadata"))["config"]
    assert config_json["model"]["d_model"] == 16 and config_json["parallel"]["pp"] == 2


def test_half_written_step_is_ignored_and_cleaned(written, tmp_path):
    directory = copy_of(written, tmp_path)
    tmp = directory / "9.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "manifest.ocdbt").write_bytes(b"partial")
    manager = ck.open_manager(str(directory))
    assert list(manager.all_steps()) == [2]
    manager.close()  # (Orbax deletes it before its next save)
    _, _, meta = ck.load(str(directory))
    assert meta["step"] == 2


def damage_truncate(directory):
    for f in glob.glob(f"{directory}/2/state/d/*"):
        open(f, "r+b").truncate(os.path.getsize(f) // 2)


def damage_remove_manifest(directory):
    os.remove(f"{directory}/2/state/manifest.ocdbt")


def damage_remove_meta(directory):
    for f in glob.glob(f"{directory}/2/meta/*"):
        os.remove(f)


def damage_flip_bits(directory):
    """Same size, other bytes (OCDBT's CRC-32C catches this one)."""
    for f in glob.glob(f"{directory}/2/state/d/*"):
        data = bytearray(open(f, "rb").read())
        for i in range(len(data) // 3, len(data) * 2 // 3):
            data[i] ^= 0x10
        open(f, "wb").write(bytes(data))


# A failed tensorstore read leaves an asyncio callback that fires after its loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage,message", [
    (damage_truncate, "cannot be read"), (damage_remove_manifest, "cannot be read"),
    (damage_remove_meta, "metadata cannot be read"), (damage_flip_bits, "corrupt")])
def test_damaged_checkpoint_is_refused(written, tmp_path, damage, message):
    directory = copy_of(written, tmp_path)
    damage(directory)
    with pytest.raises(ck.CheckpointError, match=message):
        ck.load(str(directory))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_array_that_differs_from_its_fingerprint_is_refused(written, tmp_path):
    """Bytes that still decode but are not what was saved (here: the record of them)."""
    directory = copy_of(written, tmp_path)
    path = f"{directory}/2/meta/metadata"
    meta = json.load(open(path))
    meta["leaves"]["opt_state/0/nu/layers/mlp/w_up"]["fingerprint"] ^= 1
    json.dump(meta, open(path, "w"))
    with pytest.raises(ck.CheckpointError, match="'opt_state/0/nu/layers/mlp/w_up' does not "
                                                 "match the fingerprint"):
        ck.load(str(directory))


def test_unknown_format_is_refused(written, tmp_path):
    directory = copy_of(written, tmp_path)
    path = f"{directory}/2/meta/metadata"
    meta = json.load(open(path))
    meta["format"] = 99
    json.dump(meta, open(path, "w"))
    with pytest.raises(ck.CheckpointError, match="format 99, but this code reads format 1"):
        ck.load(str(directory))


@pytest.mark.parametrize("field,value", [("d_model", 32), ("n_layer", 4), ("n_experts", 4)])
def test_config_mismatch_names_the_field(written, field, value):
    cfg = make_cfg(written[0], model=dataclasses.replace(MODEL, **{field: value}))
    manager = ck.open_manager(str(written[0]), read_only=True)
    with pytest.raises(ck.CheckpointError, match=f"'model.{field}' = {value}, but the "
                                                 f"checkpoint was written with"):
        ck.read_checked(manager, 2, cfg, None)


def test_refused_resume_loads_nothing(written):
    cfg = make_cfg(written[0], lr=1e-4)
    run = build(cfg)
    before = jax.tree.map(np.asarray, run.state)
    with pytest.raises(ck.CheckpointError, match="'train.lr' = 0.0001"):
        ck.Checkpoints(cfg, run).resume(run.state)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, run.state), before)


def test_missing_checkpoint_or_step_is_refused(written, tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load(str(tmp_path / "nowhere"))
    with pytest.raises(ck.CheckpointError, match=r"holds steps \[2\]"):
        ck.load(str(written[0]), step=7)
    cfg = make_cfg(written[0], resume="7")
    with pytest.raises(ck.CheckpointError, match=r"no checkpoint for step 7 .* holds steps \[2\]"):
        ck.Checkpoints(cfg, build(cfg)).resume(None)


# ------------------------------------------------------------------ exact resume after SIGKILL

TINY = ["--d_model", "16", "--n_layer", "2", "--n_experts", "4", "--headdim", "8", "--d_state",
        "8", "--chunk_size", "8", "--d_expert", "16", "--vocab_size", "40", "--batch_size", "8",
        "--seq_len", "24", "--n_pairs", "4", "--warmup_steps", "2", "--log_every", "10",
        "--steps", "30", "--ckpt_every", "5", "--keep", "2", "--eval_every", "0"]


def train_cmd(tmp_path, name):
    return [sys.executable, "train.py", *TINY, "--ckpt_dir", str(tmp_path / name),
            "--log_dir", str(tmp_path / f"{name}_log")]


def finalized_steps(directory):
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
        directory) else []


def test_killed_run_resumes_to_bit_identical_parameters(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jit"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    # The uninterrupted run also fills the compilation cache the other two reuse.
    subprocess.run(train_cmd(tmp_path, "full"), cwd=REPO, env=env, check=True,
                   capture_output=True)
    victim = subprocess.Popen(train_cmd(tmp_path, "killed"), cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not finalized_steps(tmp_path / "killed") and victim.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    at_kill = finalized_steps(tmp_path / "killed")
    assert at_kill and max(at_kill) < 30, at_kill  # killed mid-run, after a checkpoint
    resumed = subprocess.run(train_cmd(tmp_path, "killed"), cwd=REPO, env=env, check=True,
                             capture_output=True, text=True)
    assert f"resuming from checkpoint {tmp_path / 'killed'}/{max(at_kill)}" in resumed.stdout
    assert finalized_steps(tmp_path / "killed") == [25, 30]  # keep 2
    assert not [n for n in os.listdir(tmp_path / "killed") if "tmp" in n]  # cleaned up
    full, _, _ = ck.load(str(tmp_path / "full"))
    again, _, meta = ck.load(str(tmp_path / "killed"))
    assert meta["step"] == 30
    jax.tree.map(np.testing.assert_array_equal, again, full)
    # The same log_dir holds each step's record once, as the uninterrupted run logged it.
    rows = {name: [json.loads(l) for l in open(tmp_path / f"{name}_log" / "metrics.jsonl")]
            for name in ("full", "killed")}
    assert [r["step"] for r in rows["killed"]] == [r["step"] for r in rows["full"]]
    assert [r["loss"] for r in rows["killed"]] == [r["loss"] for r in rows["full"]]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_step_says_to_move_it_and_names_the_earlier_one(tmp_path):
    """A resume starts from the latest step, so the hint names the damaged directory to move
    and the step that remains; metadata without its keys is refused by name, not KeyError."""
    directory = tmp_path / "ck"
    train_cli = [sys.executable, "train.py", "--steps", "4", "--warmup_steps", "1",
                 "--ckpt_dir", str(directory), "--ckpt_every", "2", "--log_dir",
                 str(tmp_path / "logs")]
    subprocess.run(train_cli, cwd=REPO, check=True, capture_output=True)
    path = f"{directory}/4/meta/metadata"
    meta = json.load(open(path))
    json.dump({k: v for k, v in meta.items() if k != "config"}, open(path, "w"))
    with pytest.raises(ck.CheckpointError, match=r"lacks \['config'\].*move .*/4 out of the "
                                                 r"directory .* to resume from step 2"):
        ck.load(str(directory))
    for f in glob.glob(f"{directory}/4/state/ocdbt.process_0/d/*"):
        os.remove(f)
    json.dump(meta, open(path, "w"))  # whole again; now its arrays are gone
    again = subprocess.run([*train_cli[:3], "6", *train_cli[4:]], cwd=REPO,
                           capture_output=True, text=True)
    assert again.returncode == 2, again.stderr[-2000:]
    assert again.stderr.count("\n") == 1 and "resume from step 2" in again.stderr, again.stderr


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_whole_state_from_another_step_is_caught_only_by_the_fingerprints(written,
                                                                             tmp_path):
    """What the per-leaf fingerprints catch that Orbax's checksums do not: a step's `state`
    directory replaced by another step's (a copy or sync gone wrong). Every file is intact
    and self-consistent, so Orbax reads it without complaint; only the fingerprints
    recorded in the step's own metadata show that the arrays are not the ones saved."""
    directory = copy_of(written, tmp_path)
    cfg = make_cfg(directory, pp=2, ep=2, M=2)
    run = build(cfg)
    saver = ck.Checkpoints(cfg, run)
    state, _ = saver.resume(run.state)
    later = state._replace(step=state.step + 1,
                           params=jax.tree.map(lambda x: x * 1.5, state.params))
    assert saver.maybe_save(3, later, last=True)
    saver.close()
    shutil.rmtree(directory / "3" / "state")
    shutil.copytree(directory / "2" / "state", directory / "3" / "state")
    with pytest.raises(ck.CheckpointError, match="does not match the fingerprint"):
        ck.load(str(directory))
