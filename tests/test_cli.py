"""Flags as users expect: --help lists every field with its default; mistakes name the
flag and the closest valid choice, and exit with status 2."""

import pytest

from jmamba.cli import _fields, build_parser, parse_config
from jmamba.config import Config


def test_help_lists_every_field_with_its_default():
    parser, _ = build_parser(Config())
    text = parser.format_help()
    for section, name, _, value in _fields(Config()):
        assert f"--{section}.{name}" in text
    assert text.count("(default:") == len(list(_fields(Config())))


def test_scan_layers_takes_true_false_or_auto():
    for text, want in (("true", True), ("false", False), ("auto", None)):
        assert parse_config(["--scan_layers", text]).model.scan_layers is want
    assert parse_config([]).model.scan_layers is None


@pytest.mark.parametrize("argv,needles", [
    (["--stpes", "3"], ["--stpes", "--steps"]),
    (["--model.d_modle=32"], ["--model.d_modle", "--model.d_model"]),
    (["--steps", "many"], ["--steps", "many"]),
    (["--tie_embeddings", "maybe"], ["--tie_embeddings", "true or false"]),
    (["--scan_layers", "maybe"], ["--scan_layers", "true, false or auto"]),
    (["--model.mlp", "moee"], ["model.mlp", "did you mean 'moe'"]),
    (["--remat", "ful"], ["parallel.remat", "did you mean 'full'"]),
])
def test_mistakes_exit_2_naming_flag_and_closest(argv, needles, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)


def test_unknown_preset_and_unusable_paths_exit_2_with_one_line(tmp_path, capsys):
    from jmamba.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--config", "moe_1bb"])
    assert e.value.code == 2 and "did you mean 'moe_1b'" in capsys.readouterr().err.lower()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["--steps", "2", "--warmup_steps", "1", "--ckpt_dir", str(a_file),
              "--log_dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--ckpt_dir" in err, err


def test_short_run_shrinks_the_default_warmup_but_not_an_explicit_one(capsys):
    cfg = parse_config(["--steps", "10"])
    assert cfg.train.steps == 10 and cfg.train.warmup_steps == 1
    assert "warming up over 1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        parse_config(["--steps", "10", "--warmup_steps", "30"])
    assert e.value.code == 2 and "train.warmup_steps" in capsys.readouterr().err


def test_token_files_set_the_vocab_unless_the_flag_does(tmp_path, capsys):
    """A sidecar's vocab_size becomes model.vocab_size (with a notice) when --vocab_size is
    not given; an explicit flag wins; a bad sidecar leaves the preset's for preflight."""
    import json

    import numpy as np
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "d.bin")
    json.dump({"dtype": "uint16", "vocab_size": 258, "n_tokens": 100, "eos_id": 256},
              open(tmp_path / "d.json", "w"))
    cfg = parse_config(["--data", str(tmp_path / "d"), "--steps", "2"])
    assert cfg.model.vocab_size == 258
    assert "model.vocab_size 64 -> 258" in capsys.readouterr().out
    cfg = parse_config(["--data", str(tmp_path / "d"), "--steps", "2", "--vocab_size", "300"])
    assert cfg.model.vocab_size == 300 and "->" not in capsys.readouterr().out
    (tmp_path / "d.json").write_text("not json")
    cfg = parse_config(["--data", str(tmp_path / "d"), "--steps", "2"])
    assert cfg.model.vocab_size == 64


@pytest.mark.parametrize("on", [True, False])
def test_deterministic_sets_xlas_flag_before_training(on, monkeypatch):
    """--deterministic true hands XLA its deterministic-ops flag before jax starts."""
    import os

    import jmamba.driver
    from jmamba.cli import main
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    seen = {}
    monkeypatch.setattr(jmamba.driver, "train", lambda cfg: seen.update(
        flags=os.environ["XLA_FLAGS"], deterministic=cfg.train.deterministic))
    main(["--config", "cpu_demo", "--deterministic", str(on).lower()])
    assert seen["deterministic"] is on
    assert ("--xla_gpu_exclude_nondeterministic_ops=true" in seen["flags"]) is on
    assert "--xla_force_host_platform_device_count=8" in seen["flags"]


def test_out_of_memory_before_the_first_step_exits_3_with_one_line(monkeypatch, capsys):
    """A device allocation that fails before the loop (building, restoring or compiling
    the step) ends as the loop's does: one line, exit 3, what to change for the layout."""
    import jax

    import jmamba.driver
    from jmamba.cli import main

    def oom(cfg):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                         "allocate 54.00GiB. [tf-allocator-allocation-error='']")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(jmamba.driver, "train", oom)
    with pytest.raises(SystemExit) as e:
        main(["--config", "cpu_demo", "--pp", "2", "--microbatches", "4", "--pp_stash",
              "residuals"])
    err = capsys.readouterr().err
    assert e.value.code == 3 and err.count("\n") == 1, err
    assert "before the first step (Out of memory while trying to allocate 54.00GiB)" in err
    assert "raise --microbatches, use --pp_stash inputs" in err and "--remat" not in err
    monkeypatch.setattr(jmamba.driver, "train", lambda cfg: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["--config", "cpu_demo"])
