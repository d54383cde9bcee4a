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


@pytest.mark.parametrize("argv,needles", [
    (["--stpes", "3"], ["--stpes", "--steps"]),
    (["--model.d_modle=32"], ["--model.d_modle", "--model.d_model"]),
    (["--steps", "many"], ["--steps", "many"]),
    (["--tie_embeddings", "maybe"], ["--tie_embeddings", "true or false"]),
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
