"""The sdist and wheel `python -m build` makes, and the wheel installed into
a fresh virtual environment, offline (see `built_wheel`)."""

import configparser
import email.parser
import json
import re
import tarfile
import zipfile
from pathlib import Path

import pytest
from built_wheel import ROOT
from built_wheel import build
from built_wheel import environment
from built_wheel import fresh_environment
from built_wheel import run
from packaging.requirements import Requirement

VERSION = "0.1.0"
DIST_INFO = f"keras_sp-{VERSION}.dist-info"
EXTRAS = {
    "tensorflow",
    "jax",
    "torch",
    "tensorboard",
    "experiments",
    "dev",
    "docs",
    "notebooks",
}
SUBCOMMANDS = (
    "demo",
    "compare",
    "finetune",
    "grow",
    "transferability",
    "fisher",
    "convert-mobilenet",
)


def package_files():
    """Every file of the `keras_sp` package in this checkout."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "keras_sp").rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    return build(tmp_path_factory)[1]


def test_the_wheel_holds_the_package_its_configs_and_the_console_script(
    wheel,
):
    assert wheel.name == f"keras_sp-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"{DIST_INFO}/entry_points.txt")
    expected = package_files()
    configs = {name for name in expected if name.endswith(".json")}
    assert "keras_sp/configs/caltech256_30.json" in configs
    assert {name for name in names if name.startswith("keras_sp/")} == expected
    # Nothing but the package, the console script's module and the metadata:
    # no tests, docs, notebooks or benchmarks.
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"keras_sp", "keras_sp_cli.py", DIST_INFO}
    parser = configparser.ConfigParser()
    parser.read_string(entry_points.decode())
    assert dict(parser["console_scripts"]) == {"keras-sp": "keras_sp_cli:main"}


def test_the_wheel_requires_keras_and_numpy_and_names_the_extras(wheel):
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"{DIST_INFO}/METADATA").decode()
    metadata = email.parser.Parser().parsestr(text)
    assert metadata["Name"] == "keras-sp"
    assert metadata["Version"] == VERSION
    assert metadata["License-Expression"] == "Apache-2.0"
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    hard = {r.name for r in requirements if r.marker is None}
    assert hard == {"keras", "numpy"}
    assert set(metadata.get_all("Provides-Extra")) == EXTRAS

    def extra(name):
        return {
            str(r.name) + "".join(f"[{e}]" for e in sorted(r.extras)): r
            for r in requirements
            if r.marker is not None and r.marker.evaluate({"extra": name})
        }

    assert set(extra("tensorboard")) == {"tensorflow", "tensorboard"}
    assert set(extra("jax")) == {"jax[cpu]"}
    assert str(extra("torch")["torch"].specifier) == "==2.13.0"
    assert set(extra("experiments")) == {
        "tensorflow",
        "tensorflow-datasets",
        "matplotlib",
        "h5py",
    }
    dev = set(extra("dev"))
    assert {"keras-sp[experiments][tensorboard]", "jax[cpu]", "torch"} <= dev
    assert {"hypothesis", "pytest", "pytest-xdist", "ruff", "build"} <= dev
    assert "keras-sp[experiments]" in extra("notebooks")


def test_the_sdist_holds_what_the_wheel_is_built_from(sdist):
    with tarfile.open(sdist) as archive:
        names = {
            name.split("/", 1)[1] for name in archive.getnames() if "/" in name
        }
    for name in ("pyproject.toml", "setup.cfg", "README.md", "keras_sp_cli.py"):
        assert name in names
    assert package_files() <= names


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh environment where `pip install "keras-sp[experiments]"` found
    the wheel: `(folder, python, site_packages, pip's output)`."""
    folder = tmp_path_factory.mktemp("installed")
    python, site_packages = fresh_environment(folder / "venv")
    before = run([python, "-c", "import keras_sp"], cwd=folder)
    # The fresh environment does not see this checkout or its editable
    # install, so what it imports after the install is the wheel's.
    assert before.returncode == 1
    assert "No module named 'keras_sp'" in before.stderr
    result = run(
        [python, "-m", "pip", "install", "keras-sp[experiments]"],
        env=environment(PIP_FIND_LINKS=str(wheel.parent)),
        cwd=folder,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, python, site_packages, result.stdout


def test_pip_installs_the_wheel_and_only_the_wheel(wheel, installed):
    folder, python, site_packages, output = installed
    assert f"Processing {wheel}" in output
    lines = output.splitlines()
    (line,) = [x for x in lines if "Successfully installed" in x]
    assert line.split() == ["Successfully", "installed", f"keras-sp-{VERSION}"]
    result = run(
        [
            python,
            "-c",
            "import importlib.metadata, keras_sp, keras_sp_cli; "
            "print(keras_sp.__file__); print(keras_sp_cli.__file__); "
            "print(keras_sp.__version__); "
            "print(importlib.metadata.version('keras-sp'))",
        ],
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    package, module, version, distribution = result.stdout.split()
    assert Path(package) == site_packages / "keras_sp" / "__init__.py"
    assert Path(module) == site_packages / "keras_sp_cli.py"
    assert version == distribution == VERSION


def test_the_console_script_lists_every_subcommand(installed):
    folder = installed[0]
    result = run([folder / "venv" / "bin" / "keras-sp", "--help"], cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: keras-sp")
    # The subcommands, one a line, indented by 4 (their help by more).
    listed = re.findall(r"^    (\S+)", result.stdout, re.MULTILINE)
    assert listed == list(SUBCOMMANDS)


def test_the_shipped_configs_are_installed_and_read(installed, tmp_path):
    folder, _, site_packages, _ = installed
    script = folder / "venv" / "bin" / "keras-sp"
    # A shipped config by name: found among the installed package's data,
    # read and validated, then the run stops at the first thing a config
    # cannot provide (the results file `--report-only` reports on). A name
    # not found would end with "... is not one of keras-sp's `finetune`
    # configs".
    out = tmp_path / "out"
    result = run(
        [script, "finetune", "--config", "caltech256_30", "--report-only"]
        + ["--out", out],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"keras-sp finetune: error: No results file "
        f"'{out / 'results.json'}' to report on.\n"
    )
    # The same config with one bad value is refused by the validation.
    (shipped,) = site_packages.rglob("configs/caltech256_30.json")
    config = json.loads(shipped.read_text())
    config["iterations"] = "many"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(config))
    result = run(
        [script, "finetune", "--config", broken, "--report-only"]
        + ["--out", out],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "keras-sp finetune: error: Config key 'iterations' must be int. "
        "Received: iterations='many'\n"
    )
