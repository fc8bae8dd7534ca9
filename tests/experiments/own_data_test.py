"""`keras-sp finetune` on the user's own target data: a folder, an .npz file,
a tfds data set; the selection protocol of the paper's section 4.2 and Table
2's rows computed from `results.json`; each bad input named."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_sp.experiments import cli
from keras_sp.experiments import fashion_source
from keras_sp.experiments import finetune
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import load_config
from keras_sp.experiments.finetune import _config
from keras_sp.experiments.finetune import _finetune_on
from keras_sp.experiments.finetune import _own_data
from keras_sp.experiments.finetune import _runs
from keras_sp.experiments.finetune import _targets

CLASSES = ("cat", "dog", "owl")


def write_png(path, value, size=(12, 12)):
    image = np.full((*size, 3), value, dtype="uint8")
    tf.io.write_file(path, tf.io.encode_png(image))


def write_folder(root, counts, sizes=None):
    """`root/<class>/<i>.png`, `counts[class]` images of class-dependent
    brightness (and varied sizes: the pipeline resizes)."""
    for label, (name, count) in enumerate(counts.items()):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            size = (10 + i % 3, 12) if sizes is None else sizes
            write_png(
                os.path.join(root, name, f"{i}.png"), 40 + 80 * label + i, size
            )
    return str(root)


@pytest.fixture
def backbone(tmp_path):
    """A tiny RGB source model saved as a .keras file."""
    model = fashion_source.build_small_cnn(
        3,
        input_shape=(8, 8, 3),
        width=2,
        fc_units=None,
        head_name="source_head",
    )
    path = str(tmp_path / "source.keras")
    model.save(path)
    return path


def settings(backbone, **values):
    base = {
        "backbone": backbone,
        "input_size": 8,
        "image_size": 8,
        "preprocessing": "paper",
        "per_class": [3],
        "validation_fraction": 0.34,
        "kinds": ["l2", "l2_sp"],
        "alpha_grid": {"l2": [1e-4], "l2_sp": [0.01, 1.0]},
        "learning_rate_grid": [0.01],
        "iterations": 2,
        "lr_drop_at": 1,
        "batch_size": 3,
        "repeats": 2,
        "freeze_kinds": [],
        "r2_kinds": [],
        "r2_examples": 3,
    }
    base.update(values)
    return base


def check_table(out, slug, title, kinds, repeats, test_images):
    """Table 2's cells are the mean ± std of the test runs recorded."""
    with open(os.path.join(out, "results.json")) as handle:
        runs = json.load(handle)["runs"]
    test = [r for r in runs if r["phase"] == "test"]
    validation = [r for r in runs if r["phase"] == "validation"]
    assert {r["dataset"] for r in runs} == {slug}
    assert len(test) == len(kinds) * repeats
    # L2-SP's alpha grid of 2 points is validated (section 4.2); its test
    # runs use the point of best validation accuracy, then loss.
    grid = [r for r in validation if r["kind"] == "l2_sp"]
    assert sorted(r["alpha"] for r in grid) == [0.01, 1.0]
    best = max(
        grid,
        key=lambda r: (r["validation_accuracy"], -r["validation_loss"]),
    )
    assert {r["alpha"] for r in test if r["kind"] == "l2_sp"} == {best["alpha"]}
    with open(os.path.join(out, "table2.md")) as handle:
        table = handle.read()
    assert f"| method | {title} |" in table
    names = {"l2": "L2", "l2_sp": "L2-SP"}
    means = {}
    for kind in kinds:
        accuracies = np.array(
            [r["accuracy"] for r in test if r["kind"] == kind]
        )
        for run in test:
            correct = _runs.unpack(run["correct"])
            assert len(correct) == test_images
            assert correct.mean() == pytest.approx(run["accuracy"])
        cell = f"{100 * accuracies.mean():.1f} ± {100 * accuracies.std():.1f}"
        assert f"| {names[kind]} | {cell} |" in table
        means[kind] = accuracies.mean()
    return runs, means


