"""What a user had is not lost silently: the starting point across
`unregularize` and kind switches, the Fisher across kinds, a
`FisherInformation` with new settings, clones and sharing, paths that
Keras changes on save/load, and a forgotten `new_layers`."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from backend import total

import keras_sp
from keras_sp import penalties
from keras_sp.callbacks import FisherInformation


def build(seed=0):
    """A nested backbone (two Dense layers) and a new head."""
    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh", name="c1"),
            keras.layers.Dense(4, name="c2"),
        ],
        name="backbone",
    )
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(3, name="head")(backbone(inputs))
    return keras.Model(inputs, outputs, name="target")


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, 3, n)


def weights(model):
    return {v.path: v.numpy().astype("float64") for v in model.weights}


def shared_kernels(model):
    return [
        v
        for v in model.trainable_variables
        if v.name == "kernel" and not v.path.startswith("head")
    ]


def perturb(model, seed=3):
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        variable.assign(
            variable.numpy() + 0.3 * rng.normal(size=variable.shape)
        )


def eq4(model, w0, fisher, alpha):
    """alpha/2 sum_j F_j (w_j - w0_j)^2 over the shared kernels (eq. 4);
    F = 1 gives eq. 2."""
    total = 0.0
    for variable in shared_kernels(model):
        w = variable.numpy().astype("float64")
        f = 1.0 if fisher is None else fisher[variable.path]
        total += alpha / 2 * np.sum(f * (w - w0[variable.path]) ** 2)
    return total


def penalty(model):
    """The keras-sp penalty on the shared part, as Keras computes it."""
    return sum(
        total([regularizer(variable)])
        for _, variable, regularizer in penalties.attached_penalties(model)
        if not variable.path.startswith("head")
    )


def random_fisher(model, seed=1):
    rng = np.random.default_rng(seed)
    return {
        v.path: rng.uniform(0.5, 2.0, size=v.shape).astype("float32")
        for v in shared_kernels(model)
    }


def compiled(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


# Starting point and Fisher kept across calls.


def test_unregularize_then_regularize_keeps_the_pretrained_starting_point():
    model = build()
    pretrained = weights(model)
    keras_sp.regularize(model, "l2_sp", alpha=0.4, new_layers=["head"])
    perturb(model)  # fine-tuning moved the weights
    keras_sp.unregularize(model)
    assert penalties.attached_penalties(model) == []
    keras_sp.regularize(model, "l2_sp", alpha=0.4, new_layers=["head"])
    w0 = keras_sp.starting_point(model)
    for variable in shared_kernels(model):
        np.testing.assert_array_equal(
            w0[variable.path], pretrained[variable.path]
        )
    # eq. 2 against the pretrained weights, not the fine-tuned ones (> 0).
    expected = eq4(model, pretrained, None, 0.4)
    assert expected > 0.1
    np.testing.assert_allclose(penalty(model), expected, rtol=1e-5)


def test_starting_point_model_restarts_from_the_current_weights():
    model = build()
    keras_sp.regularize(model, "l2_sp", alpha=0.4, new_layers=["head"])
    perturb(model)
    current = weights(model)
    keras_sp.unregularize(model)
    keras_sp.regularize(
        model, "l2_sp", alpha=0.4, new_layers=["head"], starting_point=model
    )
    for variable in shared_kernels(model):
        np.testing.assert_array_equal(
            keras_sp.starting_point(model)[variable.path],
            current[variable.path],
        )
    assert penalty(model) == 0.0


def test_l2_then_l2_sp_measures_against_the_weights_l2_was_attached_at():
    model = build()
    pretrained = weights(model)
    keras_sp.regularize(model, "l2", alpha=0.1)
    perturb(model)
    keras_sp.regularize(model, "l2_sp", alpha=0.2, new_layers=["head"])
    np.testing.assert_allclose(
        penalty(model), eq4(model, pretrained, None, 0.2), rtol=1e-5
    )


def test_fisher_survives_a_switch_to_l2_sp_and_back():
    model = build()
    pretrained = weights(model)
    fisher = random_fisher(model)
    keras_sp.regularize(
        model, "l2_sp_fisher", alpha=0.5, new_layers=["head"], fisher=fisher
    )
    keras_sp.regularize(model, "l2_sp", alpha=0.5, new_layers=["head"])
    perturb(model)
    keras_sp.regularize(model, "l2_sp_fisher", alpha=0.5, new_layers=["head"])
    # eq. 4 with the first call's F and w0.
    np.testing.assert_allclose(
        penalty(model), eq4(model, pretrained, fisher, 0.5), rtol=1e-5
    )


def test_fisher_clip_and_epsilon_apply_to_the_raw_fisher_kept():
    model = build()
    pretrained = weights(model)
    fisher = random_fisher(model)
    keras_sp.regularize(
        model,
        "l2_sp_fisher",
        alpha=0.5,
        new_layers=["head"],
        fisher=fisher,
        fisher_clip=1.0,
    )
    perturb(model)
    keras_sp.regularize(
        model,
        "l2_sp_fisher",
        alpha=0.5,
        new_layers=["head"],
        fisher_epsilon=0.25,
    )
    raw_plus_epsilon = {path: f + 0.25 for path, f in fisher.items()}
    np.testing.assert_allclose(
        penalty(model), eq4(model, pretrained, raw_plus_epsilon, 0.5), rtol=1e-5
    )


# FisherInformation with other settings than those carried.


def fit_with(model, callback):
    x, y = data()
    compiled(model).fit(
        x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback]
    )


def test_fisher_information_with_a_new_alpha_attaches_it_and_warns():
    model = build()
    pretrained = weights(model)
    fisher = random_fisher(model)
    fit_with(
        model, FisherInformation(fisher=fisher, alpha=0.1, new_layers=["head"])
    )
    with pytest.warns(UserWarning, match=r"alpha: 0\.1 attached, 10\.0 asked"):
        fit_with(
            model,
            FisherInformation(fisher=fisher, alpha=10.0, new_layers=["head"]),
        )
    assert penalties.attached_settings(model)["alpha"] == 10.0
    # F and w0 are the first ones; the value is eq. 4 with alpha = 10.
    np.testing.assert_allclose(
        penalty(model), eq4(model, pretrained, fisher, 10.0), rtol=1e-5
    )


def test_fisher_information_with_a_new_kind_or_fisher_attaches_it():
    model = build()
    fisher = random_fisher(model)
    fit_with(
        model, FisherInformation(fisher=fisher, alpha=0.1, new_layers=["head"])
    )
    with pytest.warns(UserWarning, match="kind: 'l2_sp_fisher' attached"):
        fit_with(
            model,
            FisherInformation(
                fisher=fisher,
                kind="group_lasso_sp_fisher",
                alpha=0.1,
                new_layers=["head"],
            ),
        )
    assert {
        type(r).__name__ for _, _, r in penalties.attached_penalties(model)
    } == {"GroupLassoSP"}
    other = random_fisher(model, seed=7)
    with pytest.warns(UserWarning, match="fisher: another array given"):
        fit_with(
            model,
            FisherInformation(
                fisher=other,
                kind="group_lasso_sp_fisher",
                alpha=0.1,
                new_layers=["head"],
            ),
        )
    for _, variable, regularizer in penalties.attached_penalties(model):
        np.testing.assert_array_equal(regularizer.fisher, other[variable.path])


def test_fisher_information_with_the_same_settings_changes_nothing():
    model = build()
    fisher = random_fisher(model)
    fit_with(
        model, FisherInformation(fisher=fisher, alpha=0.1, new_layers=["head"])
    )
    before = penalties.attached_penalties(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit_with(
            model,
            FisherInformation(fisher=fisher, alpha=0.1, new_layers=["head"]),
        )
    after = penalties.attached_penalties(model)
    assert all(a[2] is b[2] for a, b in zip(before, after, strict=True))


def test_fisher_information_on_a_reloaded_model_compares_kind_and_alpha(
    tmp_path,
):
    model = build()
    fisher = random_fisher(model)
    fit_with(
        model, FisherInformation(fisher=fisher, alpha=0.1, new_layers=["head"])
    )
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    settings = penalties.attached_settings(loaded)
    assert (settings["kind"], settings["alpha"]) == ("l2_sp_fisher", 0.1)
    with pytest.warns(UserWarning, match=r"alpha: 0\.1 attached, 2\.0 asked"):
        fit_with(
            loaded,
            FisherInformation(
                np.zeros((4, 5), "float32"), alpha=2.0, new_layers=["head"]
            ),
        )
    for _, variable, regularizer in penalties.attached_penalties(loaded):
        if regularizer.fisher_weighted:
            assert regularizer.alpha == 2.0
            # F is the saved one, not recomputed on the zero inputs.
            np.testing.assert_array_equal(
                regularizer.fisher, penalties.PathDict(fisher)[variable.path]
            )


# Clones and sharing.


def test_a_clone_says_how_to_attach_its_starting_point_again():
    model = build()
    keras_sp.regularize(
        model, "l2_sp", alpha=0.3, beta=0.1, new_layers=["head"]
    )
    perturb(model)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    with pytest.raises(
        ValueError, match=r"clone_model.*starting_point\(original\)"
    ):
        _ = clone.losses
    keras_sp.regularize(
        clone,
        "l2_sp",
        alpha=0.3,
        beta=0.1,
        new_layers=["head"],
        starting_point=keras_sp.starting_point(model),
    )
    np.testing.assert_allclose(
        total(clone.losses), total(model.losses), rtol=1e-6
    )


PLAIN_KERAS_LOAD = """
import sys
import keras
import numpy as np
try:
    model = keras.saving.load_model(sys.argv[1])
