"""TensorFlow `MirroredStrategy` over two logical CPUs: the -SP penalty is
counted once, not once per replica, so a fit equals the same fit on one
device; with BatchNormalization, `synchronized=True` equals one device and
per-replica statistics do not.

Keras (>= 3.8) scales every loss, the regularizers' included, by
1 / replicas before the gradients of the replicas are summed. The
penalties are those of eqs. 1-7 of Li, Grandvalet & Davoine (ICML 2018).
"""

import numpy as np
import pytest
from device_runs import relative_difference
from device_runs import run_for_numbers

from keras_sp import penalties

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    return run_for_numbers(
        "run_mirrored.py",
        tmp_path_factory.mktemp("mirrored"),
        {"KERAS_BACKEND": "tensorflow"},
    )


def differences(results, prefix):
    keys = [k for k in results if k.startswith(f"{prefix}/one/")]
    return {
        k: relative_difference(results[k.replace("/one/", "/two/")], results[k])
        for k in keys
    }


@pytest.mark.parametrize("kind", penalties.KINDS)
def test_mirrored_fit_equals_one_device(mirrored, kind):
    assert int(mirrored["replicas"]) == 2
    compared = differences(mirrored, kind)
    # both epochs' losses, six weights, the final penalty
    assert len(compared) == 8
    for key, difference in compared.items():
        assert difference <= TOLERANCE, (key, difference)
    first, last = mirrored[f"{kind}/one/loss"]
    assert abs(first - last) > 1e-3
    assert float(mirrored[f"{kind}/one/penalty"]) > 1e-3


@pytest.mark.parametrize("kind", penalties.KINDS[1:])
def test_mirrored_w0_and_fisher_are_mirrored_variables(mirrored, kind):
    prefix = f"{kind}/type/"
    types = {
        k[len(prefix) :]: str(v)
        for k, v in mirrored.items()
        if k.startswith(prefix)
    }
    names = ["_starting_point"] + (
        ["_fisher"] if kind.endswith("fisher") else []
    )
    assert sorted(types) == sorted(
        f"net/{layer}/kernel{name}" for layer in ("c1", "c2") for name in names
    )
    assert set(types.values()) == {"MirroredVariable"}


def test_synchronized_batch_normalization_equals_one_device(mirrored):
    compared = differences(mirrored, "bn_synchronized")
    # losses, c1 kernel, BN gamma/beta/mean/variance, c2 and head, penalty
    assert len(compared) == 11
    for key, difference in compared.items():
        assert difference <= TOLERANCE, (key, difference)


def test_per_replica_batch_normalization_differs_from_one_device(mirrored):
    """Statistics over 4 examples per replica instead of the global batch
    of 8: a different function, hence a different fit."""
    compared = differences(mirrored, "bn_replica")
    # the weights move apart by more than 10 % of their scale ...
    assert max(compared.values()) > 0.1
    # ... and the epochs' mean losses by more than 1 %
    assert compared["bn_replica/one/loss"] > 0.01
    # the one-device runs of both settings are the same model
    np.testing.assert_allclose(
        mirrored["bn_replica/one/loss"],
        mirrored["bn_synchronized/one/loss"],
        rtol=1e-6,
    )


def test_diagonal_fisher_of_a_mirrored_model_equals_one_device(mirrored):
    one = mirrored["fisher/one"]
    assert one.shape == (6, 8) and np.max(one) > 0
    assert relative_difference(mirrored["fisher/two"], one) <= TOLERANCE


def test_diagonal_fisher_inside_the_strategy_scope_fails(mirrored):
    """Inside `strategy.scope()` (cross-replica context) the TensorFlow
    Fisher path cannot read a mirrored variable; the guide says to call it
    outside the scope."""
    assert str(mirrored["fisher/inside_scope_error"]).startswith(
        "DistributedVariable.handle is not available outside the replica "
        "context"
    )
