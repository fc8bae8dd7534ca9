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


def test_fine_tune_guards_by_default(tmp_path):
    """The runners' `fine_tune` adds the guard: a learning rate far too
    large raises instead of returning NaN weights."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="head")]
    )
    keras_sp.regularize(model, "l2_sp", alpha=0.3, new_layers=())
    before = model.get_weights()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    dataset = training.training_dataset(x, rng.integers(0, 2, 32), 4, seed=0)
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