except Exception as error:
    print("ERROR", type(error).__name__, str(error))
    sys.exit(0)
assert "keras_sp" not in sys.modules
np.save(sys.argv[2], model.predict(np.load(sys.argv[3]), verbose=0))
print("LOADED")
"""


def load_without_keras_sp(path, tmp_path):
    x, _ = data(4)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "load.py"
    script.write_text(PLAIN_KERAS_LOAD)
    environment = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(path),
            str(tmp_path / "y.npy"),
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, x


def test_an_unregularized_model_loads_with_plain_keras(tmp_path):
    model = build()
    keras_sp.regularize(model, "l2_sp", alpha=0.3, new_layers=["head"])
    perturb(model)
    keras_sp.unregularize(model)
    model.save(tmp_path / "shared.keras")
    output, x = load_without_keras_sp(tmp_path / "shared.keras", tmp_path)
    assert "LOADED" in output, output
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), model.predict(x, verbose=0), rtol=1e-6
    )
    # The starting point is still the pretrained one for this process.
    assert (
        penalty(
            keras_sp.regularize(model, "l2_sp", alpha=0.3, new_layers=["head"])
        )
        > 0
    )


def test_a_regularized_model_needs_keras_sp_to_load(tmp_path):
    model = build()
    keras_sp.regularize(model, "l2_sp", alpha=0.3, new_layers=["head"])
    model.save(tmp_path / "regularized.keras")
    output, _ = load_without_keras_sp(tmp_path / "regularized.keras", tmp_path)
    assert output.startswith("ERROR") and "keras_sp" in output, output


# Paths Keras changes on save/load.


def test_starting_point_lookup_survives_the_path_change_of_save_and_load(
    tmp_path,
):
    model = build()
    keras_sp.regularize(model, "l2_sp", alpha=0.3, new_layers=["head"])
    before = keras_sp.starting_point(model)
    assert "backbone/c1/kernel" in before
    model.save(tmp_path / "m.keras")
    after = keras_sp.starting_point(
        keras.saving.load_model(tmp_path / "m.keras")
    )
    # Keras dropped the nested model's scope from the paths ...
    assert "backbone/c1/kernel" not in dict(after) and "c1/kernel" in dict(
        after
    )
    # ... and the lookups of user code written before still find w0.
    for path in ("backbone/c1/kernel", "backbone/c2/kernel"):
        assert path in after
        np.testing.assert_array_equal(after[path], before[path])
        np.testing.assert_array_equal(after.get(path), before[path])


def test_an_ambiguous_path_lookup_names_the_candidates():
    lookup = penalties.PathDict({"a/k": 1, "b/k": 2})
    assert lookup["a/k"] == 1 and lookup.get("c/k") is None
    with pytest.raises(KeyError, match=r"\['a/k', 'b/k'\]"):
        lookup["k"]


# new_layers omitted.


@pytest.mark.parametrize("kind", ["l2_sp", "l1_sp", "group_lasso_sp"])
def test_omitting_new_layers_warns_for_the_sp_kinds(kind):
    model = build()
    with pytest.warns(UserWarning, match="without `new_layers`"):
        keras_sp.regularize(model, kind, alpha=0.1)
    # Every kernel, the head's included, is pulled toward its current value.
    paths = {v.path for _, v, _ in penalties.attached_penalties(model)}
    assert "head/kernel" in paths


def test_new_layers_given_or_kind_l2_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        keras_sp.regularize(build(), "l2", alpha=0.1)
        keras_sp.regularize(build(), "l2_sp", alpha=0.1, new_layers=())
        keras_sp.regularize(build(), "l2_sp", alpha=0.1, new_layers=["head"])


def test_fisher_information_without_new_layers_warns():
    model = build()
    fisher = {v.path: np.ones(v.shape) for v in model.trainable_variables}
    with pytest.warns(UserWarning, match="without `new_layers`"):
        fit_with(model, FisherInformation(fisher=fisher, alpha=0.1))
