import json

import keras
import numpy as np

from keras_sp import fisher
from keras_sp.experiments import cli


def write_inputs(tmp_path, with_labels=True):
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="relu", name="hidden"),
            keras.layers.Dense(4, activation="softmax", name="head"),
        ]
    )
    model.save(tmp_path / "source.keras")
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(9, 5)).astype("float32")}
    if with_labels:
        arrays["y"] = rng.integers(0, 4, 9)
    np.savez(tmp_path / "source.npz", **arrays)
    return model, arrays


def run_cli(monkeypatch, *argv):
    monkeypatch.setattr(
        cli, "EXPERIMENT_MODULES", ("keras_sp.experiments.fisher_command",)
    )
    return cli.main(["fisher", *argv])


def test_fisher_command_writes_the_fisher_of_the_model(
    tmp_path, monkeypatch, capsys
):
    assert "keras_sp.experiments.fisher_command" in cli.EXPERIMENT_MODULES
    model, arrays = write_inputs(tmp_path)
    out = tmp_path / "out"
    argv = [
        "--model",
        str(tmp_path / "source.keras"),
        "--data",
        str(tmp_path / "source.npz"),
        "--mode",
        "empirical",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert run_cli(monkeypatch, *argv) == 0
    assert "fisher.npz" in capsys.readouterr().out
    written = fisher.load(out / "fisher.npz", model=model)
    expected = fisher.diagonal_fisher(
        model, (arrays["x"], arrays["y"]), mode="empirical", batch_size=4
    )
    assert list(written) == list(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(written[key], value, rtol=1e-6)
    summary = json.loads((out / "fisher.json").read_text())
    assert summary["mode"] == "empirical"
    assert summary["examples"] == 9
    assert summary["parameters"] == model.count_params()

    # An existing result is not replaced without --overwrite.
    before = (out / "fisher.npz").read_bytes()
    assert run_cli(monkeypatch, *argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "fisher.npz").read_bytes() == before


def test_fisher_command_bad_input(tmp_path, monkeypatch, capsys):
    write_inputs(tmp_path, with_labels=False)
    common = ["--model", str(tmp_path / "source.keras"), "--out", str(tmp_path)]
    for argv, message in (
        (
            ["--data", str(tmp_path / "source.npz"), "--mode", "empirical"],
            "labels",
        ),
        (["--data", str(tmp_path / "source.keras")], "'x'"),
        (["--data", str(tmp_path / "missing.npz")], "missing.npz"),
        (
            ["--data", str(tmp_path / "source.npz"), "--samples", "0"],
            "samples=0",
        ),
    ):
        assert run_cli(monkeypatch, *common, *argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("keras-sp fisher: error:")
        assert error.count("\n") == 1 and message in error
    assert not (tmp_path / "fisher.npz").exists()