def test_cli_on_an_image_folder(tmp_path, backbone):
    root = write_folder(tmp_path / "pets", dict.fromkeys(CLASSES, 6))
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "command": "finetune",
                **settings(
                    backbone, target={"folder": root, "test_fraction": 0.34}
                ),
            }
        )
    )
    out = str(tmp_path / "out")
    # The flag replaces the target: test_fraction back to its default 0.2.
    args = ["finetune", "--config", str(config), "--out", out]
    assert cli.main(args + ["--target-folder", root]) == 0
    # 6 images per class: round(0.2 * 6) = 1 test image each.
    check_table(out, "pets_3", "pets - 3", ["l2", "l2_sp"], 2, 3 * 1)
    # Without the flag, the config's test_fraction: round(0.34 * 6) = 2.
    config = load_config(str(config), finetune.FinetuneConfig)
    data = _own_data.load_own_data(config.target, 3, seed=0)
    test = [int(y) for _, y in data.test.as_numpy_iterator()]
    assert np.bincount(test).tolist() == [2, 2, 2]
    train = [int(y) for _, y in data.train.as_numpy_iterator()]
    assert np.bincount(train).tolist() == [3, 3, 3]


def test_folder_with_train_and_test_subfolders(tmp_path):
    root = tmp_path / "split"
    write_folder(root / "train", {"a": 4, "b": 5})
    write_folder(root / "test", {"a": 2, "b": 3})
    data = _own_data.load_own_data({"folder": str(root)}, None, seed=0)
    assert data.class_names == ("a", "b")
    train = [int(y) for _, y in data.train.as_numpy_iterator()]
    test = [int(y) for _, y in data.test.as_numpy_iterator()]
    assert sorted(train) == [0] * 4 + [1] * 5
    assert test == [0] * 2 + [1] * 3
    # per_class images are drawn from each training class.
    data = _own_data.load_own_data({"folder": str(root)}, 3, seed=1)
    train = [int(y) for _, y in data.train.as_numpy_iterator()]
    assert np.bincount(train).tolist() == [3, 3]


def make_npz(path, rng, train=8, test=4, **replace):
    """3 gray classes of 10x10 training and 14x14 test images (resized)."""
    y_train = np.repeat(np.arange(3), train)
    y_test = np.repeat(np.arange(3), test)
    arrays = {
        "x_train": (
            60 * y_train[:, None, None]
            + rng.integers(0, 30, (len(y_train), 10, 10))
        ).astype("uint8"),
        "y_train": y_train,
        "x_test": (
            60 * y_test[:, None, None]
            + rng.integers(0, 30, (len(y_test), 14, 14))
        ).astype("float32")
        / 255.0,
        "y_test": y_test,
    }
    arrays.update(replace)
    np.savez(path, **arrays)
    return str(path)


def test_run_finetune_on_an_npz(tmp_path, backbone):
    path = make_npz(tmp_path / "digits.npz", np.random.default_rng(0))
    values = settings(backbone, target={"npz": path, "name": "my digits"})
    config = load_config(values, finetune.FinetuneConfig)
    out = str(tmp_path / "out")
    finetune.run_finetune(config, out, verbose=0, run_eagerly=True)
    check_table(out, "my_digits_3", "my_digits - 3", ["l2", "l2_sp"], 2, 12)
    # Float test images in 0..1 are scaled by 255, gray made RGB: the
    # arrays reach the pipeline as 0..255 RGB images.
    data = _own_data.load_own_data({"npz": path}, 3, seed=0)
    x, y = next(iter(data.test.batch(12)))
    with np.load(path) as file:
        expected = file["x_test"] * 255.0
        np.testing.assert_allclose(x.numpy()[..., 1], expected, rtol=1e-6)
        np.testing.assert_array_equal(y.numpy(), file["y_test"])


