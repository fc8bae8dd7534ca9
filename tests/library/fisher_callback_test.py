"""The FisherInformation callback; runs on every Keras backend."""

import keras
import numpy as np
import pytest

import keras_sp
from keras_sp import fisher
from keras_sp import penalties
from keras_sp.callbacks import FisherInformation


def build_target():
    """A pretrained backbone (Dense + BatchNormalization) and a head."""
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="features")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs, name="target")


def arrays(count, seed, num_classes=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 6)).astype("float32")
    return x, rng.integers(0, num_classes, count)


def compiled(model, momentum=0.0):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def attached(model):
    """{path: (w0, F)} of the Fisher penalties on the model."""
    return {
        variable.path: (regularizer.starting_point, regularizer.fisher)
        for _, variable, regularizer in penalties.attached_penalties(model)
        if getattr(regularizer, "fisher_weighted", False)
    }


def eq4(model, w0, F, alpha, beta, new_kernels):
    """alpha/2 sum_j F_j (w_j - w0_j)^2 on the shared kernels plus
    beta/2 ||w||^2 on the new kernels, in NumPy."""
    total = 0.0
    for variable in model.trainable_variables:
        w = variable.numpy().astype("float64")
        if variable.path in new_kernels:
            total += beta / 2 * np.sum(w**2)
        elif variable.name == "kernel":
            difference = w - w0[variable.path]
            total += alpha / 2 * np.sum(F[variable.path] * difference**2)
    return total


def test_fit_with_l2_sp_fisher_from_a_source_model():
    backbone = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="features"),
            keras.layers.BatchNormalization(name="bn"),
        ],
        name="backbone",
    )
    source = keras.Sequential(
        [backbone, keras.layers.Dense(4, name="source_head")]
    )
    model = keras.Sequential([backbone, keras.layers.Dense(3, name="head")])
    x_source, _ = arrays(12, 0, 4)
    x, y = arrays(16, 1)
    F = fisher.diagonal_fisher(source, x_source)
    w0 = {v.path: v.numpy().astype("float64") for v in model.weights}
    callback = FisherInformation(
        x_source, source_model=source, alpha=0.5, beta=0.1, new_layers=["head"]
    )
    compiled(model).fit(
        x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback]
    )

    for path, value in F.items():
        np.testing.assert_array_equal(callback.fisher[path], value)
    head_kernel = model.get_layer("head").kernel.path
    shared_kernel = backbone.get_layer("features").kernel.path
    assert sorted(attached(model)) == [shared_kernel]
    assert keras_sp.weight_drift(model)["relative"] > 1e-3
    expected = eq4(model, w0, F, 0.5, 0.1, {head_kernel})
    penalty = float(keras.ops.convert_to_numpy(sum(model.losses)))
    np.testing.assert_allclose(penalty, expected, rtol=1e-5)
    # The penalty is part of the loss fit minimizes.
    logits = model.predict(x, verbose=0).astype("float64")
    log_p = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    crossentropy = -np.mean(log_p[np.arange(len(y)), y])
    loss = model.evaluate(x, y, batch_size=len(x), verbose=0)
    np.testing.assert_allclose(loss, crossentropy + expected, rtol=1e-5)


def test_precomputed_fisher_epsilon_and_clip(tmp_path):
    model = build_target()
    x, y = arrays(8, 2)
    F = fisher.diagonal_fisher(model, x)
    path = tmp_path / "fisher.npz"
    fisher.save(F, path)
    clip = float(np.median(F["features/kernel"]))
    for given in (F, path, str(path)):
        model = build_target()
        callback = FisherInformation(
            fisher=given,
            alpha=0.1,
            new_layers=["head"],
            fisher_epsilon=0.01,
            fisher_clip=clip,
        )
        compiled(model).fit(x, y, epochs=1, verbose=0, callbacks=[callback])
        _, attached_fisher = attached(model)["features/kernel"]
        np.testing.assert_allclose(
            attached_fisher, np.minimum(F["features/kernel"], clip) + 0.01
        )
    model = build_target()
    callback = FisherInformation(
        fisher=F, kind="group_lasso_sp_fisher", alpha=0.1, new_layers=["head"]
    )
    compiled(model).fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    (regularizer,) = [
        r
        for _, v, r in penalties.attached_penalties(model)
        if v.path == "features/kernel"
    ]
    assert isinstance(regularizer, keras_sp.regularizers.GroupLassoSP)
    np.testing.assert_array_equal(regularizer.fisher, F["features/kernel"])


