"""JAX `keras.distribution` over two host devices: the -SP penalties give
the same fit as on one device; w0 and F are replicated under
`DataParallel` and sharded like their weight under `ModelParallel` with
`keras_sp.distribution.add_penalty_layouts`.

The penalties are those of eqs. 1-7 of Li, Grandvalet & Davoine (ICML
2018); the reference is the same fit (same seed, data and batches) run on
one device in the same process.
"""

import numpy as np
import pytest
from device_runs import relative_difference
from device_runs import run_for_numbers

from keras_sp import penalties

JAX_TWO_DEVICES = {
    "KERAS_BACKEND": "jax",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    return run_for_numbers(
        "run_jax_data_parallel.py",
        tmp_path_factory.mktemp("data_parallel"),
        JAX_TWO_DEVICES,
    )


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory):
    return run_for_numbers(
        "run_jax_model_parallel.py",
        tmp_path_factory.mktemp("model_parallel"),
        JAX_TWO_DEVICES,
    )


def pairs(results, prefix, one="/one/", two="/two/"):
    keys = [k for k in results if k.startswith(prefix) and one in k]
    assert keys, prefix
    return [(k, results[k], results[k.replace(one, two)]) for k in keys]


@pytest.mark.parametrize("kind", penalties.KINDS)
def test_data_parallel_fit_equals_one_device(data_parallel, kind):
    compared = pairs(data_parallel, f"{kind}/")
    # the losses of both epochs and the six weights
    assert len(compared) == 7
    for key, one, two in compared:
        assert relative_difference(two, one) <= TOLERANCE, key
    # the fit moved the weights, so the comparison measures training
    first, last = data_parallel[f"{kind}/one/loss"]
    assert abs(first - last) > 1e-3


@pytest.mark.parametrize("kind", penalties.KINDS)
def test_data_parallel_replicates_weights_w0_and_fisher(data_parallel, kind):
    prefix = f"{kind}/sharding/"
    shardings = {
        k[len(prefix) :]: v
        for k, v in data_parallel.items()
        if k.startswith(prefix)
    }
    expected = {"kernel_starting_point"} if kind != "l2" else set()
    if kind.endswith("fisher"):
        expected.add("kernel_fisher")
    for layer in ("c1", "c2"):
        for name in expected:
            assert f"net/{layer}/{name}" in shardings
    # the new head carries plain L2, which holds no variable
    assert not any(k.startswith("net/head/kernel_") for k in shardings)
    for key, (devices, replicated) in shardings.items():
        assert (devices, replicated) == (2, 1), key


@pytest.mark.parametrize("mode", ["exact", "sampled", "empirical"])
def test_diagonal_fisher_under_data_parallel_equals_one_device(
    data_parallel, mode
):
    one = data_parallel[f"fisher/{mode}/one"]
    two = data_parallel[f"fisher/{mode}/two"]
    assert one.shape == (6, 8) and np.all(one >= 0) and np.max(one) > 0
    assert relative_difference(two, one) <= TOLERANCE


def test_save_and_load_under_data_parallel_restores_w0_and_fisher(
    data_parallel,
):
    original = sorted(
        k for k in data_parallel if k.startswith("saved/original/")
    )
    # w0 and F of c1 and c2 (with their shardings), the loss, six weights
    assert len(original) == 2 * 4 + 1 + 6
    for key in original:
        loaded = data_parallel[key.replace("/original/", "/loaded/")]
        if key.endswith("_sharding"):
            assert tuple(loaded) == (2, 1), key
        else:
            # continued one epoch identically
            np.testing.assert_array_equal(loaded, data_parallel[key], key)


def test_model_parallel_fit_equals_one_device(model_parallel):
    for kind in ("l2_sp_fisher", "group_lasso_sp_fisher", "l1_sp"):
        compared = pairs(model_parallel, f"{kind}/")
        assert len(compared) == 7
        for key, one, two in compared:
            assert relative_difference(two, one) <= TOLERANCE, key


def placement(results, prefix):
    return {
        k[len(prefix) :]: str(v)
        for k, v in results.items()
        if k.startswith(prefix)
    }


@pytest.mark.parametrize(
    "kind", ["l2_sp_fisher", "group_lasso_sp_fisher", "l1_sp"]
)
def test_add_penalty_layouts_shards_w0_and_fisher_like_their_weight(
    model_parallel, kind
):
    names = ["_starting_point"] + (["_fisher"] if "fisher" in kind else [])
    layer_specs = {"0": "P(None, 'model')", "1": "P('model', None)"}
    before = placement(model_parallel, f"{kind}/before/")
    for stage in ("after", "fitted"):
        placed = placement(model_parallel, f"{kind}/{stage}/")
        for index, spec in layer_specs.items():
            layer = "c1" if index == "0" else "c2"
            assert before[f"{index}/weight"] == spec
            assert placed[f"{index}/weight"] == spec
            for name in names:
                # regularize creates them replicated, under a plain path
                assert before[f"{index}/{name}"] == "P(None, None)"
                assert before[f"{index}/{name}_path"] == name[1:]
                assert placed[f"{index}/{name}"] == spec
                assert placed[f"{index}/{name}_equal"] == "1"
                assert placed[f"{index}/{name}_path"] == (
                    f"net/{layer}/kernel/{name[1:]}"
                )
        # the head has no layout in the map and plain L2: nothing placed
        assert placed["2/weight"] == "P(None, None)"
        assert not any(k.startswith("2/_") for k in placed)
    expected = sorted(
        f"net/{layer}/kernel/{name[1:]}"
        for layer in ("c1", "c2")
        for name in names
    )
    assert list(model_parallel[f"{kind}/placed"]) == expected


def test_model_parallel_save_and_load_then_add_penalty_layouts(model_parallel):
    loaded = placement(model_parallel, "saved/loaded/")
    placed = placement(model_parallel, "saved/placed/")
    for index, layer in (("0", "c1"), ("1", "c2")):
        for name in ("_starting_point", "_fisher"):
            # loading re-creates w0 and F replicated ...
            assert loaded[f"{index}/{name}"] == "P(None, None)"
            # ... and the helper shards them again (a loaded Sequential's
            # paths lose the model's name)
            assert placed[f"{index}/{name}"] == placed[f"{index}/weight"]
            assert placed[f"{index}/{name}_equal"] == "1"
            assert (
                placed[f"{index}/{name}_path"] == f"{layer}/kernel/{name[1:]}"
            )
    for key in [k for k in model_parallel if k.startswith("saved/original/")]:
        np.testing.assert_array_equal(
            model_parallel[key.replace("/original/", "/loaded/")],
            model_parallel[key],
            key,
        )
