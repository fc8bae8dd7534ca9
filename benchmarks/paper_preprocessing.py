"""Throughput of the paper's pre-processing pipeline on JPEG files.

Writes synthetic 500x375 JPEGs (the typical size of Caltech-256 and Stanford
Dogs images), then times the training pipeline (decode, resize to 256,
blur, mean, mirror, 224 crop, batch 64) with tf.data's default thread pool
and with a single thread, in one run. Reports images per second, the ratio,
and the process CPU time over wall time (2.0 = two cores busy).

    python benchmarks/paper_preprocessing.py
"""

import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from keras_sp.experiments.data import image_dataset
from keras_sp.experiments.data import paper_preprocessing

IMAGES, BATCHES, BATCH = 128, 12, 64


def measure(dataset, threads):
    options = tf.data.Options()
    if threads:
        options.threading.private_threadpool_size = threads
    dataset = dataset.with_options(options)
    iterator = iter(dataset)
    next(iterator)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(BATCHES):
        next(iterator)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return BATCHES * BATCH / wall, cpu / wall


def main():
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for index in range(IMAGES):
            image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
            path = os.path.join(directory, f"{index}.jpg")
            tf.io.write_file(path, tf.io.encode_jpeg(image))
            paths.append(path)
        dataset = paper_preprocessing(
            image_dataset(paths, np.zeros(IMAGES)),
            mean=[120.0, 115.0, 100.0],
            training=True,
            batch_size=BATCH,
        )
        parallel, parallel_cores = measure(dataset, threads=None)
        single, single_cores = measure(dataset, threads=1)
    print(
        f"default threads: {parallel:.0f} images/s, {parallel_cores:.2f} "
        f"cores busy; one thread: {single:.0f} images/s, {single_cores:.2f} "
        f"cores busy; ratio {parallel / single:.2f} (on {os.cpu_count()} "
        "cores)"
    )


if __name__ == "__main__":
    main()
