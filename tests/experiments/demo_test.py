import dataclasses
import json
import os

import numpy as np
import pytest

from keras_sp.experiments import cli
from keras_sp.experiments import demo
from keras_sp.experiments import fashion_source
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import load_config


def tiny_fashion(per_class_train=12, per_class_test=4):
    rng = np.random.default_rng(0)

    def split(per_class):
        labels = np.repeat(np.arange(10), per_class).astype("uint8")
        # Class-dependent brightness makes the classes learnable.
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        images = images + 19 * labels[:, None, None]
        return images.astype("uint8"), labels

    return split(per_class_train), split(per_class_test)


@pytest.fixture
def tiny_setting(monkeypatch):
    data = tiny_fashion()
    source = fashion_source.build_small_cnn(
        5, width=4, fc_units=None, head_name="source_head"
    )
    monkeypatch.setattr(demo, "load_fashion_mnist", lambda: data)
    monkeypatch.setattr(
        fashion_source,
        "pretrained_source_model",
        lambda **kwargs: (source, 0.5),
    )
    config = load_config(
        {
            "seeds": [0, 1],
            "per_class": 6,
            "validation_per_class": 2,
            "alpha_grid": {"l2": [1e-4, 1.0], "l2_sp": [0.01]},
            "iterations": 3,
            "batch_size": 8,
        },
        demo.DemoConfig,
    )
    return config, source, data


def test_demo_end_to_end_and_resume(tiny_setting, tmp_path, monkeypatch):
    config, source, data = tiny_setting
    out = str(tmp_path / "demo")
    rows = demo.run_demo(config, out, verbose=0)
    with open(os.path.join(out, "results.json")) as handle:
        runs = json.load(handle)["runs"]
    validation = [r for r in runs if r["phase"] == "validation"]
    test = [r for r in runs if r["phase"] == "test"]
    # 2 seeds: l2 at 2 alphas and l2_sp at 1 on validation; l2, l2_sp,
    # l2_sp at the paper's alpha and frozen on test.
    assert len(validation) == (2 + 1) * 2 and len(test) == 4 * 2

    # alpha: the best mean validation accuracy over the matched seeds, ties
    # going to the lower mean validation cross-entropy.
    for kind in ("l2", "l2_sp"):
        scores = {}
        for alpha in config.alpha_grid[kind]:
            runs = [
                r
                for r in validation
                if r["method"] == kind and r["alpha"] == alpha
            ]
            scores[alpha] = (
                np.mean([r["validation_accuracy"] for r in runs]),
                -np.mean([r["validation_loss"] for r in runs]),
            )
        row = next(r for r in rows if r["method"] == kind)
        assert row["alpha"] == max(scores, key=scores.get)

    # The table holds the mean and std of the recorded runs.
    assert [(r["method"], r["alpha"]) for r in rows] == [
        ("l2", rows[0]["alpha"]),
        ("l2_sp", 0.01),
        ("l2_sp", 0.1),
        ("frozen", 0.0),
    ]
    for row in rows:
        accuracies = [
            r["target_accuracy"]
            for r in test
            if r["method"] == row["method"] and r["alpha"] == row["alpha"]
        ]
        np.testing.assert_allclose(
            row["target_accuracy"], (np.mean(accuracies), np.std(accuracies))
        )
    with open(os.path.join(out, "table.md")) as handle:
        table = handle.read()
    assert "| frozen |" in table and "| l2_sp | 0.01 (validated) |" in table
    assert "| l2_sp | 0.1 (fixed) |" in table

    # A frozen backbone does not move, and keeps the source model's accuracy.
    (_, _), (x_test, y_test) = data
    x_source, y_source = fashion_source.select_classes(
        x_test, y_test, fashion_source.SOURCE_CLASSES
    )
    scores = source.predict(x_source.astype("float32"), verbose=0)
    expected = np.mean(np.argmax(scores, axis=-1) == y_source)
    for run in test:
        if run["method"] == "frozen":
            assert run["drift"] == 0.0
            assert run["source_accuracy"] == pytest.approx(expected)
        else:
            assert run["drift"] > 0.0

    # Running again finds every run done and trains nothing.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(demo, "_fine_tune_once", no_training)
    assert demo.run_demo(config, out, verbose=0) == rows


@pytest.mark.parametrize(
    "values,message",
    [
        ({"seed": [0]}, "Unknown config key 'seed'"),
        ({"alpha_grid": {"l2": [0.1]}}, "alpha_grid"),
        ({"alpha_grid": {"l2": [-1.0], "l2_sp": [0.1]}}, "alpha_grid.l2"),
        ({"validation_per_class": 30}, "validation_per_class"),
        ({"iterations": 0}, "iterations"),
    ],
)
def test_bad_config(values, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(values, demo.DemoConfig)


def test_command_line_bad_input_is_one_line(tmp_path, capsys):
    config = tmp_path / "demo.json"
    config.write_text(json.dumps({"per_clas": 5}))
    code = cli.main(["demo", "--config", str(config), "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1
    assert "Unknown config key 'per_clas'" in error


def test_accuracy_and_loss_match_keras():
    import keras

    from keras_sp.experiments import training

    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = rng.normal(size=(20, 4)).astype("float32")
    y = rng.integers(0, 3, size=20)
    accuracy, loss = training.accuracy_and_loss(model, x, y, batch_size=7)
    logits = model(x).numpy()
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        y, logits
    )
    assert accuracy == np.mean(np.argmax(logits, -1) == y)
    np.testing.assert_allclose(loss, float(expected), rtol=1e-5)


def test_command_line_runs_the_demo_on_tiny_data(
    tiny_setting, tmp_path, capsys
):
    config, _, _ = tiny_setting
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(dataclasses.asdict(config)))
    out = tmp_path / "out"
    assert cli.main(["demo", "--config", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    runs = json.loads((out / "results.json").read_text())["runs"]
    test = [r for r in runs if r["phase"] == "test"]
    assert sorted({r["seed"] for r in test}) == config.seeds
    frozen = [
        100 * r["target_accuracy"] for r in test if r["method"] == "frozen"
    ]
    assert len(frozen) == len(config.seeds)
    row = f"| frozen | – | {np.mean(frozen):.1f} ± {np.std(frozen):.1f} |"
    assert row in (out / "table.md").read_text()
    assert row in printed
