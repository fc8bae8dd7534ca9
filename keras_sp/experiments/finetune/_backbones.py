"""The starting point of fine-tuning: a pretrained backbone, its source model.

A backbone is a `keras.applications` model (ImageNet weights, a weights
file such as Places365's, the converted ImageNet MobileNet V1, or random),
the nested backbone of a `.keras` source model, or the small CNN pretrained
on Fashion-MNIST classes 0-4 (`keras_sp.experiments.fashion_source`).
"""

import dataclasses
import os

import keras

from keras_sp import units
from keras_sp.experiments import fashion_source
from keras_sp.experiments import weights as weight_files
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.finetune._checks import CONVERTED_WEIGHTS
from keras_sp.experiments.finetune._checks import FASHION_SOURCE
from keras_sp.experiments.finetune._checks import is_model_file

__all__ = [
    "BackboneSettings",
    "Pretrained",
    "load_pretrained",
    "unit_activation_layers",
]


@dataclasses.dataclass(frozen=True)
class BackboneSettings:
    """The config keys that say which pretrained network to start from."""

    backbone: str
    weights: str | None
    source_num_classes: int
    backbone_layer: str
    source_head_layer: str
    input_size: int


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """The starting point: a backbone, and the source model it came from.

    Attributes:
        backbone: the feature extractor (ends with average pooling).
        source_model: the whole source model, with logits as outputs.
        source_head: its source classifier (None if it has no Dense one).
    """

    backbone: keras.Model
    source_model: keras.Model | None
    source_head: object | None


def _applications_models(settings):
    """`(backbone, source model)` of a `keras.applications` backbone.

    The backbone ends with average pooling; the source model keeps the
    source classifier, with logits as outputs.
    """
    constructor = getattr(keras.applications, settings.backbone)
    shape = (settings.input_size, settings.input_size, 3)
    if settings.weights == CONVERTED_WEIGHTS:
        return (
            weight_files.imagenet_mobilenet(
                input_shape=shape, include_top=False, pooling="avg"
            ),
            weight_files.imagenet_mobilenet(
                input_shape=shape, classifier_activation=None
            ),
        )
    weights = settings.weights
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise ConfigError(
            "Config key 'weights' must be 'imagenet', null, "
            f"{CONVERTED_WEIGHTS!r} or an existing .weights.h5 file. "
            f"Received: weights={weights!r}"
        )
    # A weights file holds the model with its classifier: it is loaded
    # there (checked) and the backbone's layers are copied from it.
    from_file = weights not in (None, "imagenet")
    source_model = constructor(
        include_top=True,
        weights=None if from_file else weights,
        input_shape=shape,
        classes=settings.source_num_classes,
        classifier_activation=None,
    )
    if from_file:
        weight_files.load_weights_checked(source_model, weights)
    backbone = constructor(
        include_top=False,
        weights=None if from_file else weights,
        input_shape=shape,
        pooling="avg",
    )
    if from_file:
        for layer in backbone.layers:
            if layer.weights:
                layer.set_weights(
                    source_model.get_layer(layer.name).get_weights()
                )
    return backbone, source_model


def _source_model_parts(settings):
    """The `Pretrained` of a `.keras` source model or of `fashion_source`."""
    if settings.backbone == FASHION_SOURCE:
        source_model, _ = fashion_source.pretrained_source_model(
            width=32, fc_units=None, verbose=0
        )
    else:
        if not os.path.isfile(settings.backbone):
            raise ConfigError(
                "Config key 'backbone' names a .keras file that does not "
                f"exist. Received: backbone={settings.backbone!r}"
            )
        source_model = keras.saving.load_model(settings.backbone)
    names = [layer.name for layer in source_model.layers]
    for key in ("backbone_layer", "source_head_layer"):
        if getattr(settings, key) not in names:
            raise ConfigError(
                f"Config key '{key}' must name a layer of the source model "
                f"{settings.backbone!r} (layers: {names}). Received: "
                f"{key}={getattr(settings, key)!r}"
            )
    backbone = source_model.get_layer(settings.backbone_layer)
    if not isinstance(backbone, keras.Model):
        raise ConfigError(
            "Config key 'backbone_layer' must name a nested model (the "
            f"feature extractor). Received: backbone_layer="
            f"{settings.backbone_layer!r}"
        )
    return Pretrained(
        backbone,
        source_model,
        source_model.get_layer(settings.source_head_layer),
    )


def load_pretrained(settings):
    """The pretrained backbone, the full source model and its classifier.

    Args:
        settings: a `BackboneSettings`.

    Returns:
        A `Pretrained`.
    """
    if is_model_file(settings.backbone) or settings.backbone == FASHION_SOURCE:
        return _source_model_parts(settings)
    try:
        backbone, source_model = _applications_models(settings)
    except ConfigError:
        raise
    except ValueError as error:
        first = str(error).splitlines()[0] if str(error) else repr(error)
        raise ConfigError(
            f"Config key 'weights' does not fit backbone "
            f"{settings.backbone!r} ({first}). Received: weights="
            f"{settings.weights!r}"
        ) from None
    head = None
    names = [layer.name for layer in source_model.layers]
    if "predictions" in names and isinstance(
        source_model.get_layer("predictions"), keras.layers.Dense
    ):
        head = source_model.get_layer("predictions")
    return Pretrained(backbone, source_model, head)


def unit_activation_layers(backbone):
    """For each depth unit, the layer whose output is the unit's activation.

    The unit's last layer, or the last activation layer (ReLU) that follows
    it before the next layer with weights: a MobileNet pair's
    `conv_pw_i_relu`, a ResNet block's `convX_blockY_out`.
    """
    order = list(backbone.layers)
    position = {id(layer): index for index, layer in enumerate(order)}
    names = []
    for unit in units.depth_units(backbone):
        if any(id(layer) not in position for layer in unit):
            raise ValueError(
                f"Backbone {backbone.name!r} nests models; Figure 4 needs its "
                "layers at the top level (a keras.applications model)."
            )
        last = max(position[id(layer)] for layer in unit)
        chosen = order[last]
        for layer in order[last + 1 :]:
            if layer.weights:
                break
            if isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)):
                chosen = layer
        names.append(chosen.name)
    return names
