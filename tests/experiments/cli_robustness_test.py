"""The runners never lose results silently and fail with clear errors.

Files the runners read back (results, Fisher files, the cached source
model) that are damaged give errors naming them and saying what to do;
writes are atomic (an interrupted write leaves the previous file whole and
no temporary file), with the permissions `open()` gives; each subcommand
takes only its own shipped configs.
"""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import types

import keras
import numpy as np
import pytest

from keras_sp.experiments import cli
from keras_sp.experiments import config
from keras_sp.experiments import fashion_source
from keras_sp.experiments import finetune
from keras_sp.experiments import fisher_command as fisher
from keras_sp.experiments import growing_a_brain as grow
from keras_sp.experiments import results
from keras_sp.experiments import transferability
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import load_config
from keras_sp.experiments.finetune import _fisher
from keras_sp.experiments.results import ResultsFile

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
FINETUNE_CONFIGS = [
    "caltech256_30",
    "caltech256_60",
    "fashion_mobilenet",
    "fashion_small_cnn",
    "mit_indoor67",
    "stanford_dogs",
]
TRANSFERABILITY_CONFIGS = [
    "transferability_fashion_mnist",
    "transferability_imagenet",
]


def _no_space(*args, **kwargs):
    return OSError(errno.ENOSPC, "No space left on device")


def _one_line_error(capsys, command):
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert error.startswith(f"keras-sp {command}: error: ")
    return error


def _results_with_one_run(tmp_path):
    path = tmp_path / "results.json"
    ResultsFile(path, settings={"lr": 0.01}).append({"key": "a", "acc": 0.5})
    return path


# 1. A results file that is not the expected structure.


@pytest.mark.parametrize(
    "content, received",
    [
        ([], "a JSON list"),
        ("runs", "a JSON str"),
        ({"settings": {}, "runs": {}}, "'runs'={}"),
        ({"settings": {}, "runs": [{"key": "a"}, 3]}, "runs[1]=3"),
        ({"settings": [], "runs": []}, "'settings'=[]"),
    ],
)
def test_results_file_of_another_structure_names_file_and_structure(
    tmp_path, content, received
):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(content))
    with pytest.raises(results.CorruptFileError) as info:
        ResultsFile(path, settings={})
    message = str(info.value)
    assert repr(str(path)) in message
    assert "must hold a JSON object {'settings'" in message
    assert message.endswith(
        "Move it away (or use another output folder) to start over."
    )
    assert f"Received: {received}" in message
    assert isinstance(info.value, ValueError)


