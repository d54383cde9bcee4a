"""Bad configs and bad flags are rejected with the field or flag named; presets load."""

import dataclasses
import subprocess
import sys

import pytest

from jmamba.cli import available_presets, load_preset, parse_config
from jmamba.config import Config, ModelConfig, TrainConfig, validate


@pytest.mark.parametrize("field,value,needle", [
    ("headdim", 48, "model.headdim"),
    ("ngroups", 3, "model.ngroups"),
    ("top_k", 5, "model.top_k"),
    ("mlp", "mamba", "model.mlp"),
    ("dt_min", 0.5, "model.dt_min"),
    ("d_model", 0, "model.d_model"),
    ("ssm_impl", "fast", "model.ssm_impl"),
    ("dtype", "float16", "model.dtype"),
])
def test_bad_model_config_names_field(field, value, needle):
    cfg = Config(model=dataclasses.replace(ModelConfig(), **{field: value}))
    with pytest.raises(ValueError, match=needle):
        validate(cfg)


@pytest.mark.parametrize("field,value,needle", [
    ("seq_len", 10, "train.seq_len"),
    ("warmup_steps", 10_000, "train.warmup_steps"),
    ("lr", -1.0, "train.lr"),
    ("batch_size", 0, "train.batch_size"),
])
def test_bad_train_config_names_field(field, value, needle):
    cfg = Config(train=dataclasses.replace(TrainConfig(), **{field: value}))
    with pytest.raises(ValueError, match=needle):
        validate(cfg)


def test_every_preset_loads_and_validates():
    assert "cpu_demo" in available_presets()
    for name in available_presets():
        validate(load_preset(name))


def test_flags_override_fields():
    cfg = parse_config(["--steps", "7", "--warmup_steps", "0", "--model.d_model", "32", "--headdim", "8",
                        "--model.A_init_range", "2,4", "--tie_embeddings", "false"])
    assert cfg.train.steps == 7 and cfg.model.d_model == 32 and cfg.model.headdim == 8
    assert cfg.model.A_init_range == (2.0, 4.0) and cfg.model.tie_embeddings is False


def run_cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True,
                          cwd=__file__.rsplit("/tests/", 1)[0], timeout=120)


def test_unknown_flag_exits_with_suggestion():
    r = run_cli("--stpes", "3")
    assert r.returncode == 2
    assert "--stpes" in r.stderr and "--steps" in r.stderr


def test_bad_value_and_bad_config_exit_nonzero():
    r = run_cli("--steps", "many")
    assert r.returncode != 0 and "--steps" in r.stderr
    r = run_cli("--model.headdim", "48")
    assert r.returncode == 2 and "model.headdim" in r.stderr
    r = run_cli("--config", "cpu_dmeo")
    assert r.returncode != 0 and "cpu_demo" in r.stderr


def test_help_lists_flags_with_defaults():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "--model.d_model" in r.stdout and "(default: 64)" in r.stdout