class Crash(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.model.optimizer.iterations.numpy() == 6:
            raise RuntimeError("simulated crash")


def fine_tune(pretrained, x_source, x, y, backup, order, crash=False):
    """A fresh process's view: rebuild, load pretrained weights, fit."""
    model = build_target()
    model.load_weights(pretrained)
    compiled(model, momentum=0.9)
    callbacks = [
        FisherInformation(x_source, alpha=2.0, beta=0.1, new_layers=["head"]),
        keras.callbacks.BackupAndRestore(str(backup)),
    ]
    if order == "backup_first":
        callbacks.reverse()
    if crash:
        callbacks.append(Crash())
    model.fit(
        x,
        y,
        batch_size=4,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    return model


@pytest.mark.parametrize("order", ["fisher_first", "backup_first"])
def test_backup_and_restore_resumes_with_the_pretrained_fisher(tmp_path, order):
    pretrained = tmp_path / "pretrained.weights.h5"
    model = build_target()
    model.save_weights(pretrained)
    x_source, _ = arrays(10, 3)
    x, y = arrays(16, 4)
    F = fisher.diagonal_fisher(model, x_source)
    w0 = {v.path: v.numpy() for v in model.weights}

    reference = fine_tune(pretrained, x_source, x, y, tmp_path / "a", order)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fine_tune(pretrained, x_source, x, y, tmp_path / "b", order, crash=True)
    resumed = fine_tune(pretrained, x_source, x, y, tmp_path / "b", order)

    for reference_weight, weight in zip(
        reference.weights, resumed.weights, strict=True
    ):
        np.testing.assert_allclose(
            weight.numpy(), reference_weight.numpy(), rtol=1e-6, atol=1e-7
        )
    starting_point, attached_fisher = attached(resumed)["features/kernel"]
    np.testing.assert_array_equal(starting_point, w0["features/kernel"])
    np.testing.assert_array_equal(attached_fisher, F["features/kernel"])
    # Weights moved: a Fisher or w0 taken from them would differ.
    assert not np.allclose(
        resumed.get_layer("features").kernel.numpy(), w0["features/kernel"]
    )


def test_computed_once_and_not_over_a_carried_penalty(tmp_path, monkeypatch):
    calls = []
    compute = fisher.diagonal_fisher

    def counting(*args, **kwargs):
        calls.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(fisher, "diagonal_fisher", counting)
    model = compiled(build_target())
    x, y = arrays(8, 5)
    w0 = {v.path: v.numpy() for v in model.weights}
    callback = FisherInformation(x, alpha=0.1, new_layers=["head"])
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    first = attached(model)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert len(calls) == 1
    second = attached(model)
    np.testing.assert_array_equal(
        second["features/kernel"][0], w0["features/kernel"]
    )
    np.testing.assert_array_equal(
        second["features/kernel"][1], first["features/kernel"][1]
    )

    # A model reloaded from a file saved while fine-tuning keeps its penalty.
    path = tmp_path / "fine_tuned.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    callback = FisherInformation(x, alpha=0.1, new_layers=["head"])
    reloaded.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    assert len(calls) == 1 and callback.fisher is None
    kept = attached(reloaded)
    np.testing.assert_array_equal(
        kept["features/kernel"][0], w0["features/kernel"]
    )
    np.testing.assert_array_equal(
        kept["features/kernel"][1], first["features/kernel"][1]
    )


def test_bad_inputs(tmp_path):
    x, y = arrays(4, 6)
    for kwargs, message in (
        (dict(alpha=0.1), "exactly one of.*source_data=None, fisher=None"),
        (dict(source_data=x, fisher={}, alpha=0.1), "exactly one of"),
        (dict(source_data=x, kind="l2_sp", alpha=0.1), "kind='l2_sp'"),
        (dict(source_data=x, mode="true", alpha=0.1), "mode='true'"),
        (dict(source_data=x, alpha=-1.0), "alpha=-1.0"),
        (dict(source_data=x, alpha=0.1, beta=float("nan")), "beta=nan"),
        (
            dict(source_data=x, source_model="m.keras", alpha=0.1),
            "source_model",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            FisherInformation(**kwargs)
    with pytest.raises(ValueError, match="source_model='target'"):
        FisherInformation(
            fisher={}, source_model=build_target(), alpha=0.1, new_layers=()
        )
    with pytest.raises(FileNotFoundError):
        FisherInformation(
            fisher=tmp_path / "missing.npz", alpha=0.1, new_layers=()
        )
    model = compiled(build_target())
    wrong = {"other/kernel": np.ones((6, 8), "float32")}
    with pytest.raises(
        ValueError, match="`fisher` has no entry.*features/kernel"
    ):
        model.fit(
            x,
            y,
            verbose=0,
            callbacks=[
                FisherInformation(fisher=wrong, alpha=0.1, new_layers=())
            ],
        )
