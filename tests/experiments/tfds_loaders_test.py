import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_sp.experiments.data import load_imagenet
from keras_sp.experiments.data import load_places365
from keras_sp.experiments.data import load_stanford_dogs

LOADERS = {
    "stanford_dogs": (load_stanford_dogs, "test", 120),
    "imagenet2012": (load_imagenet, "validation", 1000),
    "places365_small": (load_places365, "validation", 365),
}
SPLIT_MARK = {"train": 1, "test": 2, "validation": 3}


def marked_split(self, split, **kwargs):
    """A fake `_as_dataset`: each split's pixels and labels name the split."""
    mark = SPLIT_MARK[str(split)]
    count = 2 + mark
    return tf.data.Dataset.from_tensor_slices(
        {
            "image": np.full((count, 5, 4, 3), mark, np.uint8),
            "label": np.full((count,), 10 * mark, np.int64),
        }
    )


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_loader_returns_uint8_images_and_int32_labels(name, tmp_path):
    loader, _, num_classes = LOADERS[name]
    with tfds.testing.mock_data(num_examples=3):
        data = loader(data_dir=str(tmp_path))
        assert data.num_classes == num_classes
        for dataset in (data.train, data.test):
            image_spec, label_spec = dataset.element_spec
            assert image_spec.dtype == tf.uint8 and image_spec.shape[-1] == 3
            assert label_spec.dtype == tf.int32 and label_spec.shape == ()
            labels = [int(y) for _, y in dataset.as_numpy_iterator()]
            assert len(labels) == 3
            assert all(0 <= y < num_classes for y in labels)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_loader_reads_train_and_its_test_split(name, tmp_path):
    loader, test_split, _ = LOADERS[name]
    with tfds.testing.mock_data(as_dataset_fn=marked_split):
        data = loader(data_dir=str(tmp_path))
        for dataset, split in ((data.train, "train"), (data.test, test_split)):
            pairs = [
                (int(x.max()), int(y)) for x, y in dataset.as_numpy_iterator()
            ]
            mark = SPLIT_MARK[split]
            assert pairs == [(mark, 10 * mark)] * (2 + mark)


def test_class_names_come_from_tfds():
    with tfds.testing.mock_data(num_examples=1):
        names = load_imagenet(manual_dir="/nowhere").class_names
        places = load_places365().class_names
    assert names[0] == "n01440764" and names[-1] == "n15075141"
    assert places[:2] == ("airfield", "airplane_cabin")
