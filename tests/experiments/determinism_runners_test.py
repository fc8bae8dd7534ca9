"""Each `keras-sp` runner (demo, finetune, grow, transferability, fisher)
run twice on tiny data into separate output folders gives the same numbers,
bit for bit; the library's own determinism is tested in
`tests/library/determinism_test.py`."""

import json

import keras
import numpy as np
import pytest
from demo_test import tiny_fashion as demo_fashion
from finetune_test import tiny_fashion as finetune_fashion
from grow_experiment_test import _write_idx
from transferability_test import TINY as TRANSFERABILITY_TINY
from transferability_test import synthetic_images

from keras_sp import fisher
from keras_sp.experiments import cli
from keras_sp.experiments import data as datasets
from keras_sp.experiments import demo
from keras_sp.experiments import fashion_source
from keras_sp.experiments import finetune
from keras_sp.experiments import growing_a_brain as grow
from keras_sp.experiments import transferability
from keras_sp.experiments.config import load_config

# Record fields that measure time, not results.
TIMINGS = ("seconds",)


def without_timings(value):
    """`value` (parsed JSON) with every timing field removed."""
    if isinstance(value, dict):
        return {
            key: without_timings(item)
            for key, item in value.items()
            if key not in TIMINGS
        }
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def numbers(value):
    """Every float in `value` (parsed JSON), in order."""
    if isinstance(value, dict):
        return [n for key in sorted(value) for n in numbers(value[key])]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return [value] if isinstance(value, float) else []


def assert_same_results(first, second):
    """Two results.json files hold the same runs, numbers bit-identical
    (JSON writes floats with `repr`, which round-trips exactly)."""
    one = without_timings(json.loads(first.read_text()))
    two = without_timings(json.loads(second.read_text()))
    assert numbers(one), "no numbers to compare"
    assert one == two


# (3) The runners, each twice into separate folders.


def test_demo_twice(tmp_path, monkeypatch):
    data = demo_fashion()
    monkeypatch.setattr(demo, "load_fashion_mnist", lambda: data)

    def source(**kwargs):
        # A fresh source network each run, as the cache would give.
        keras.utils.set_random_seed(0)
        model = fashion_source.build_small_cnn(
            5, width=4, fc_units=None, head_name="source_head"
        )
        return model, 0.5

    monkeypatch.setattr(fashion_source, "pretrained_source_model", source)
    config = load_config(
        {
            "seeds": [0],
            "per_class": 6,
            "validation_per_class": 2,
            "alpha_grid": {"l2": [1e-4], "l2_sp": [0.01]},
            "iterations": 3,
            "batch_size": 8,
        },
        demo.DemoConfig,
    )
    for name in ("one", "two"):
        demo.run_demo(config, str(tmp_path / name), verbose=0)
    assert_same_results(
        tmp_path / "one" / "results.json", tmp_path / "two" / "results.json"
    )


def test_finetune_twice(tmp_path, monkeypatch):
    data = finetune_fashion()
    monkeypatch.setattr(datasets, "load_fashion_mnist", lambda: data)
    keras.utils.set_random_seed(0)
    fashion_source.build_small_cnn(
        5, width=4, fc_units=None, head_name="source_head"
    ).save(tmp_path / "source.keras")
    values = {
        "backbone": str(tmp_path / "source.keras"),
        "input_size": 28,
        "image_size": 28,
        "preprocessing": "none",
        "target": "fashion_mnist",
        "per_class": [6],
        "target_classes": [5, 6, 7, 8, 9],
        "test_per_class": 4,
        "validation_fraction": 0.34,
        "source": "fashion_mnist",
        "source_classes": [0, 1, 2, 3, 4],
        "source_examples": 20,
        "kinds": ["l2", "l2_sp_fisher"],
        "alpha_grid": {"l2": [1e-4], "l2_sp_fisher": [1.0]},
        "learning_rate_grid": [0.01],
        "iterations": 3,
        "lr_drop_at": 2,
        "batch_size": 8,
        "repeats": 1,
        "fisher_data": "source",
        "fisher_examples": 10,
        "freeze_units": [],
        "freeze_kinds": [],
        "r2_kinds": ["l2"],
        "r2_examples": 10,
    }
    config = load_config(values, finetune.FinetuneConfig)
    for name in ("one", "two"):
        finetune.run_finetune(config, str(tmp_path / name), verbose=0)
    assert_same_results(
        tmp_path / "one" / "results.json", tmp_path / "two" / "results.json"
    )


def test_grow_twice(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion"
    folder.mkdir()
    for split, per_class in (("train", 8), ("t10k", 4)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        images += 19 * labels[:, None, None]
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("KERAS_SP_FASHION_MNIST", str(folder))
    tiny = {
        "methods": ["wa_cnn", "da_cnn"],
        "seeds": [0],
        "per_class": [2],
        "test_per_class": 3,
        "channels": 4,
        "steps": 2,
        "batch_size": 5,
        "source_epochs": 1,
    }
    for name in ("one", "two"):
        # A cache per run: each trains its own source network.
        monkeypatch.setenv("KERAS_SP_CACHE", str(tmp_path / f"cache_{name}"))
        grow.run_grow(tiny, str(tmp_path / name), verbose=0)
    assert_same_results(
        tmp_path / "one" / "results.json", tmp_path / "two" / "results.json"
    )


def test_transferability_twice(tmp_path):
    data = synthetic_images()
    for name in ("one", "two"):
        transferability.run(
            TRANSFERABILITY_TINY, tmp_path / name, data=data, log=lambda _: None
        )
    assert_same_results(
        tmp_path / "one" / "results.json", tmp_path / "two" / "results.json"
    )


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_fisher_command_twice(tmp_path, monkeypatch, mode):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="relu", name="hidden"),
            keras.layers.Dense(4, activation="softmax", name="head"),
        ]
    )
    model.save(tmp_path / "source.keras")
    np.savez(
        tmp_path / "source.npz",
        x=np.random.default_rng(0).normal(size=(9, 5)).astype("float32"),
    )
    monkeypatch.setattr(
        cli, "EXPERIMENT_MODULES", ("keras_sp.experiments.fisher_command",)
    )
    written = []
    for name in ("one", "two"):
        argv = [
            "fisher",
            "--model",
            str(tmp_path / "source.keras"),
            "--data",
            str(tmp_path / "source.npz"),
            "--mode",
            mode,
            "--quiet",
            "--out",
            str(tmp_path / name),
        ]
        assert cli.main(argv) == 0
        written.append(fisher.load(tmp_path / name / "fisher.npz"))
        summary = json.loads((tmp_path / name / "fisher.json").read_text())
        assert summary["examples"] == 9
    first, second = written
    assert list(first) == list(second)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
