"""The methods a comparison runs: each trains a target model on `(x, y)`.

A method takes the `Task` (the pretrained source model and the training
settings), its hyper-parameters (a dict, one point of its grid), a seed and
the training images, and returns the trained model and its backbone. Every
method starts from the same copy of the pretrained backbone with a new head
initialised by the seed, and sees the same batches in the same order for a
given seed.
"""

import collections
import dataclasses
import hashlib

import keras
import numpy as np

import keras_sp
from keras_sp import feature_space
from keras_sp import transfer_statistics
from keras_sp.experiments import comparison_settings
from keras_sp.experiments import training

__all__ = [
    "METHODS",
    "Task",
]


@dataclasses.dataclass(frozen=True)
class Task:
    """What every run of a comparison shares.

    Attributes:
        source: the pretrained source model, with layers "backbone" and
            "source_head".
        num_classes: target classes.
        iterations: SGD steps of a fine-tuning run.
        probe_iterations: SGD steps of the linear probe (the head alone).
        batch_size: batch size.
        learning_rate: initial learning rate (divided by 10 after 2/3).
        beta: L2 strength on the new head.
        warmup_iterations: steps of linear learning-rate warm-up.
        augment: random shifts and flips of the training images.
        delta_layers: the feature maps DELTA matches.
        delta_attention: DELTA's channel attention, from a linear probe
            (one pass through the layers downstream of each channel, per
            batch of `ATTENTION_BATCH` images); False: every channel
            weighs 1.
        callbacks: Keras callbacks given to every `fit` of a run (e.g.
            timers), beside the runner's own.
    """

    source: keras.Model
    num_classes: int
    iterations: int
    probe_iterations: int
    batch_size: int
    learning_rate: float
    beta: float
    warmup_iterations: int = 0
    augment: bool = False
    delta_layers: tuple = ("relu2", "relu3")
    delta_attention: bool = True
    callbacks: tuple = ()


# Images per pass of DELTA's channel attention (their activations are kept
# in memory during the pass).
ATTENTION_BATCH = 256

# Results shared between the runs of one process: DELTA's attention (for
# DELTA and DELTA + L2-SP on the same images) and WiSE-FT's fine-tuned
# weights (for every t of its grid on the same images).
_SHARED = collections.OrderedDict()
_SHARED_SIZE = 16


