"""One fine-tuning run: train a copy of the backbone with a new head, measure.

`Runner` trains a run (`train`), records it in the results file under a
key naming its data set, phase, kind, point and seed (`validation_run`,
`test_run`), and skips a run the file already holds. A test run records
the per-image test correctness (packed bits), the backbone's relative
drift ||w - w0|| / ||w0||, the R² of its activations (Figure 4) and the
source-task accuracy drop (Table 3).
"""

import contextlib
import dataclasses
import functools
import time
from typing import NamedTuple

import keras
import numpy as np

import keras_sp
from keras_sp import _keras_private
from keras_sp import units
from keras_sp.drift import weight_drift
from keras_sp.experiments import training
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.measures import activation_r2
from keras_sp.experiments.measures import cross_entropy
from keras_sp.experiments.measures import source_task_drop
from keras_sp.penalties import FISHER_KINDS
from keras_sp.penalties import KERNEL_NAMES

__all__ = [
    "MeasureSettings",
    "Runner",
    "Trained",
    "TrainingSettings",
    "pack",
    "unpack",
]


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """The config keys of the SGD of a run."""

    iterations: int
    lr_drop_at: int | None
    warmup_iterations: int
    momentum: float
    batchnorm: str
    devices: str
    batch_size: int


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    """The config keys of what a test run measures beyond its accuracy."""

    r2_kinds: list[str]
    source_batchnorm: list[str]
    batch_size: int


class Trained(NamedTuple):
    """A trained run: the model, its backbone, and what training measured."""

    model: keras.Model
    backbone: keras.Model
    measures: dict


def pack(correct):
    """Per-example correctness as `{"n": count, "bits": hex of the bits}`."""
    return {
        "n": int(len(correct)),
        "bits": np.packbits(correct).tobytes().hex(),
    }


