import json

import pytest

from keras_sp.experiments.results import ResultsFile


def test_runs_survive_a_restart(tmp_path):
    path = tmp_path / "out" / "results.json"
    results = ResultsFile(path, settings={"lr": 0.01})
    results.append({"key": "a", "accuracy": 0.5})
    again = ResultsFile(path, settings={"lr": 0.01})
    assert again.done("a") and not again.done("b")
    assert again.get("a")["accuracy"] == 0.5
    again.append({"key": "b", "accuracy": 0.7})
    stored = json.loads(path.read_text())
    assert [run["key"] for run in stored["runs"]] == ["a", "b"]


def test_refuses_to_mix_settings_or_repeat_a_run(tmp_path):
    path = tmp_path / "results.json"
    results = ResultsFile(path, settings={"lr": 0.01})
    results.append({"key": "a"})
    with pytest.raises(ValueError, match="already recorded"):
        results.append({"key": "a"})
    with pytest.raises(ValueError, match="other settings"):
        ResultsFile(path, settings={"lr": 0.1})
    assert json.loads(path.read_text())["settings"] == {"lr": 0.01}
