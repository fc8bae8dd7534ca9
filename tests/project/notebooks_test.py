"""The notebooks: committed without outputs, ready for Colab, and run top to
bottom at small size (KERAS_SP_SMALL=1), offline, in a fresh environment
where their install cell installs the wheel of this checkout."""

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from built_wheel import build
from built_wheel import environment
from built_wheel import fresh_environment
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIRECTORY = ROOT / "notebooks"
NOTEBOOKS = (
    "quickstart.ipynb",
    "reproducing_l2sp.ipynb",
    "growing_a_brain.ipynb",
    "transferability.ipynb",
)
COLAB = (
    "https://colab.research.google.com/github/keras-sp/keras-sp/blob/main/"
    "notebooks/{name}"
)
INSTALL = re.compile(
    r'^\s+%pip install (--quiet )?"keras-sp\[experiments\]"$', re.MULTILINE
)
# The Jupyter kernel that runs a fresh environment's Python.
KERNEL = "keras-sp-wheel"
# A last cell the test adds: where the notebook's keras_sp came from, written
# to a file (a cell's printed output can carry a late message of another).
PROBE = (
    "import pathlib\n\nimport keras_sp\n\n"
    'pathlib.Path("probe.txt").write_text(keras_sp.__file__)'
)


def read(name):
    return nbformat.read(NOTEBOOK_DIRECTORY / name, as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def install_cell(notebook):
    """The cell that installs keras-sp, only where it cannot be imported."""
    cells = [c for c in code_cells(notebook) if INSTALL.search(c.source)]
    assert len(cells) == 1, 'expected one `%pip install "keras-sp[...]"` cell'
    (cell,) = cells
    assert 'if importlib.util.find_spec("keras_sp") is None:' in cell.source
    return cell


def test_the_notebooks_are_the_four_documented_ones():
    found = sorted(path.name for path in NOTEBOOK_DIRECTORY.glob("*.ipynb"))
    assert found == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_or_execution_counts(name):
    notebook = read(name)
    nbformat.validate(notebook)
    for index, cell in enumerate(code_cells(notebook)):
        assert cell.outputs == [], f"code cell {index} has outputs"
        assert cell.execution_count is None, f"code cell {index} has a count"
        assert "execution" not in cell.metadata, f"code cell {index} timing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opens_in_colab_and_installs_keras_sp(name):
    notebook = read(name)
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    assert COLAB.format(name=name) in first.source
    install = install_cell(notebook)
    assert notebook.cells.index(install) < notebook.cells.index(
        next(c for c in code_cells(notebook) if "import keras_sp" in c.source)
    )
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_has_a_small_size_switch_and_uses_the_public_api_only(name):
    source = "\n".join(cell.source for cell in code_cells(read(name)))
    assert 'SMALL = os.environ.get("KERAS_SP_SMALL") == "1"' in source
    private = re.findall(r"keras_sp(?:\.\w+)*\._\w+", source)
    assert private == []


def kernel_for(python, folder):
    """A Jupyter data folder with the kernel `KERNEL` running `python`."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": KERNEL, "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return folder


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_top_to_bottom_at_small_size(
    name, tmp_path, tmp_path_factory, monkeypatch
):
    # The kernel runs a fresh environment without keras-sp (see
    # built_wheel), from tmp_path, with pip offline and pointed at the wheel
    # of this checkout: the install cell installs it as on Colab, then the
    # notebook runs small, its files and cache under tmp_path.
    wheel, _ = build(tmp_path_factory)
    python, site_packages = fresh_environment(tmp_path / "venv")
    variables = environment(
        PIP_FIND_LINKS=str(wheel.parent),
        JUPYTER_PATH=str(kernel_for(python, tmp_path / "jupyter")),
        KERAS_SP_SMALL="1",
        KERAS_SP_CACHE=str(tmp_path / "cache"),
    )
    for variable in set(os.environ) - set(variables):
        monkeypatch.delenv(variable)
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    notebook = read(name)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    counts = [cell.execution_count for cell in code_cells(notebook)]
    assert counts == list(range(1, len(counts) + 1))
    errors = [
        output
        for cell in code_cells(notebook)
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert errors == []
    # The install cell installed the wheel, and the notebook imported it.
    installer = site_packages / "keras_sp-0.1.0.dist-info" / "INSTALLER"
    assert installer.read_text() == "pip\n"
    imported = (tmp_path / "probe.txt").read_text()
    assert imported == str(site_packages / "keras_sp" / "__init__.py")
