import os

import keras
import numpy as np
import pytest
from backend import total
from backend import value_and_gradients
from penalty_reference import KERNEL_NAMES
from penalty_reference import group_axes
from penalty_reference import shared_gradient
from penalty_reference import shared_penalty

import keras_sp
from keras_sp import penalties
from keras_sp import regularizers

KINDS = penalties.KINDS


def build_model(seed=0, head_name="head"):
    """Conv2D, BatchNormalization, DepthwiseConv2D and Dense, nested."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(6, name="fc")(x)
    backbone = keras.Model(inputs, x, name="backbone")
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            backbone,
            keras.layers.Dense(3, name=head_name),
        ]
    )
    return model


def data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=n)
    return x, y


def fisher_for(model, seed=1):
    rng = np.random.default_rng(seed)
    return {
        v.path: rng.uniform(0.1, 3.0, size=v.shape).astype("float32")
        for v in model.trainable_variables
    }


def perturb(model, scale=0.2, seed=2):
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        variable.assign(
            variable.numpy() + scale * rng.normal(size=variable.shape)
        )


def owner_classes(model):
    classes = {}
    for layer in [model] + model._flatten_layers(include_self=False):
        for variable in layer._trainable_variables:
            classes[variable.path] = type(layer).__name__
    return classes


def expected_penalty(
    model, kind, alpha, beta, w0, fisher, penalize, new="head"
):
    """NumPy eqs. 1-7 over the model, and the analytic gradient per path."""
    classes = owner_classes(model)
    total = 0.0
    gradients = {}
    for variable in model.trainable_variables:
        if penalize == "kernels" and variable.name not in KERNEL_NAMES:
            continue
        w = variable.numpy()
        if variable.path.split("/")[-2] == new:
            total += beta / 2 * np.sum(w.astype("float64") ** 2)
            gradients[variable.path] = beta * w
            continue
        f = fisher[variable.path] if fisher is not None else None
        axes = group_axes(variable.name, classes[variable.path], w.ndim)
        reference = w0[variable.path]
        total += shared_penalty(kind, alpha, w, reference, f, axes)
        gradients[variable.path] = shared_gradient(
            kind, alpha, w, reference, f, axes
        )
    return total, gradients


def loss_and_gradients(model):
    variables = model.trainable_variables
    value, grads = value_and_gradients(lambda: sum(model.losses), variables)
    return value, {v.path: g for v, g in zip(variables, grads, strict=True)}


@pytest.mark.parametrize("penalize", ["kernels", "all"])
@pytest.mark.parametrize("kind", KINDS)
def test_losses_and_gradients_match_the_paper(kind, penalize):
    model = build_model()
    w0 = {v.path: v.numpy().copy() for v in model.weights}
    fisher = fisher_for(model) if "fisher" in kind else None
    keras_sp.regularize(
        model,
        kind,
        alpha=0.2,
        beta=0.05,
        new_layers=["head"],
        fisher=fisher,
        penalize=penalize,
    )
    perturb(model)
    expected, expected_gradients = expected_penalty(
        model, kind, 0.2, 0.05, w0, fisher, penalize
    )
    value, gradients = loss_and_gradients(model)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for variable in model.trainable_variables:
        np.testing.assert_allclose(
            gradients[variable.path],
            expected_gradients.get(variable.path, np.zeros(variable.shape)),
            rtol=1e-4,
            atol=1e-6,
            err_msg=variable.path,
        )


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_zero_and_starting_point_give_zero(kind):
    model = build_model()
    fisher = fisher_for(model) if "fisher" in kind else None
    keras_sp.regularize(
        model, kind, alpha=0.0, new_layers=["head"], fisher=fisher
    )
    perturb(model)
    assert total(model.losses) == 0.0
    if kind != "l2":
        fresh = build_model()
        keras_sp.regularize(
            fresh, kind, alpha=0.3, new_layers=["head"], fisher=fisher
        )
        assert total(fresh.losses) == 0.0


def test_zero_starting_point_makes_l2_sp_equal_l2():
    model = build_model()
    zeros = {v.path: np.zeros(v.shape) for v in model.weights}
    keras_sp.regularize(
        model, "l2_sp", alpha=0.3, starting_point=zeros, new_layers=()
    )
    with_zero_start = total(model.losses)
    keras_sp.regularize(model, "l2", alpha=0.3)
    np.testing.assert_allclose(with_zero_start, total(model.losses), rtol=1e-6)


def test_calling_again_replaces_and_keeps_the_starting_point():
    model = build_model()
    w0 = {v.path: v.numpy().copy() for v in model.weights}
    keras_sp.regularize(
        model, "l2_sp", alpha=0.1, beta=0.01, new_layers=["head"]
    )
    perturb(model)
    keras_sp.regularize(
        model, "l2_sp", alpha=0.4, beta=0.01, new_layers=["head"]
    )
    assert len(model.losses) == 4  # conv, depthwise, fc and head kernels
    expected, _ = expected_penalty(
        model, "l2_sp", 0.4, 0.01, w0, None, "kernels"
    )
    np.testing.assert_allclose(total(model.losses), expected, 1e-5)
    for path, array in keras_sp.starting_point(model).items():
        np.testing.assert_array_equal(array, w0[path])


def test_unregularize_removes_only_our_penalties():
    model = build_model()
    keras_sp.regularize(
        model, "l1_sp", alpha=0.1, beta=0.1, new_layers=["head"]
    )
    fc = model.get_layer("backbone").get_layer("fc")
    fc.bias.regularizer = keras.regularizers.L1(0.5)
    keras_sp.unregularize(model)
    assert len(model.losses) == 1
    assert fc.kernel_regularizer is None
    assert isinstance(fc.bias.regularizer, keras.regularizers.L1)


def test_refuses_to_replace_a_regularizer_it_did_not_attach():
    model = build_model()
    fc = model.get_layer("backbone").get_layer("fc")
    fc.kernel.regularizer = keras.regularizers.L2(0.5)
    with pytest.raises(ValueError, match="fc/kernel.*did not attach"):
        keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=())


def test_starting_point_from_a_model_and_a_mapping():
    pretrained = build_model(seed=0)
    model = build_model(seed=5)
    keras_sp.regularize(
        model,
        "l2_sp",
        alpha=0.1,
        new_layers=["head"],
        starting_point=pretrained,
    )
    for variable in pretrained.weights:
        if variable.name == "kernel" and "head" not in variable.path:
            np.testing.assert_array_equal(
                keras_sp.starting_point(model)[variable.path],
                variable.numpy(),
            )
    mapping = {v.path: np.zeros(v.shape) for v in model.weights}
    keras_sp.regularize(
        model, "l2_sp", alpha=0.1, starting_point=mapping, new_layers=()
    )
    assert all(np.all(a == 0) for a in keras_sp.starting_point(model).values())


def test_fisher_of_a_source_model_nested_in_the_target():
    # The source model is the backbone with its own head, built standalone;
    # in the target the backbone sits inside a Sequential.
    target = build_model()
    backbone = target.get_layer("backbone")
    source = keras.Model(
        backbone.input,
        keras.layers.Dense(5, name="source_head")(backbone.output),
    )
    fisher = {
        "outer_scope/" + v.path: np.full(v.shape, 2.0)
        for v in source.trainable_variables
    }
    keras_sp.regularize(
        target, "l2_sp_fisher", alpha=1.0, new_layers=["head"], fisher=fisher
    )
    perturb(target)
    w0 = keras_sp.starting_point(target)
    expected = sum(
        np.sum((v.numpy() - w0[v.path]) ** 2)
        for v in target.trainable_variables
        if v.path in w0
    )
    np.testing.assert_allclose(total(target.losses), expected, rtol=1e-5)


def test_fisher_epsilon_and_clip():
    model = build_model()
    fisher = fisher_for(model)
    keras_sp.regularize(
        model,
        "l2_sp_fisher",
        alpha=1.0,
        new_layers=["head"],
        fisher=fisher,
        fisher_clip=1.0,
        fisher_epsilon=0.25,
    )
    for _, variable, regularizer in penalties.attached_penalties(model):
        np.testing.assert_allclose(
            regularizer.fisher,
            np.minimum(fisher[variable.path], 1.0) + 0.25,
            rtol=1e-6,
        )


# Bad input: each gets a clear error naming the argument and the value.


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kind": "l3_sp"}, "kind.*Received: kind='l3_sp'"),
        ({"alpha": -1.0}, "alpha.*Received: alpha=-1.0"),
        ({"alpha": float("nan")}, "alpha.*Received: alpha=nan"),
        ({"beta": float("inf")}, "beta.*Received: beta=inf"),
        ({"beta": "0.01"}, "beta.*Received: beta='0.01'"),
        ({"penalize": "biases"}, "penalize.*Received: penalize='biases'"),
        ({"new_layers": ["nope"]}, "new_layers\\[0\\].*'nope'"),
        ({"new_layers": [3]}, "new_layers\\[0\\].*Received"),
        ({"fisher_clip": 0.0}, "fisher_clip"),
        ({"fisher_epsilon": -1e-3}, "fisher_epsilon"),
    ],
)
def test_bad_arguments(kwargs, message):
    model = build_model()
    arguments = {"kind": "l2_sp", "alpha": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        keras_sp.regularize(model, **arguments)
    assert not penalties.attached_penalties(model)


def test_new_layer_from_another_model():
    model = build_model()
    other = keras.layers.Dense(2, name="other")
    with pytest.raises(ValueError, match="'other' is not in model"):
        keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=[other])


def test_unbuilt_model():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=())


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a[:1], "must have shape"),
        (lambda a: a * np.nan, "must be finite"),
        (None, "no entry for variable"),
    ],
)
def test_bad_starting_point(change, message):
    model = build_model()
    mapping = {v.path: v.numpy() for v in model.weights}
    conv_path = model.get_layer("backbone").get_layer("conv").kernel.path
    if change is None:
        del mapping[conv_path]
    else:
        mapping[conv_path] = change(mapping[conv_path])
    with pytest.raises(ValueError, match=message):
        keras_sp.regularize(
            model, "l2_sp", alpha=0.1, starting_point=mapping, new_layers=()
        )
    with pytest.raises(ValueError, match="starting_point"):
        keras_sp.regularize(
            model, "l2_sp", alpha=0.1, starting_point=[1, 2], new_layers=()
        )


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a[..., :1], "must have shape"),
        (lambda a: -a, "non-negative"),
        (lambda a: a * np.nan, "must be finite"),
        (None, "no entry for variable"),
    ],
)
def test_bad_fisher(change, message):
    model = build_model()
    fisher = fisher_for(model)
    conv_path = model.get_layer("backbone").get_layer("conv").kernel.path
    if change is None:
        del fisher[conv_path]
    else:
        fisher[conv_path] = change(fisher[conv_path])
    with pytest.raises(ValueError, match=message):
        keras_sp.regularize(
            model,
            "group_lasso_sp_fisher",
            alpha=0.1,
            fisher=fisher,
            new_layers=(),
        )
    assert not penalties.attached_penalties(model)


def test_fisher_required_for_fisher_kinds_and_refused_otherwise():
    model = build_model()
    with pytest.raises(ValueError, match="needs `fisher`"):
        keras_sp.regularize(model, "l2_sp_fisher", alpha=0.1, new_layers=())
    with pytest.raises(ValueError, match="Received: kind='l2_sp'"):
        keras_sp.regularize(
            model, "l2_sp", alpha=0.1, fisher=fisher_for(model), new_layers=()
        )


def test_several_variables_with_one_path():
    def branch(name):
        inputs = keras.Input((2,))
        return keras.Model(
            inputs, keras.layers.Dense(2, name="d")(inputs), name=name
        )

    inputs = keras.Input((2,))
    model = keras.Model(inputs, branch("a")(inputs) + branch("b")(inputs))
    assert [v.path for v in model.weights][:2] == ["d/kernel", "d/bias"]
    with pytest.raises(ValueError, match="same path.*d/kernel"):
        keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=())


# Training, saving and resuming.


def compiled(model, learning_rate=0.05):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_fit_reports_the_penalty_in_the_loss(kind):
    model = build_model()
    fisher = fisher_for(model) if "fisher" in kind else None
    keras_sp.regularize(
        model, kind, alpha=0.5, beta=0.1, new_layers=["head"], fisher=fisher
    )
    perturb(model)
    compiled(model, learning_rate=0.0)
    x, y = data()
    logits = model(x, training=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    cross_entropy = total([loss(y, logits)])
    penalty = total(model.losses)
    assert penalty > 0
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    np.testing.assert_allclose(
        history.history["loss"][0], cross_entropy + penalty, rtol=1e-5
    )


def test_regularize_after_compile_takes_effect_at_the_next_step():
    model = compiled(build_model(), learning_rate=0.0)
    x, y = data()
    first = model.fit(x, y, batch_size=len(x), verbose=0).history["loss"][0]
    keras_sp.regularize(model, "l2", alpha=10.0)
    second = model.fit(x, y, batch_size=len(x), verbose=0).history["loss"][0]
    np.testing.assert_allclose(second - first, total(model.losses), rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_keras_file_round_trip_in_safe_mode(kind, tmp_path):
    model = build_model()
    fisher = fisher_for(model) if "fisher" in kind else None
    keras_sp.regularize(
        model, kind, alpha=0.5, beta=0.1, new_layers=["head"], fisher=fisher
    )
    perturb(model)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        total(loaded.losses),
        total(model.losses),
        rtol=1e-6,
    )
    if kind != "l2":
        restored = keras_sp.starting_point(loaded)
        for path_, array in keras_sp.starting_point(model).items():
            np.testing.assert_array_equal(restored[path_], array)
    if fisher is not None:
        for _, variable, regularizer in penalties.attached_penalties(loaded):
            if variable.path in fisher:
                np.testing.assert_array_equal(
                    regularizer.fisher, fisher[variable.path]
                )


def _train(model, epochs, callbacks=(), initial_epoch=0):
    x, y = data(n=16)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=list(callbacks),
    )
    return [v.numpy() for v in model.weights]


def _regularized(seed=0, fisher_seed=1):
    model = build_model(seed=seed)
    keras_sp.regularize(
        model,
        "l2_sp_fisher",
        alpha=0.5,
        beta=0.01,
        new_layers=["head"],
        fisher=fisher_for(build_model(), seed=fisher_seed),
    )
    return compiled(model)


def test_resume_from_a_saved_model_penalises_toward_the_same_w0(tmp_path):
    uninterrupted = _train(_regularized(), epochs=4)

    model = _regularized()
    _train(model, epochs=2)
    path = os.path.join(tmp_path, "checkpoint.keras")
    model.save(path)
    del model
    resumed = keras.saving.load_model(path)
    final = _train(resumed, epochs=4, initial_epoch=2)
    for expected, actual in zip(uninterrupted, final, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


class _Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise RuntimeError("simulated crash")


def test_backup_and_restore_resumes_with_the_same_w0_and_fisher(tmp_path):
    uninterrupted = _train(_regularized(), epochs=4)
    backup = os.path.join(tmp_path, "backup")

    crashed = _regularized()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(
            crashed,
            epochs=4,
            callbacks=[keras.callbacks.BackupAndRestore(backup), _Crash()],
        )

    # The restarted script builds its model again; even if it attaches a
    # different starting point and Fisher, the backup restores the run's own.
    restarted = _regularized(seed=7, fisher_seed=9)
    final = _train(
        restarted,
        epochs=4,
        callbacks=[keras.callbacks.BackupAndRestore(backup)],
    )
    for expected, actual in zip(uninterrupted, final, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_attached_penalties_lists_regularizers_in_weight_order():
    model = build_model()
    keras_sp.regularize(
        model, "l2_sp", alpha=0.1, beta=0.1, new_layers=["head"]
    )
    listed = [v.path for _, v, _ in penalties.attached_penalties(model)]
    in_weights = [v.path for v in model.weights if v.path in listed]
    assert listed == in_weights
    kinds = [type(r) for _, _, r in penalties.attached_penalties(model)]
    assert kinds == [regularizers.L2SP] * 3 + [regularizers.WeightDecay]