def test_results_file_holding_a_list_is_a_one_line_command_error(
    tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("[]")
    assert cli.main(["grow", "--out", str(out), "--quiet"]) == 2
    error = _one_line_error(capsys, "grow")
    assert str(out / "results.json") in error
    assert "Received: a JSON list" in error
    assert (out / "results.json").read_text() == "[]"


# 2. A truncated file read back: named, with what to do, chained.


def test_truncated_results_file_names_it_and_says_what_to_do(tmp_path):
    path = _results_with_one_run(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(results.CorruptFileError) as info:
        ResultsFile(path, settings={"lr": 0.01})
    message = str(info.value)
    assert message.startswith(f"Cannot use {str(path)!r}: it is not valid")
    assert "Move it away" in message
    assert isinstance(info.value.__cause__, json.JSONDecodeError)
    assert info.value.path == str(path)


@pytest.mark.parametrize("keep", [0, 10, 0.5])
def test_truncated_fisher_file_of_finetune_names_it(tmp_path, keep):
    """The Fisher file `finetune` caches in its output folder."""
    path = tmp_path / "fisher_source_all.npz"
    fisher.save_fisher({"dense/kernel": np.ones((2, 3))}, path)
    data = path.read_bytes()
    size = int(keep * len(data)) if isinstance(keep, float) else keep
    path.write_bytes(data[:size])
    settings = _fisher.FisherSettings(
        fisher_mode="exact",
        fisher_samples=1,
        fisher_data="source",
        fisher_examples=10,
        fisher_scale="raw",
        seed=0,
    )
    cache = _fisher.FisherCache(settings, str(tmp_path), None, None)
    with pytest.raises(results.CorruptFileError) as info:
        cache.fisher("x", None, np.arange(3))
    message = str(info.value)
    assert message.startswith(f"Cannot use {str(path)!r}: ")
    assert message.endswith(
        "Delete it to compute the Fisher information again."
    )
    assert info.value.__cause__ is not None
    assert path.read_bytes() == data[:size]


def test_truncated_transferability_weights_name_the_file(tmp_path):
    tiny = transferability.TransferabilityConfig(
        image_size=8,
        conv_filters=[2, 2, 2, 2, 2],
        pool_after=[1],
        fc_units=[3, 3],
    )
    stored = ResultsFile(tmp_path / "results.json", {})
    stored.append({"key": "baseA/repeat0"})
    path = tmp_path / "models" / "baseA_repeat0.npz"
    path.parent.mkdir()
    np.savez(path, kernel=np.ones(3))
    path.write_bytes(path.read_bytes()[:40])
    data = types.SimpleNamespace(halves={"A": [0, 1]})
    with pytest.raises(results.CorruptFileError) as info:
        transferability._base_network(
            tiny, data, str(tmp_path), "A", 0, stored, print
        )
    message = str(info.value)
    assert message.startswith(f"Cannot use {str(path)!r}: ")
    assert "baseA/repeat0" in message
    assert info.value.__cause__ is not None


def _tiny_fashion_mnist(data_dir=None):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    return (images, labels), (images, labels)


@pytest.fixture
def source_cache(tmp_path, monkeypatch):
    """The cache of a tiny source model: `(call, model path, info path)`."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(fashion_source, "cache_directory", lambda: str(cache))
    monkeypatch.setattr(
        fashion_source, "load_fashion_mnist", _tiny_fashion_mnist
    )

    def call():
        return fashion_source.pretrained_source_model(
            epochs=1, width=2, fc_units=4, batch_size=8, verbose=0
        )

    _, accuracy = call()
    (model,) = cache.glob("*.keras")
    (info,) = cache.glob("*.json")
    assert sorted(os.listdir(cache)) == sorted([model.name, info.name])
    assert json.loads(info.read_text())["source_test_accuracy"] == accuracy
    return call, model, info


def test_truncated_source_model_cache_names_the_file(source_cache):
    call, model, info = source_cache
    text = info.read_text()
    info.write_text(text[: len(text) // 2])
    with pytest.raises(results.CorruptFileError) as info_error:
        call()
    assert str(info_error.value).startswith(f"Cannot use {str(info)!r}: ")
    assert f"Delete {str(model)!r} and {str(info)!r}" in str(info_error.value)
    assert isinstance(info_error.value.__cause__, json.JSONDecodeError)
    info.write_text(text)
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    with pytest.raises(results.CorruptFileError) as model_error:
        call()
    assert str(model_error.value).startswith(f"Cannot use {str(model)!r}: ")
    assert model_error.value.__cause__ is not None


# 3. Other settings on disk: each differing key with both values.


def test_settings_mismatch_names_each_differing_key(tmp_path):
    path = tmp_path / "results.json"
    stored = {
        "lr": 0.01,
        "seeds": [0],
        "grid": {"l2": [1.0], "l2_sp": [2.0]},
        "same": "x",
        "old": 1,
    }
    ResultsFile(path, settings=stored).append({"key": "a"})
    before = path.read_bytes()
    received = dict(stored, lr=0.1, seeds=[0, 1], new=True)
    received["grid"] = {"l2": [1.0], "l2_sp": [3.0]}
    del received["old"]
    with pytest.raises(ValueError) as info:
        ResultsFile(path, settings=received)
    message = str(info.value)
    assert "\n" not in message
    parts = message.split("other settings: ")[1].split(". Use another")[0]
    assert parts.split("; ") == [
        "'grid.l2_sp': [2.0] on disk, [3.0] now",
        "'lr': 0.01 on disk, 0.1 now",
        "'new': <missing> on disk, True now",
        "'old': 1 on disk, <missing> now",
        "'seeds': [0] on disk, [0, 1] now",
    ]
    assert path.read_bytes() == before


def test_settings_mismatch_on_the_command_line_names_the_key(tmp_path, capsys):
    out = tmp_path / "out"
    settings = {
        key: value
        for key, value in dataclasses.asdict(grow.GrowConfig()).items()
        if key not in grow._SELECTION_KEYS
    }
    settings["learning_rate"] = 0.5
    ResultsFile(out / "results.json", settings).append({"key": "a"})
    assert cli.main(["grow", "--out", str(out), "--quiet"]) == 2
    error = _one_line_error(capsys, "grow")
    default = grow.GrowConfig().learning_rate
    assert f"'learning_rate': 0.5 on disk, {default!r} now" in error


# 4. Each subcommand lists and takes only its own configs.


def test_finetune_lists_only_finetune_configs(capsys):
    assert config.shipped_configs("finetune") == FINETUNE_CONFIGS
    assert config.shipped_configs("transferability") == TRANSFERABILITY_CONFIGS
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in FINETUNE_CONFIGS)
    assert "transferability_" not in help_text
    with pytest.raises(SystemExit):
        cli.main(["transferability", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in TRANSFERABILITY_CONFIGS)
    assert not any(name in help_text for name in FINETUNE_CONFIGS)


@pytest.mark.parametrize("name", FINETUNE_CONFIGS)
def test_finetune_takes_its_shipped_configs(name):
    path = finetune.config_path(name)
    assert path == os.path.join(ROOT, "keras_sp", "configs", name + ".json")
    with open(path) as handle:
        assert json.load(handle)["command"] == "finetune"
    loaded = load_config(path, finetune.FinetuneConfig)
    assert not hasattr(loaded, "command")


def test_finetune_rejects_the_transferability_config(tmp_path, capsys):
    out = tmp_path / "out"
    name = "transferability_fashion_mnist"
    argv = ["finetune", "--config", name, "--out", str(out)]
    assert cli.main(argv) == 2
    error = _one_line_error(capsys, "finetune")
    assert (
        f"Config {name!r} is a config of `keras-sp transferability`, not of "
        f"`keras-sp finetune` (whose configs are {FINETUNE_CONFIGS})"
    ) in error
    assert f"keras-sp transferability --config {name}" in error
    assert "Unknown config key" not in error
    assert not out.exists()
    # The shipped file given by its path: the same refusal, from its key.
    path = transferability.default_config_path()
    argv = ["finetune", "--config", path, "--out", str(out)]
    assert cli.main(argv) == 2
    error = _one_line_error(capsys, "finetune")
    assert (
        f"Config file {path!r} is a config of `keras-sp transferability`"
        in error
    )
    assert "Received: command='transferability'" in error
    # A name that is nothing lists only finetune's configs.
    with pytest.raises(ConfigError) as info:
        finetune.config_path("nothing")
    assert str(FINETUNE_CONFIGS) in str(info.value)
    assert "transferability_" not in str(info.value)


@pytest.mark.parametrize("command", ["transferability", "grow", "demo"])
def test_other_subcommands_reject_a_finetune_config(command, tmp_path, capsys):
    argv = [command, "--config", "caltech256_30", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    error = _one_line_error(capsys, command)
    assert "'caltech256_30' is a config of `keras-sp finetune`" in error
    assert not os.listdir(tmp_path)


def test_transferability_takes_its_shipped_configs_by_name():
    path = config.config_path(
        "transferability_fashion_mnist", "transferability"
    )
    assert path == transferability.default_config_path()
    assert (
        load_config(path, transferability.TransferabilityConfig)
        == transferability.TransferabilityConfig()
    )
    with pytest.raises(ConfigError, match="`keras-sp finetune`, not of"):
        load_config(
            {"command": "finetune"}, transferability.TransferabilityConfig
        )


# 5. Permissions: those of a file made by open().


@pytest.fixture(params=[0o022, 0o027, 0o002], ids=oct)
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path):
    return os.stat(path).st_mode & 0o777


def _write_fisher_inputs(tmp_path):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, activation="softmax")]
    )
    model.save(tmp_path / "model.keras")
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x)
    return [
        "fisher",
        "--model",
        str(tmp_path / "model.keras"),
        "--data",
        str(tmp_path / "data.npz"),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]


def test_results_and_fisher_files_get_the_mode_open_gives(tmp_path, umask):
    expected = 0o666 & ~umask
    with open(tmp_path / "plain.txt", "w"):
        pass
    assert _mode(tmp_path / "plain.txt") == expected
    path = _results_with_one_run(tmp_path)
    assert _mode(path) == expected
    assert cli.main(_write_fisher_inputs(tmp_path)) == 0
    assert _mode(tmp_path / "out" / "fisher.npz") == expected
    assert _mode(tmp_path / "out" / "fisher.json") == expected
    fisher.save_fisher({"a": np.ones(2)}, tmp_path / "fisher_target_1.npz")
    assert _mode(tmp_path / "fisher_target_1.npz") == expected


# 6. Interrupted writes leave the previous file whole and name the file.


def _partial(write_part):
    """A writer that writes part of its output, then fails (disk full)."""

    def fail(*args, **kwargs):
        write_part(*args, **kwargs)
        raise _no_space()

    return fail


def _assert_interrupted(error, path, before):
    message = str(error.value)
    assert message.startswith(f"Cannot write {str(path)!r} (")
    assert "No space left on device" in message
    assert isinstance(error.value.__cause__, OSError)
    assert path.read_bytes() == before


def test_interrupted_results_write_keeps_the_previous_file(
    tmp_path, monkeypatch
):
    path = _results_with_one_run(tmp_path)
    before = path.read_bytes()
    stored = ResultsFile(path, settings={"lr": 0.01})

    def half(value, stream, **kwargs):
        text = json.dumps(value, **kwargs)
        stream.write(text[: len(text) // 2])
        stream.flush()

    with monkeypatch.context() as patch:
        patch.setattr(json, "dump", _partial(half))
        with pytest.raises(OSError) as error:
            stored.append({"key": "b"})
    _assert_interrupted(error, path, before)
    assert os.listdir(tmp_path) == ["results.json"]
    assert not stored.done("b")
    assert [run["key"] for run in ResultsFile(path).runs] == ["a"]


def test_interrupted_fisher_command_keeps_the_previous_file(
    tmp_path, monkeypatch, capsys
):
    argv = _write_fisher_inputs(tmp_path)
    assert cli.main(argv) == 0
    path = tmp_path / "out" / "fisher.npz"
    before = path.read_bytes()
    write_array = np.lib.format.write_array

    def half(stream, array, **kwargs):
        write_array(stream, array[: len(array) // 2], **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(np.lib.format, "write_array", _partial(half))
        assert cli.main([*argv, "--overwrite"]) == 2
    error = _one_line_error(capsys, "fisher")
    assert f"Cannot write {str(path)!r} (" in error
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["fisher.json", "fisher.npz"]
    assert list(fisher.load_fisher(path)) == ["dense/kernel", "dense/bias"]


@pytest.mark.parametrize("writer", ["text", "savez", "keras", "fisher"])
def test_interrupted_atomic_writes_leave_no_trace(
    writer, tmp_path, monkeypatch
):
    """Each kind of file the runners write, failing halfway."""
    extension = {"text": ".md", "savez": ".npz", "keras": ".keras"}
    path = tmp_path / f"file{extension.get(writer, '.npz')}"
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    write = {
        "text": lambda p: results.write_text(p, "table\n" * 100),
        "savez": lambda p: np.savez(p, w=np.arange(100.0)),
        "keras": lambda p: model.save(p),
        "fisher": lambda p: fisher.save_fisher({"w": np.arange(100.0)}, p),
    }[writer]
    if writer in ("savez", "keras"):
        with results.atomic_write(path) as temporary:
            write(temporary)
    else:
        write(path)
    before = path.read_bytes()

    def half(file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(before[: len(before) // 2])

    with pytest.raises(OSError) as error:
        with results.atomic_write(path) as temporary:
            _partial(half)(temporary)
    _assert_interrupted(error, path, before)
    assert os.listdir(tmp_path) == [path.name]


def test_interrupted_source_model_cache_keeps_the_previous_files(
    source_cache, monkeypatch
):
    call, model, info = source_cache
    before = model.read_bytes()
    info.unlink()

    def half(self, file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(before[: len(before) // 2])

    with monkeypatch.context() as patch:
        patch.setattr(keras.Model, "save", _partial(half))
        with pytest.raises(OSError) as error:
            call()
    _assert_interrupted(error, model, before)
    assert os.listdir(model.parent) == [model.name]
    # The metadata's rename fails: the model is saved, no metadata appears.
    replace = os.replace

    def failing_replace(source, target):
        if target.endswith(".json"):
            raise OSError(errno.EIO, "Input/output error")
        replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match=f"Cannot write {str(info)!r}"):
        call()
    assert os.listdir(model.parent) == [model.name]


_WRITER = """
import importlib.util, json, os, signal, sys, time
# Ctrl-C raises KeyboardInterrupt even when the parent (a background job)
# ignores SIGINT, which a child would otherwise inherit.
signal.signal(signal.SIGINT, signal.default_int_handler)
spec = importlib.util.spec_from_file_location("results", sys.argv[1])
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)
file = results.ResultsFile(sys.argv[2])

def stalled(value, stream, **kwargs):
    text = json.dumps(value, **kwargs)
    stream.write(text[: len(text) // 2])
    stream.flush()
    os.fsync(stream.fileno())
    print("writing", flush=True)
    time.sleep(120)
    sys.exit(3)

json.dump = stalled
file.append({"key": "b"})
"""


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGKILL])
def test_killed_writer_keeps_the_previous_results(tmp_path, signal_number):
    """A process killed while it writes `results.json` (half written)."""
    path = _results_with_one_run(tmp_path)
    before = path.read_bytes()
    source = os.path.join(ROOT, "keras_sp", "experiments", "results.py")
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, source, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "writing\n", process.stderr.read()
        process.send_signal(signal_number)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.communicate()
    assert path.read_bytes() == before
    assert process.returncode == -signal_number
    leftovers = sorted(set(os.listdir(tmp_path)) - {"results.json"})
    keys = ["a"]
    if signal_number == signal.SIGINT:
        assert leftovers == []
    else:
        # Nothing can clean up after SIGKILL: the half-written temporary
        # file stays, hidden, until the next write removes it.
        assert len(leftovers) == 1
        assert leftovers[0].startswith(f".results.json.tmp-{process.pid}-")
        ResultsFile(path).append({"key": "c"})
        assert os.listdir(tmp_path) == ["results.json"]
        keys.append("c")
    assert [run["key"] for run in ResultsFile(path).runs] == keys
