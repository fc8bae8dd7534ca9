"""The runners guard every training run with `StopOnNonFinite`: a run
that diverges raises and writes no NaN result."""

import os

import keras
import numpy as np
import pytest
from demo_test import tiny_fashion

import keras_sp
from keras_sp.experiments import demo
from keras_sp.experiments import fashion_source
from keras_sp.experiments import training
from keras_sp.experiments.config import load_config


def regularized_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="shared"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    # The starting point is not the initialization, so that the penalty is
    # not zero from the first step.
    keras_sp.regularize(
        model,
        "l2_sp",
        alpha=0.3,
        beta=0.05,
        new_layers=["head"],
        starting_point={
            "shared/kernel": np.full((3, 4), 0.1, "float32"),
        },
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse"
    )
    # Built now, so that the brute-force copy at the start holds its state.
    model.optimizer.build(model.trainable_variables)
    return model


def l2_sp_penalty(weights, alpha=0.3, beta=0.05):
    """Eq. 3 in float64: alpha/2 ||w_S - w0||^2 + beta/2 ||w_new||^2 over
    the kernels (`model.get_weights()` order: kernel, bias, kernel, bias)."""
    shared, head = weights[0].astype("float64"), weights[2].astype("float64")
    return alpha / 2 * np.sum((shared - 0.1) ** 2) + beta / 2 * np.sum(head**2)


def data(count=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 3)).astype("float32")
    y = rng.normal(size=(count, 2)).astype("float32")
    return x, y


def test_fine_tune_guards_by_default(tmp_path):
    """The runners' `fine_tune` adds the guard: a learning rate far too
    large raises instead of returning NaN weights."""
    model = regularized_model()
    before = model.get_weights()
    x, y = data()
    dataset = training.training_dataset(x, np.argmax(y, -1), 4, seed=0)
    with pytest.raises(FloatingPointError, match="at epoch 0, batch "):
        training.fine_tune(model, dataset, iterations=30, learning_rate=1e6)
    for weight, first in zip(model.get_weights(), before, strict=True):
        assert np.all(np.isfinite(weight))
        assert weight.shape == first.shape


def test_demo_runner_raises_and_writes_no_nan(monkeypatch, tmp_path):
    """`keras-sp demo` with a learning rate that diverges: the error names
    the step, and no NaN result is written."""
    source = fashion_source.build_small_cnn(
        5, width=4, fc_units=None, head_name="source_head"
    )
    monkeypatch.setattr(demo, "load_fashion_mnist", tiny_fashion)
    monkeypatch.setattr(
        fashion_source,
        "pretrained_source_model",
        lambda **kwargs: (source, 0.5),
    )
    config = load_config(
        {
            "seeds": [0],
            "per_class": 6,
            "validation_per_class": 2,
            "alpha_grid": {"l2": [1e-4], "l2_sp": [0.01]},
            "iterations": 6,
            "batch_size": 8,
            "learning_rate": 1e12,
        },
        demo.DemoConfig,
    )
    out = str(tmp_path / "demo")
    with pytest.raises(FloatingPointError, match=r"at epoch 0, batch \d"):
        demo.run_demo(config, out, verbose=0)
    # The first run diverged: no run finished, so no results were written.
    assert not os.path.exists(os.path.join(out, "results.json"))