def _shared(task, what, seed, x, y, compute):
    """`compute()`, or its value from an earlier call with the same task,
    `what`, seed and images in this process."""
    digest = hashlib.sha1(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    key = (id(task), what, seed, digest.hexdigest())
    if key in _SHARED:
        _SHARED.move_to_end(key)
        return _SHARED[key][1]
    value = compute()
    # The task is kept with the value so that its id is not reused.
    _SHARED[key] = (task, value)
    while len(_SHARED) > _SHARED_SIZE:
        _SHARED.popitem(last=False)
    return value


def target_model(task, seed):
    """A copy of the pretrained backbone with a new head seeded by `seed`."""
    keras.utils.set_random_seed(seed)
    pretrained = task.source.get_layer("backbone")
    backbone = keras.models.clone_model(pretrained)
    backbone.set_weights(pretrained.get_weights())
    head = keras.layers.Dense(task.num_classes, name="head")
    model = keras.Sequential([backbone, head], name="target")
    model.build((None,) + tuple(pretrained.input_shape[1:]))
    return model, backbone, head


def _regularized_target(task, seed, kind, alpha, **options):
    """`target_model` with the penalty `kind` at `alpha` on the backbone
    and `task.beta` on the new head."""
    model, backbone, head = target_model(task, seed)
    keras_sp.regularize(
        model, kind, alpha=alpha, beta=task.beta, new_layers=[head], **options
    )
    return model, backbone, head


def _dataset(task, x, y, seed):
    if task.augment:
        return comparison_settings.augmented_dataset(
            x, y, task.batch_size, seed
        )
    return training.training_dataset(x, y, task.batch_size, seed)


def _fit(task, model, x, y, seed, iterations, learning_rate, proximal=False):
    training.fine_tune(
        model,
        _dataset(task, x, y, seed),
        iterations=iterations,
        learning_rate=learning_rate,
        warmup_iterations=task.warmup_iterations,
        proximal=proximal,
        callbacks=task.callbacks,
    )


def probe(task, params, seed, x, y):
    """Linear probe: the backbone frozen (BatchNormalization in inference
    mode), the head trained for `probe_iterations` steps."""
    model, backbone, head = target_model(task, seed)
    backbone.trainable = False
    keras_sp.regularize(
        model, "l2", alpha=0.0, beta=params["beta"], new_layers=[head]
    )
    _fit(task, model, x, y, seed, task.probe_iterations, task.learning_rate)
    return model, backbone


def penalized(kind, proximal=False):
    """Fine-tuning of the whole network with the penalty `kind` (eqs. 1-7)
    at `params["alpha"]`, `task.beta` on the head; with `proximal`, the
    penalty is applied by proximal steps (`keras_sp.Proximal`) instead of
    its subgradient."""

    def train(task, params, seed, x, y):
        model, backbone, _ = _regularized_target(
            task,
            seed,
            kind,
            params["alpha"],
            **({"proximal": True} if proximal else {}),
        )
        _fit(
            task,
            model,
            x,
            y,
            seed,
            task.iterations,
            task.learning_rate,
            proximal=proximal,
        )
        return model, backbone

    return train


def _source_head(task):
    """A trainable copy of the pretrained source classifier."""
    original = task.source.get_layer("source_head")
    head = original.__class__.from_config(original.get_config())
    head.build(original.input.shape)
    head.set_weights(original.get_weights())
    return head


def lp_ft(kind):
    """LP-FT (`keras_sp.callbacks.LinearProbe`): `iterations` steps of a
    linear probe of the head at `task.learning_rate`, then `iterations`
    steps of fine-tuning everything at `params["finetune_learning_rate"]`
    (constant rates, SGD momentum 0.9), the penalty `kind` at
    `params["sp_alpha"]` (0 without it) on the backbone and `task.beta` on
    the head."""

    def train(task, params, seed, x, y):
        model, backbone, head = _regularized_target(
            task, seed, kind, params.get("sp_alpha", 0.0)
        )
        model.compile(
            optimizer=keras.optimizers.SGD(task.learning_rate, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(
            _dataset(task, x, y, seed),
            steps_per_epoch=task.iterations,
            epochs=2,
            shuffle=False,  # the dataset is already shuffled
            callbacks=[
                keras_sp.callbacks.LinearProbe(
                    [head],
                    epochs=1,
                    learning_rate=task.learning_rate,
                    finetune_learning_rate=params["finetune_learning_rate"],
                ),
                keras_sp.callbacks.StopOnNonFinite(),
                *task.callbacks,
            ],
            verbose=0,
        )
        return model, backbone

    return train


def wise_ft(task, params, seed, x, y):
    """WiSE-FT (`keras_sp.interpolate`): L2 fine-tuning at
    `params["alpha"]`, then every weight of the backbone (BatchNormalization
    statistics included) set to `(1 - t) w0 + t w_ft`, `t = params["t"]`;
    the head keeps its fine-tuned values. The fine-tuning is shared by the
    values of t (same alpha, seed and images) within a process."""
    alpha = params["alpha"]

    def fine_tuned():
        model, _, head = target_model(task, seed)
        keras_sp.regularize(
            model, "l2", alpha=alpha, beta=task.beta, new_layers=[head]
        )
        _fit(task, model, x, y, seed, task.iterations, task.learning_rate)
        return model.get_weights()

    weights = _shared(task, ("wise_ft", alpha), seed, x, y, fine_tuned)
    model, backbone, head = target_model(task, seed)
    keras_sp.record_starting_point(model, new_layers=[head])
    model.set_weights(weights)
    keras_sp.interpolate(model, params["t"])
    return model, backbone


def _terms(name, task, params, seed, x, y):
    """The `keras_sp.feature_space` terms of method `name`."""
    if name == "bss":
        return [feature_space.BSS(eta=params["eta"], k=1)]
    if name == "lwf":
        return [feature_space.LwF(weight=params["weight"], temperature=2.0)]
    if name == "co_tuning":
        relationship = transfer_statistics.category_relationship(
            task.source, x, y, num_classes=task.num_classes, verbose=0
        )
        return [feature_space.CoTuning(relationship, weight=params["weight"])]
    # DELTA: channel attention from a linear probe on the target images
    # (the backbone frozen). The attention sums to 1 over a layer's
    # channels; DELTA weighs channel j by C * a_j (mean weight 1).
    layers = list(task.delta_layers)
    if not task.delta_attention:
        return [feature_space.DELTA(layers=layers, alpha=params["alpha"])]

    def attention():
        probed, _ = probe(task, {"beta": task.beta}, seed, x, y)
        return transfer_statistics.channel_attention(
            probed, x, y, layers, batch_size=ATTENTION_BATCH, verbose=0
        )

    attention = _shared(task, "attention", seed, x, y, attention)
    return [
        feature_space.DELTA(
            layers=layers, alpha=params["alpha"], attention=attention
        )
    ]


def feature_regularized(name, kind="l2"):
    """Fine-tuning with the feature-space term of `name` (DELTA, BSS, LwF,
    Co-Tuning: `keras_sp.FeatureRegularized`), the penalty `kind` on the
    weights (`params["sp_alpha"]`, 0 without it) and `task.beta` on the
    head."""

    def train(task, params, seed, x, y):
        terms = _terms(name, task, params, seed, x, y)
        model, backbone, _ = _regularized_target(
            task, seed, kind, params.get("sp_alpha", 0.0)
        )
        uses_head = any(term.uses_source_head for term in terms)
        wrapper = keras_sp.FeatureRegularized(
            model,
            terms,
            source_head=_source_head(task) if uses_head else None,
        )
        _fit(task, wrapper, x, y, seed, task.iterations, task.learning_rate)
        return model, backbone

    return train


# The methods whose penalty can put weights exactly at w0.
SPARSE_METHODS = (
    "l1_sp",
    "group_lasso_sp",
    "l1_sp_proximal",
    "group_lasso_sp_proximal",
)

# name -> (train function, the hyper-parameters of its grid)
METHODS = {
    "probe": (probe, ("beta",)),
    "l2": (penalized("l2"), ("alpha",)),
    "l2_sp": (penalized("l2_sp"), ("alpha",)),
    "l1_sp": (penalized("l1_sp"), ("alpha",)),
    "group_lasso_sp": (penalized("group_lasso_sp"), ("alpha",)),
    "l1_sp_proximal": (penalized("l1_sp", proximal=True), ("alpha",)),
    "group_lasso_sp_proximal": (
        penalized("group_lasso_sp", proximal=True),
        ("alpha",),
    ),
    "lp_ft": (lp_ft("l2"), ("finetune_learning_rate",)),
    "lp_ft_l2_sp": (lp_ft("l2_sp"), ("finetune_learning_rate", "sp_alpha")),
    "wise_ft": (wise_ft, ("alpha", "t")),
    "delta": (feature_regularized("delta"), ("alpha",)),
    "delta_l2_sp": (
        feature_regularized("delta", "l2_sp"),
        ("alpha", "sp_alpha"),
    ),
    "bss": (feature_regularized("bss"), ("eta",)),
    "lwf": (feature_regularized("lwf"), ("weight",)),
    "co_tuning": (feature_regularized("co_tuning"), ("weight",)),
}