class KerasSpTinyOwnShapes(tfds.core.GeneratorBasedBuilder):
    """A tiny tfds data set built offline: 3 classes of 12x12 images."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "picture": tfds.features.Image(shape=(12, 12, 3)),
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(5, 0),
            "test": self._generate_examples(2, 1),
        }

    def _generate_examples(self, per_class, seed):
        rng = np.random.default_rng(seed)
        for label in range(3):
            for i in range(per_class):
                image = 70 * label + rng.integers(0, 40, (12, 12, 3))
                yield (
                    f"{label}_{i}",
                    {
                        "picture": image.astype("uint8"),
                        "label": label,
                    },
                )


def test_finetune_on_a_tfds_data_set(tmp_path, backbone):
    data_dir = str(tmp_path / "tfds")
    KerasSpTinyOwnShapes(data_dir=data_dir).download_and_prepare()
    target = {
        "tfds": "keras_sp_tiny_own_shapes",
        "data_dir": data_dir,
        "image_key": "picture",
    }
    # The draw (labels read without decoding) keeps images with their
    # labels: pixels are 70 * label + [0, 40).
    data = _own_data.load_own_data(target, 3, seed=0)
    pairs = [(x, int(y)) for x, y in data.train.as_numpy_iterator()]
    assert np.bincount([y for _, y in pairs]).tolist() == [3, 3, 3]
    assert all(x.shape == (12, 12, 3) for x, _ in pairs)
    assert all(int(x.min()) // 70 == y for x, y in pairs)
    out = str(tmp_path / "out")
    values = settings(backbone)
    values.pop("kinds")
    rows = finetune.finetune_on(
        target, values.pop("backbone"), out=out, **values
    )
    slug = "keras_sp_tiny_own_shapes_3"
    runs, means = check_table(
        out, slug, slug.replace("_3", " - 3"), ["l2", "l2_sp"], 2, 3 * 2
    )
    assert [(row["dataset"], row["kind"]) for row in rows] == [
        (slug, "l2"),
        (slug, "l2_sp"),
    ]
    for row in rows:
        recorded = [
            r["accuracy"]
            for r in runs
            if r["phase"] == "test" and r["kind"] == row["kind"]
        ]
        assert row["accuracies"] == recorded
        assert row["accuracy"] == pytest.approx(means[row["kind"]])
        assert {
            r["alpha"]
            for r in runs
            if r["phase"] == "test" and r["kind"] == row["kind"]
        } == {row["alpha"]}


# Bad input.


def config_error(values, backbone="unread.keras"):
    with pytest.raises(ConfigError) as error:
        load_config(settings(backbone, **values), finetune.FinetuneConfig)
    return str(error.value)


def test_missing_folder_and_file_are_named(tmp_path):
    for key in ("folder", "npz"):
        path = str(tmp_path / f"no_such_{key}")
        message = config_error({"target": {key: path}})
        assert f"target.{key}" in message and repr(path) in message


def test_cli_names_a_missing_target_folder(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(settings("unread.keras")))
    missing = str(tmp_path / "nowhere")
    args = ["finetune", "--config", str(config), "--target-folder", missing]
    assert cli.main(args + ["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"target.folder={missing!r}" in error


def test_bad_target_objects_are_named(tmp_path):
    folder = write_folder(tmp_path / "f", {"a": 3})
    message = config_error({"target": {"folder": folder, "npz": "x"}})
    assert "'target'" in message and "exactly one" in message
    message = config_error(
        {"target": {"folder": folder, "train_split": "train"}}
    )
    assert "target.train_split" in message
    message = config_error({"target": {"folder": folder, "test_fraction": 1.5}})
    assert "target.test_fraction=1.5" in message
    message = config_error({"target": {"folder": folder}, "per_class": [1]})
    assert "per_class[0]" in message and "or null" in message


def test_class_with_too_few_images(tmp_path):
    root = write_folder(tmp_path / "few", {"a": 6, "b": 3, "c": 6})
    # b: round(0.2 * 3) = 1 test image, 2 training images.
    with pytest.raises(ConfigError, match=r"class 'b' .* has 2 training") as e:
        _own_data.load_own_data({"folder": root}, 3, seed=0)
    assert "per_class=3" in str(e.value)
    path = make_npz(
        tmp_path / "few.npz",
        np.random.default_rng(0),
        y_train=np.repeat([0, 2, 2], 8),
    )
    with pytest.raises(ConfigError, match=r"class '1' .* has 0 training"):
        _own_data.load_own_data({"npz": path}, 3, seed=0)


def test_empty_class_folder(tmp_path):
    root = write_folder(tmp_path / "empty", {"a": 4, "b": 4})
    os.makedirs(os.path.join(root, "c"))
    with pytest.raises(ConfigError, match="target.folder") as error:
        _own_data.load_own_data({"folder": root}, 2, seed=0)
    assert os.path.join(root, "c") in str(error.value)
    assert "no image file" in str(error.value)


def test_unreadable_images_error_or_skip(tmp_path):
    root = write_folder(tmp_path / "bad", {"a": 5, "b": 5})
    broken = os.path.join(root, "b", "broken.png")
    with open(broken, "wb") as handle:
        handle.write(b"not a png")
    with pytest.raises(ConfigError, match="on_corrupt") as error:
        _own_data.load_own_data({"folder": root}, 2, seed=0)
    assert broken in str(error.value) and "target.folder" in str(error.value)
    data = _own_data.load_own_data(
        {"folder": root}, None, seed=0, on_corrupt="skip"
    )
    assert data.skipped == (broken,)
    train = [int(y) for _, y in data.train.as_numpy_iterator()]
    test = [int(y) for _, y in data.test.as_numpy_iterator()]
    assert len(train) + len(test) == 10


@pytest.mark.parametrize(
    "replace, match",
    [
        ({"y_train": np.repeat([0.0, 1.5, 2.0], 8)}, r"y_train\[8\]=.*1\.5"),
        ({"y_test": np.array([0, 1, 2, 3] * 3)}, r"y_test\[3\]=.*3"),
        ({"y_train": np.repeat([0, -1, 2], 8)}, r"y_train\[8\]=.*-1"),
        ({"y_test": np.zeros(5, int)}, "one integer label per image"),
        ({"x_train": np.zeros((24, 4, 4, 2), "uint8")}, r"\(24, 4, 4, 2\)"),
    ],
)
def test_bad_npz_arrays(tmp_path, replace, match):
    path = make_npz(tmp_path / "bad.npz", np.random.default_rng(0), **replace)
    with pytest.raises(ConfigError, match=match) as error:
        _own_data.load_own_data({"npz": path}, 2, seed=0)
    assert "target.npz" in str(error.value)


def test_npz_of_mismatched_image_sizes_or_missing_arrays(tmp_path):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((4, 4)), np.zeros((5, 5))
    path = str(tmp_path / "ragged.npz")
    np.savez(path, x_train=ragged, y_train=[0, 1], x_test=ragged, y_test=[0, 1])
    with pytest.raises(ConfigError, match="mismatched sizes") as error:
        _own_data.load_own_data({"npz": path}, 2, seed=0)
    assert repr(path) in str(error.value)
    path = str(tmp_path / "partial.npz")
    np.savez(path, x_train=np.zeros((2, 4, 4)), y_train=[0, 1])
    with pytest.raises(ConfigError, match="no array 'x_test'"):
        _own_data.load_own_data({"npz": path}, 2, seed=0)


def test_missing_tfds_data_set_is_named(tmp_path):
    target = {"tfds": "keras_sp_tiny_own_shapes", "data_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="target.tfds") as error:
        _own_data.load_own_data(target, 2, seed=0)
    assert "nothing is downloaded" in str(error.value)


def test_a_gray_backbone_is_refused_for_own_data(tmp_path):
    root = write_folder(tmp_path / "rgb", {"a": 4, "b": 4})
    config = load_config(
        settings("unread.keras", target={"folder": root}),
        finetune.FinetuneConfig,
    )
    target = _config.settings_of(_targets.TargetSettings, config)
    images = _config.settings_of(_targets.ImageSettings, config)
    with pytest.raises(ConfigError, match="'backbone'.* 1 channel"):
        _own_data.load_target(target, images, 1, 2)
    # With 3 channels, the ImageTarget of the folder's 2 drawn per class.
    loaded = _own_data.load_target(target, images, 3, 2)
    assert loaded.num_classes == 2
    assert np.bincount(loaded.labels).tolist() == [2, 2]


def test_finetune_on_config_follows_its_kinds(tmp_path):
    root = write_folder(tmp_path / "flowers", {"a": 4, "b": 4})
    with open(finetune.config_path("fashion_mobilenet")) as handle:
        shipped = json.load(handle)
    config = _finetune_on.own_config(
        root, "MobileNet", ["l2_sp"], "fashion_mobilenet", per_class=[3]
    )
    assert config.target == {"folder": root}
    assert (config.backbone, config.weights) == (
        "MobileNet",
        shipped["weights"],
    )
    assert config.kinds == ["l2_sp"] and config.per_class == [3]
    assert config.alpha_grid == {"l2_sp": shipped["alpha_grid"]["l2_sp"]}
    assert set(config.beta_grid) <= {"l2_sp"}
    assert config.learning_rate_kind == "l2_sp"
    # The shipped config validates on its first data set, 30: gone with it.
    assert shipped["select_on"] == 30 and config.select_on is None
    assert config.freeze_kinds == [
        k for k in shipped["freeze_kinds"] if k == "l2_sp"
    ]
    # An .npz path, and a paper target's name, are recognized.
    npz = make_npz(tmp_path / "d.npz", np.random.default_rng(0))
    config = _finetune_on.own_config(npz, "unread.keras", ["l2"], None)
    assert config.target == {"npz": npz} and config.alpha_grid == {"l2": [1e-4]}
    with pytest.raises(ConfigError, match=r"target\.folder"):
        _finetune_on.own_config(str(tmp_path / "none"), "ResNet50", ["l2"])
