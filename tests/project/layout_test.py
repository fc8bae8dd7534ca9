"""The package layout: the library (`keras_sp` outside `keras_sp.experiments`)
imports keras and NumPy only, never the reproduction kit, and its modules
stay short.

`import keras` itself loads h5py and matplotlib under every backend (Keras
3.15's legacy saving and its plotting utilities), so for those two the
check is relative: `import keras_sp` adds no module beyond `keras_sp*` (and
the standard library) to what `import keras` has loaded. TensorFlow and
tensorflow-datasets, which `import keras` does not load under JAX, must stay
out of `sys.modules` altogether.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "keras_sp"
KIT = PACKAGE / "experiments"
MAX_LINES = 600
# Modules whose whole point is one backend; the library imports them inside
# the code path of that backend only (`keras_sp.fisher` imports
# `_fisher_tensorflow` when the backend is TensorFlow, and so on).
BACKEND_MODULES = {
    "_fisher_tensorflow.py",
    "_fisher_jax.py",
    "_fisher_torch.py",
}
LIBRARY_IMPORTS = {"keras", "numpy", "keras_sp"}

IMPORTS = """
import json, sys
import keras
with_keras = set(sys.modules)
import keras_sp
print(json.dumps({"keras": sorted(with_keras),
                  "keras_sp": sorted(sys.modules)}))
"""


def library_files():
    """Every `.py` file of the library: `keras_sp/` minus the kit."""
    return sorted(
        path for path in PACKAGE.rglob("*.py") if KIT not in path.parents
    )


@pytest.fixture(scope="module")
def loaded():
    """`{"keras": modules after import keras, "keras_sp": after import
    keras_sp}`, in a fresh process with KERAS_BACKEND=jax."""
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.splitlines()[-1])
    assert "jax" in modules["keras"], "the subprocess did not use JAX"
    return {name: set(found) for name, found in modules.items()}


@pytest.mark.parametrize("module", ["tensorflow", "tensorflow_datasets"])
def test_import_keras_sp_under_jax_leaves_out(loaded, module):
    assert module not in loaded["keras_sp"]


def added_top_level(loaded):
    """Top-level packages `import keras_sp` added, standard library aside."""
    added = {name.split(".")[0] for name in loaded["keras_sp"]}
    added -= {name.split(".")[0] for name in loaded["keras"]}
    return sorted(added - set(sys.stdlib_module_names) - {"keras_sp"})


def test_import_keras_sp_under_jax_adds_nothing_to_what_keras_loads(loaded):
    assert added_top_level(loaded) == []
    # What keras brings itself (see the module docstring) is not counted
    # against keras_sp; the comparison does see a module keras does not
    # load.
    for module in ("h5py", "matplotlib"):
        assert (module in loaded["keras_sp"]) == (module in loaded["keras"])
    fake = {
        "keras": loaded["keras"],
        "keras_sp": loaded["keras_sp"] | {"tensorflow", "tensorflow.python"},
    }
    assert added_top_level(fake) == ["tensorflow"]


def _imported_names(tree):
    """`(line, dotted name, at module level)` of every import in `tree`,
    `importlib.import_module("...")` and `__import__("...")` included."""
    found = []
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        top = id(node) in module_level
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "." * node.level, top))
            base = node.module or ""
            for alias in node.names:
                name = f"{base}.{alias.name}" if base else alias.name
                found.append((node.lineno, name, top))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", ""))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value, top))
    return found


def test_the_scan_sees_every_form_of_import():
    tree = ast.parse(
        "import keras_sp.experiments.cli\n"
        "from keras_sp import experiments\n"
        "from . import experiments as kit\n"
        "def f():\n"
        "    importlib.import_module('keras_sp.experiments.demo')\n"
    )
    names = [(line, name) for line, name, _ in _imported_names(tree)]
    assert names == [
        (1, "keras_sp.experiments.cli"),
        (2, "keras_sp.experiments"),
        (3, "."),
        (3, "experiments"),
        (5, "keras_sp.experiments.demo"),
    ]
    assert [top for *_, top in _imported_names(tree)] == [1, 1, 1, 1, 0]


def test_nothing_in_the_library_imports_the_kit():
    offenders = []
    for path in library_files():
        tree = ast.parse(path.read_text(), str(path))
        for line, name, _ in _imported_names(tree):
            relative = name.startswith(".")
            if name == "keras_sp.experiments" or name.startswith(
                "keras_sp.experiments."
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{line} {name}")
            elif relative:
                offenders.append(
                    f"{path.relative_to(ROOT)}:{line} relative import"
                )
    assert offenders == []


def test_library_modules_import_only_keras_numpy_and_the_standard_library():
    """At module level; other packages only inside the functions that need
    them (and backend modules, themselves imported that way)."""
    offenders = []
    for path in library_files():
        if path.name in BACKEND_MODULES:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for line, name, top in _imported_names(tree):
            root = name.split(".")[0]
            if (
                top
                and root not in LIBRARY_IMPORTS
                and root not in sys.stdlib_module_names
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{line} {name}")
    assert offenders == []


def test_every_library_module_is_at_most_600_lines():
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in library_files()
    }
    assert len(lengths) > 10
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
