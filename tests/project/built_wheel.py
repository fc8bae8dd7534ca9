"""keras-sp built and installed as a user meets it, offline.

`build` runs `python -m build` on a copy of this checkout (the sdist, then
the wheel from the sdist, so a file the sdist misses is missing from the
wheel too). `fresh_environment` makes a new virtual environment that sees
every package of the running one except keras-sp itself (neither this
checkout nor its editable install), so that installing the wheel there
needs no index: pip finds the wheel through `PIP_FIND_LINKS` and every
dependency already installed.
"""

import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What a checkout holds besides its sources (data sets and results can be
# large): not copied into the build.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "site",
    "results",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
)


def NOT_SOURCES(folder, names):
    """What the copy leaves out: caches and build outputs anywhere, and the
    data sets and results folders at the top (the kit's `data` package
    stays)."""
    ignored = set(_NOT_SOURCES(folder, names))
    if Path(folder).resolve() == ROOT:
        ignored.update({"data", "results"} & set(names))
    return ignored


# The folder, in a fresh environment, of links to the running one's packages.
SHARED = "shared-site-packages"

_built = {}


def environment(**variables):
    """`os.environ` for a subprocess that must not see this checkout.

    No `PYTHONPATH` (it points at the checkout), no `PIP_*` settings and no
    pip configuration files (this machine's name other indexes), pip
    offline (`PIP_NO_INDEX=1`); `variables` are added last.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "PYTHONPATH" and not name.startswith("PIP_")
    }
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.update(variables)
    return env


def run(command, **kwargs):
    """`subprocess.run`, text output captured, in `environment()`, from the
    temporary folder (from the checkout, `python -c` would import it)."""
    kwargs.setdefault("env", environment())
    kwargs.setdefault("cwd", tempfile.gettempdir())
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        **kwargs,
    )


def build(tmp_path_factory):
    """`(wheel, sdist)` of this checkout, built once per test session."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _built:
        folder = tmp_path_factory.mktemp("build")
        source = folder / "keras-sp"
        shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
        dist = folder / "dist"
        result = run(
            [sys.executable, "-m", "build", "--no-isolation"]
            + ["--outdir", dist, source]
        )
        assert result.returncode == 0, result.stdout + result.stderr
        (wheel,) = dist.glob("*.whl")
        (sdist,) = dist.glob("*.tar.gz")
        _built[key] = (wheel, sdist)
    return _built[key]


def _shared(name):
    """Whether the fresh environment sees the running one's `name`."""
    return not (
        name.startswith(("keras_sp", "__editable__"))
        or name.endswith(".pth")
        or name == "__pycache__"
    )


def fresh_environment(folder):
    """A new virtual environment in `folder`, without keras-sp.

    It sees the running environment's packages (pip included) through a
    `.pth` file naming a folder of links to them, keras-sp and the `.pth`
    files (the editable install's among them) left out.

    Returns:
        `(python, site_packages)` of the new environment.
    """
    result = run([sys.executable, "-m", "venv", "--without-pip", folder])
    assert result.returncode == 0, result.stderr
    python = Path(folder) / "bin" / "python"
    result = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    )
    site_packages = Path(result.stdout.strip())
    shared = Path(folder) / SHARED
    shared.mkdir()
    for directory in site.getsitepackages():
        for entry in sorted(Path(directory).iterdir()):
            link = shared / entry.name
            if _shared(entry.name) and not os.path.lexists(link):
                link.symlink_to(entry)
    (site_packages / f"{SHARED}.pth").write_text(f"{shared}\n")
    return python, site_packages
