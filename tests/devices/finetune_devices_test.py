"""`keras-sp finetune` with `devices="all"` over two logical CPUs equals
the same experiment with `devices="one"`.

A tiny experiment (three kinds of Li, Grandvalet & Davoine, ICML 2018:
L2, L2-SP of eq. 2 and L2-SP-Fisher of eq. 4, a freezing run of Figure 3,
R² of Figure 4, the source-task drop of Table 3) runs in a subprocess
(`run_finetune_devices.py`) with each setting. Every number of every run
agrees within 1e-3 relative (R², a fraction that can sit near 0,
within 1e-3 absolute), and the settings stored in `results.json` are
the same. The control, per-replica BatchNormalization statistics under the
same strategy, differs by far more: the comparison can tell them apart.
"""

import json
import math

import pytest
from device_runs import run_script

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune_devices")
    process = run_script(
        "run_finetune_devices.py",
        out,
        env={"KERAS_BACKEND": "tensorflow"},
        timeout=900,
    )
    assert process.returncode == 0, process.stderr[-6000:]
    results = {}
    for name in ("one", "all", "all_replica_batchnorm"):
        with open(out / name / "results.json") as handle:
            stored = json.load(handle)
        with open(out / name / "training.json") as handle:
            stored["training"] = json.load(handle)
        results[name] = stored
    results["odd_batch_error"] = (out / "odd_batch_error.txt").read_text()
    return results


def leaves(value, path=""):
    """`{path: value}` of the numbers and strings in a record."""
    if isinstance(value, dict):
        return {
            k: v
            for key, item in value.items()
            for k, v in leaves(item, f"{path}/{key}").items()
        }
    if isinstance(value, list):
        return {
            k: v
            for index, item in enumerate(value)
            for k, v in leaves(item, f"{path}[{index}]").items()
        }
    return {path: value}


def differences(one, other):
    """`{run key/path: relative difference}` of the floats of the runs
    (`seconds` left out); other values must be equal."""
    runs = {run["key"]: run for run in one["runs"]}
    others = {run["key"]: run for run in other["runs"]}
    assert sorted(runs) == sorted(others)
    found = {}
    for key, run in runs.items():
        values, other_values = leaves(run), leaves(others[key])
        assert sorted(values) == sorted(other_values), key
        for path, value in values.items():
            if path == "/seconds":
                continue
            received = other_values[path]
            if isinstance(value, float) or isinstance(received, float):
                # R² is stored rounded to 4 decimals: one step is allowed.
                # It is a fraction in [0, 1] that can sit near 0, where a
                # relative difference means nothing: compared absolutely.
                r2 = path.startswith("/r2[")
                step = 1e-4 if r2 else 0.0
                scale = abs(value) if value and not r2 else 1.0
                difference = max(abs(received - value) - step, 0.0)
                found[key + path] = difference / scale
            elif path != "/correct/bits":
                assert received == value, (key, path, value, received)
    return found


def test_all_devices_train_on_two_replicas_with_synchronized_batchnorm(
    experiments,
):
    one, all_devices = experiments["one"], experiments["all"]
    # test runs of three kinds and a freezing run (one grid point each:
    # no validation run)
    assert len(one["runs"]) == len(one["training"]) == 4
    assert {run["replicas"] for run in one["training"]} == {1}
    assert len(all_devices["training"]) == 4
    for run in all_devices["training"]:
        assert run["replicas"] == 2
        assert run["variables"] == ["MirroredVariable"]
        # the three blocks' BatchNormalization layers of the source CNN
        assert run["batchnorm_synchronized"] == [True] * 3
    control = experiments["all_replica_batchnorm"]["training"]
    assert all(run["batchnorm_synchronized"] == [False] * 3 for run in control)


def test_all_devices_equal_one_device(experiments):
    one, all_devices = experiments["one"], experiments["all"]
    assert all_devices["settings"] == one["settings"]
    assert "devices" not in one["settings"]
    found = differences(one, all_devices)
    kinds = (
        "accuracy",
        "final_loss",
        "drift",
        "r2",
        "source_as_trained",
        "source_reestimated",
    )
    for name in kinds:
        assert any(f"/{name}" in path for path in found), name
    # 4 runs' losses and drifts, 3 accuracies, 1 frozen distance, the
    # R² of the L2-SP run, the source-task drops of the 3 test runs
    assert len(found) >= 4 + 4 + 3 + 1 + 10
    worst = max(found, key=found.get)
    assert found[worst] <= TOLERANCE, (worst, found[worst])
    # the same test images right and wrong
    others = {run["key"]: run for run in all_devices["runs"]}
    for run in one["runs"]:
        if "correct" in run:
            assert run["correct"] == others[run["key"]]["correct"], run["key"]
    # the runs trained: the backbone moved and the loss is finite
    for run in one["runs"]:
        assert run["drift"] > 1e-3 and math.isfinite(run["final_loss"])


def test_per_replica_batchnorm_differs_from_one_device(experiments):
    """Statistics over 4 images per replica instead of the global batch of
    8: a different function, hence different runs."""
    one = {run["key"]: run for run in experiments["one"]["runs"]}
    control = experiments["all_replica_batchnorm"]["runs"]
    assert sorted(one) == sorted(run["key"] for run in control)
    for run in control:
        drift = one[run["key"]]["drift"]
        assert abs(run["drift"] - drift) / drift > 100 * TOLERANCE, run["key"]


def test_a_batch_that_does_not_split_evenly_is_refused(experiments):
    """Keras averages the replicas' mean losses, the global batch's mean
    only for equal parts."""
    assert experiments["odd_batch_error"] == (
        "Config key 'batch_size' must be a multiple of the number of local "
        "devices (2) with devices='all'. Received: batch_size=7"
    )
