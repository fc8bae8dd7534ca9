"""The documentation site: a strict build, and an API reference that covers
every public symbol (`keras_sp.__all__` and each public module's `__all__`).
"""

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import keras_sp

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Builds the site once with `mkdocs build --strict`."""
    directory = tmp_path_factory.mktemp("site")
    environment = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(directory),
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )
    return directory, build


def public_modules():
    """keras_sp and every submodule whose dotted name has no `_` part."""
    modules = [keras_sp]
    for info in pkgutil.walk_packages(keras_sp.__path__, "keras_sp."):
        parts = info.name.split(".")
        if any(part.startswith("_") for part in parts):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def _is_named_object(value):
    return (
        inspect.ismodule(value)
        or inspect.isclass(value)
        or (inspect.isfunction(value))
    )


def public_symbols():
    """`{"module.name": names the reference may document it under}` over
    every public `__all__`.

    A module is documented under its own name. A class or function may be
    documented where it is defined or under any public name listing it
    (`keras_sp.layers.GrowLayer` for `keras_sp.layers.grow_layer.GrowLayer`);
    anything else (constants) under the name that lists it.
    """
    listed = []
    names_of = {}
    for module in public_modules():
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            public = f"{module.__name__}.{name}"
            listed.append((public, value))
            if _is_named_object(value):
                names_of.setdefault(id(value), {public})
                names_of[id(value)].add(public)
    symbols = {}
    for public, value in listed:
        if inspect.ismodule(value):
            symbols[public] = {value.__name__}
        elif _is_named_object(value):
            names = set(names_of[id(value)])
            if value.__module__.split(".")[0] == "keras_sp":
                names.add(f"{value.__module__}.{value.__qualname__}")
            symbols[public] = names
        else:
            symbols[public] = {public}
    return symbols


def documented_objects(inventory_path):
    """The objects the site renders, read from its Sphinx inventory.

    mkdocstrings lists every rendered object with priority 1, and aliases
    that merely point to one (imported names) with priority 2.
    """
    data = Path(inventory_path).read_bytes()
    header = b"# The remainder of this file is compressed using zlib.\n"
    assert header in data, f"{inventory_path} is not a Sphinx inventory"
    body = zlib.decompress(data.split(header, 1)[1]).decode()
    documented = set()
    for line in body.splitlines():
        name, domain_role, priority = line.split(" ", 3)[:3]
        if domain_role.startswith("py:") and priority == "1":
            documented.add(name)
    return documented


def missing_from(documented):
    """The public symbols none of whose names the reference documents."""
    return sorted(
        f"{symbol} (as one of {sorted(names)})"
        for symbol, names in public_symbols().items()
        if not names & documented
    )


def test_the_site_builds_with_warnings_as_errors(site):
    _, build = site
    assert build.returncode == 0, build.stderr[-4000:]


def test_every_public_symbol_is_in_the_api_reference(site):
    directory, build = site
    assert build.returncode == 0, build.stderr[-4000:]
    documented = documented_objects(directory / "objects.inv")
    assert missing_from(documented) == []


def test_the_check_names_a_symbol_left_out_of_the_reference(site):
    directory, build = site
    assert build.returncode == 0, build.stderr[-4000:]
    documented = documented_objects(directory / "objects.inv")
    documented.discard("keras_sp.penalties.regularize")
    names = "['keras_sp.penalties.regularize', 'keras_sp.regularize']"
    assert missing_from(documented) == [
        f"keras_sp.penalties.regularize (as one of {names})",
        f"keras_sp.regularize (as one of {names})",
    ]


def test_public_symbols_and_the_names_they_may_be_documented_under():
    symbols = public_symbols()
    assert symbols["keras_sp.regularize"] == {
        "keras_sp.penalties.regularize",
        "keras_sp.regularize",
    }
    assert symbols["keras_sp.callbacks"] == {"keras_sp.callbacks"}
    assert symbols["keras_sp.layers.grow_layer.GrowLayer"] == {
        "keras_sp.layers.GrowLayer",
        "keras_sp.layers.grow_layer.GrowLayer",
    }
    assert symbols["keras_sp.fisher.MAX_GRADIENT_ENTRIES"] == {
        "keras_sp.fisher.MAX_GRADIENT_ENTRIES"
    }
    assert not any("._" in symbol for symbol in symbols)


def test_every_results_page_is_reachable(site):
    """Each committed result under docs/results is a page of the site."""
    directory, build = site
    assert build.returncode == 0, build.stderr[-4000:]
    pages = sorted((ROOT / "docs" / "results").rglob("*.md"))
    assert pages
    for page in pages:
        relative = page.relative_to(ROOT / "docs").with_suffix("")
        if relative.name == "README":
            relative = relative.parent
        assert (directory / relative / "index.html").exists(), relative