def unpack(packed):
    """The boolean array `pack` packed."""
    bits = np.frombuffer(bytes.fromhex(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[: packed["n"]].astype(bool)


def _kernel_paths(backbone):
    return {
        variable.path
        for variable in backbone.weights
        if variable.name in KERNEL_NAMES
    }


def _build_model(start, num_classes, seed):
    """A copy of the pretrained backbone with a new classifier."""
    keras.utils.set_random_seed(seed)
    backbone = keras.models.clone_model(start.backbone)
    backbone.set_weights(start.backbone.get_weights())
    head = keras.layers.Dense(num_classes, name="head")
    model = keras.Sequential([backbone, head], name="target")
    model.build((None,) + tuple(start.backbone.input_shape[1:]))
    return model, backbone, head


@functools.cache
def _mirrored_strategy():
    """A `tf.distribute.MirroredStrategy` over all local devices, one per
    process (a second strategy's collective operations can clash with the
    first's)."""
    import tensorflow as tf  # the TensorFlow backend only (see `_checks`)

    return tf.distribute.MirroredStrategy()


def _first_order_every_iteration(make_dataset):
    """`make_dataset()`, made anew for each iterator: every iterator yields
    the batches a first iterator of `make_dataset()` yields.

    A seeded `shuffle` (and `Dataset.random`) draws a new order for each
    iterator of the same dataset. Under a strategy, Keras's `fit` opens one
    iterator to build the model before the one it trains on, which would
    then train on the second order, not the first a one-device run trains
    on.
    """
    import tensorflow as tf  # the TensorFlow backend only (see `_checks`)

    return tf.data.Dataset.from_tensors(0).flat_map(lambda _: make_dataset())


def _synchronize_batchnorm(model):
    """Every BatchNormalization layer of `model` computes its batch
    statistics over the global batch (all replicas), as on one device."""
    for layer in _keras_private.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def _evaluate(model, batches):
    """Per-example correctness and cross-entropy of `model` (inference
    mode) on `batches`."""
    correct, losses = [], []
    for x, y in batches:
        scores = keras.ops.convert_to_numpy(model(x, training=False))
        labels = np.asarray(y)
        correct.append(np.argmax(scores, axis=-1) == labels)
        losses.append(cross_entropy(scores, labels))
    return np.concatenate(correct), np.concatenate(losses)


def _run_record(data, kind, point, seed, phase, freeze=0):
    return {
        "dataset": data.slug,
        "phase": phase,
        "kind": kind,
        "alpha": point.alpha,
        "beta": point.beta,
        "learning_rate": point.learning_rate,
        "seed": seed,
        "frozen_units": freeze,
    }


def _run_key(data, phase, kind, point, seed):
    alpha, beta, rate = point
    return (
        f"{data.slug}/{phase}/{kind}/alpha={alpha:g}/beta={beta:g}"
        f"/lr={rate:g}/seed={seed}"
    )


class Runner:
    """Trains, measures and records the runs of an experiment.

    With `training.devices == "all"`, each run is built, penalized and
    fitted under a `tf.distribute.MirroredStrategy` over all local devices
    (BatchNormalization synchronized across replicas); the Fisher
    information is computed outside its scope.

    Args:
        pretrained: the `Pretrained` starting point.
        unit_layers: the layers whose outputs are the depth units'
            activations (Figure 4).
        training: a `TrainingSettings`.
        measures: a `MeasureSettings`.
        fisher: a `FisherCache`, for the -SP-Fisher kinds.
        results: the `ResultsFile` the runs go to.
        log: prints a line per finished run.
        run_eagerly: run the train steps eagerly.
    """

    def __init__(
        self,
        pretrained,
        unit_layers,
        training,
        measures,
        fisher,
        results,
        log,
        run_eagerly,
    ):
        self.pretrained = pretrained
        self.unit_layers = unit_layers
        self.training = training
        self.measures = measures
        self.fisher = fisher
        self.results = results
        self.log = log
        self.run_eagerly = run_eagerly
        backbone = pretrained.backbone
        self._reference_activations = keras.Model(
            backbone.input,
            [backbone.get_layer(name).output for name in unit_layers],
        )

    def _scope(self):
        """The scope a run is built and trained in: none on one device, a
        `MirroredStrategy`'s over all local devices with `devices="all"`."""
        if self.training.devices != "all":
            return contextlib.nullcontext()
        strategy = _mirrored_strategy()
        replicas = strategy.num_replicas_in_sync
        batch_size = self.training.batch_size
        if batch_size % replicas:
            # Keras averages each replica's mean loss: equal to the mean
            # over the global batch only for equal parts.
            raise ConfigError(
                "Config key 'batch_size' must be a multiple of the number "
                f"of local devices ({replicas}) with devices='all'. "
                f"Received: batch_size={batch_size}"
            )
        return strategy.scope()

    def _record(self, key, make):
        if self.results.done(key):
            return self.results.get(key)
        started = time.time()
        record = make()
        record["key"] = key
        record["seconds"] = round(time.time() - started, 1)
        self.results.append(record)
        self.log(
            f"{key}: "
            + ", ".join(
                f"{name} {record[name]:.4f}"
                for name in ("validation_accuracy", "accuracy", "drift")
                if name in record
            )
            + f" ({record['seconds']:.0f} s)"
        )
        return record

    def train(self, data, kind, point, seed, train_indices, freeze=0):
        """Fine-tunes a copy of the backbone on the images `train_indices`.

        Returns:
            A `Trained`.
        """
        settings = self.training
        with self._scope():
            model, backbone, head = _build_model(
                self.pretrained, data.target.num_classes, seed
            )
            if settings.devices == "all":
                _synchronize_batchnorm(model)
            frozen = {}
            if freeze:
                units.freeze_first(model, freeze)
                frozen = {
                    variable.path: np.array(variable.numpy())
                    for unit in units.depth_units(model)[:freeze]
                    for layer in unit
                    for variable in layer.weights
                }
            if settings.batchnorm == "frozen":
                units.freeze_batchnorm(model)
        fisher = None
        if kind in FISHER_KINDS:
            # Outside the strategy's scope: `diagonal_fisher` cannot read
            # mirrored variables in a cross-replica context.
            fisher = self.fisher.fisher(data.slug, data.target, train_indices)
        with self._scope():
            keras_sp.regularize(
                model,
                kind,
                alpha=point.alpha,
                beta=point.beta,
                new_layers=[head],
                fisher=fisher,
            )
            kernels = _kernel_paths(backbone)
            starting_point = {
                v.path: np.array(v.numpy())
                for v in backbone.weights
                if v.path in kernels
            }

            def batches():
                return data.target.train_batches(train_indices, seed)

            history = training.fine_tune(
                model,
                _first_order_every_iteration(batches)
                if settings.devices == "all"
                else batches(),
                iterations=settings.iterations,
                learning_rate=point.learning_rate,
                momentum=settings.momentum,
                lr_drop_at=settings.lr_drop_at,
                warmup_iterations=settings.warmup_iterations,
                run_eagerly=self.run_eagerly,
            )
        loss = float(history.history["loss"][-1])
        measures = {
            "final_loss": loss,
            "drift": weight_drift(backbone, starting_point)["relative"],
        }
        if frozen:
            # Frozen units' weights and BatchNormalization statistics.
            measures["frozen_distance"] = weight_drift(model, frozen)[
                "distance"
            ]
        return Trained(model, backbone, measures)

    def validation_run(self, data, kind, point, seed):
        """A run on the training part, validated on the held-out images."""

        def make():
            trained = self.train(data, kind, point, seed, data.train_part)
            target = data.target
            validation, validation_loss = _evaluate(
                trained.model,
                target.eval_batches(data.train_part, "train", data.held_out),
            )
            test, _ = _evaluate(
                trained.model, target.eval_batches(data.train_part, "test")
            )
            record = _run_record(data, kind, point, seed, "validation")
            record.update(trained.measures)
            record["validation_accuracy"] = float(validation.mean())
            record["validation_loss"] = float(validation_loss.mean())
            record["test_accuracy"] = float(test.mean())
            return record

        key = _run_key(data, "validation", kind, point, seed)
        return self._record(key, make)

    def test_run(self, data, kind, point, seed, freeze=0):
        """A run on all training images, tested; `freeze` first units
        frozen (Figure 3)."""

        def make():
            trained = self.train(
                data, kind, point, seed, data.everything, freeze
            )
            correct, _ = _evaluate(
                trained.model, data.target.eval_batches(data.everything, "test")
            )
            phase = "freeze" if freeze else "test"
            record = _run_record(data, kind, point, seed, phase, freeze)
            record.update(trained.measures)
            record["accuracy"] = float(correct.mean())
            if freeze:
                return record
            record["correct"] = pack(correct)
            self._measure(record, data, kind, trained.backbone)
            return record

        phase = f"freeze={freeze}" if freeze else "test"
        key = _run_key(data, phase, kind, point, seed)
        return self._record(key, make)

    def _measure(self, record, data, kind, backbone):
        """Adds Figure 4's R² and Table 3's source-task drop to `record`."""
        settings = self.measures
        if kind in settings.r2_kinds:
            activations = keras.Model(
                backbone.input,
                [backbone.get_layer(n).output for n in self.unit_layers],
            )
            r2 = activation_r2(
                self._reference_activations,
                activations,
                data.r2_inputs,
                batch_size=settings.batch_size,
            )
            record["r2_layers"] = list(self.unit_layers)
            record["r2"] = [
                [None if np.isnan(v) else round(float(v), 4) for v in values]
                for values in r2
            ]
        source = data.source
        if source is not None:
            for batchnorm in settings.source_batchnorm:
                record[f"source_{batchnorm}"] = source_task_drop(
                    backbone,
                    self.pretrained.source_head,
                    source.x,
                    source.y,
                    pretrained_accuracy=source.pretrained_accuracy,
                    batchnorm=batchnorm,
                    batch_size=settings.batch_size,
                )
