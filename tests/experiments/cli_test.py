"""The `keras-sp` command line: help, version, usage, errors, clean output."""

import argparse
import importlib
import os
import subprocess
import sys

import pytest

import keras_sp
from keras_sp.experiments import cli

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)


def _subcommands():
    """`{subcommand name: its parser}` for every experiment module."""
    parsers = {}
    for module in cli.EXPERIMENT_MODULES:
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).add_parser(subparsers)
        assert len(subparsers.choices) == 1, module
        parsers.update(subparsers.choices)
    return parsers


SUBCOMMANDS = _subcommands()
# The subcommands that read a JSON config file.
WITH_CONFIG = [
    name
    for name, parser in SUBCOMMANDS.items()
    if "--config" in parser.format_help()
]


def _console_script(*args):
    """Runs `keras-sp ARGS` as the console script does, in a new process,
    with the environment of a user who did not quiet TensorFlow."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-m", "keras_sp_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.parametrize("command", list(SUBCOMMANDS), ids=str)
def test_every_subcommand_has_help_naming_its_out_folder(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    assert output.startswith(f"usage: keras-sp {command} ")
    assert "--out" in output


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"keras-sp {keras_sp.__version__}\n"


def test_no_arguments_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: keras-sp ")
    for command in SUBCOMMANDS:
        assert command in captured.err


def test_the_experiments_read_config_files():
    assert {"demo", "grow", "transferability"} <= set(WITH_CONFIG)


@pytest.mark.parametrize("command", WITH_CONFIG, ids=str)
def test_missing_config_file_is_a_one_line_error(command, tmp_path, capsys):
    missing = tmp_path / "missing.json"
    out = tmp_path / "out"
    code = cli.main([command, "--config", str(missing), "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1
    assert error.startswith(f"keras-sp {command}: error: ")
    assert str(missing) in error
    assert not out.exists()


def test_debug_raises_instead(tmp_path):
    missing = tmp_path / "missing.json"
    command = WITH_CONFIG[0]
    with pytest.raises(ValueError, match="missing.json"):
        cli.main(["--debug", command, "--config", str(missing)])


def test_console_script_bad_input_is_one_line_without_start_up_log(
    tmp_path,
):
    """In a real process: TensorFlow's C++ start-up lines are filtered out,
    so standard error holds only the error."""
    missing = str(tmp_path / "missing.json")
    result = _console_script("demo", "--config", missing)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"keras-sp demo: error: Cannot read config file '{missing}': "
        "No such file or directory\n"
    )


def test_console_script_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "missing.json")
    result = _console_script("--debug", "demo", "--config", missing)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == (
        "keras_sp.experiments.config.ConfigError: Cannot read config file "
        f"'{missing}': No such file or directory"
    )
