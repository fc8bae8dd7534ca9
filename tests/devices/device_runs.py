"""Runs the multi-device scripts of this folder in subprocesses (imported
by the tests of this folder).

XLA_FLAGS (JAX host devices) and TensorFlow's logical devices must be set
before the framework initialises, so each script runs in its own process
with the backend and flags it needs, and writes its numbers to a file the
test reads.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def run_script(script, *args, env=None, timeout=400):
    """Runs `python tests/devices/<script> *args` with `env` added to the
    environment and this tree first on PYTHONPATH; returns the process."""
    environment = dict(os.environ)
    environment.pop("XLA_FLAGS", None)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), environment.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    environment["TF_CPP_MIN_LOG_LEVEL"] = "3"
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, str(HERE / script), *map(str, args)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_for_numbers(script, tmp_path, env):
    """Runs `script` with an output path and returns the `.npz` it wrote."""
    out = tmp_path / "results.npz"
    process = run_script(script, out, env=env)
    assert process.returncode == 0, process.stderr[-6000:]
    with np.load(out) as results:
        return dict(results)


def relative_difference(a, b):
    """max |a - b| / max |b|."""
    a = np.asarray(a, dtype="float64")
    b = np.asarray(b, dtype="float64")
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
