"""Feature-space transfer regularisers, in one Keras model.

`FeatureRegularized` wraps a model the user built (a pretrained backbone
and a new target head) with the regularisers that compare it, during
fine-tuning, to the pretrained network it started from: DELTA, BSS, LwF
and Co-Tuning (`keras_sp.feature_terms`). It is a `keras.Model`: compile,
fit, evaluate, predict and save it as any other.

    regularized = keras_sp.FeatureRegularized(
        model,
        terms=[keras_sp.feature_space.DELTA(layers=["block3"], alpha=0.01),
               keras_sp.feature_space.BSS(eta=0.001, k=1)],
    )
    regularized.compile(optimizer, loss, metrics)
    regularized.fit(x, y)

Training loss = the compiled loss on the target logits + the model's
weight penalties (`model.losses`, e.g. L2-SP from `keras_sp.regularize`,
counted once) + the terms. `evaluate` and `predict` see the target logits
only, and `evaluate`'s loss leaves the terms out.

Cost: the terms that compare with the pretrained network (DELTA, LwF) run
a second forward pass through a frozen copy of the model on every training
step, and hold that copy (the memory of a second backbone).
"""

import keras
import numpy as np
from keras import ops

from keras_sp import _keras_private
from keras_sp.feature_terms import BSS
from keras_sp.feature_terms import DELTA
from keras_sp.feature_terms import CoTuning
from keras_sp.feature_terms import FeatureTerm
from keras_sp.feature_terms import LwF

__all__ = ["BSS", "DELTA", "CoTuning", "FeatureRegularized", "LwF"]

# What `call(x, training=True)` returns: {_LOGITS: target logits, _EXTRAS:
# what the terms read}.
_LOGITS = "target_logits"
_EXTRAS = "feature_terms"


def _without_regularizers(config):
    """A copy of a serialized object with every `*_regularizer` set to None
    (the frozen copy is not trained: its penalties would be constants,
    and those of keras-sp hold arrays of their own)."""
    if isinstance(config, dict):
        return {
            key: None
            if key.endswith("_regularizer")
            else _without_regularizers(value)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_without_regularizers(value) for value in config]
    return config


def frozen_copy(layer, name):
    """A copy of the built `layer` (a model or a layer) named `name`, with
    the same weights, no regularizers, `trainable=False`, sharing no
    variable with `layer`."""
    config = keras.saving.serialize_keras_object(layer)
    config = _without_regularizers(config)
    config["config"]["name"] = name
    copy = keras.saving.deserialize_keras_object(config)
    if not copy.built:
        raise ValueError(
            f"Cannot copy {layer.name!r}: a copy made from its config is not "
            "built. Use a Functional or Sequential model (or a layer that "
            "records its build config)."
        )
    originals, copies = layer.weights, copy.weights
    if len(originals) != len(copies) or any(
        tuple(a.shape) != tuple(b.shape)
        for a, b in zip(originals, copies, strict=True)
    ):
        raise ValueError(
            f"Cannot copy {layer.name!r}: the copy made from its config "
            f"holds other weights ({len(copies)} against {len(originals)})."
        )
    for original, copied in zip(originals, copies, strict=True):
        # Through NumPy: on JAX, assigning the value would share its buffer.
        copied.assign(np.array(ops.convert_to_numpy(original.value)))
    copy.trainable = False
    return copy


def _find_layer(model, name, argument):
    """The layer called `name` in `model` (nested models too)."""
    found = [
        layer
        for layer in _keras_private.all_layers(model)
        if layer.name == name
    ]
    if not found:
        raise ValueError(
            f"`{argument}` names a layer the model {model.name!r} does not "
            f"have. Received: {argument}={name!r}"
        )
    if len({id(layer) for layer in found}) > 1:
        raise ValueError(
            f"`{argument}` is ambiguous: {len(found)} layers of the model "
            f"{model.name!r} are called {name!r}. Received: {argument}={name!r}"
        )
    return found[0]


def _last_layer(model):
    layers = getattr(model, "layers", None)
    if not layers:
        raise ValueError(
            "`features=None` reads the input of the model's last layer, but "
            f"the model {model.name!r} lists no layers. Name the feature "
            "layer with `features`."
        )
    return layers[-1]


def _single_call(records, layer, what):
    calls = records[id(layer)]
    if len(calls) != 1:
        raise ValueError(
            f"{what} reads layer {layer.name!r}, which ran {len(calls)} times "
            "in one forward pass; name a layer called exactly once."
        )
    return calls[0]


@keras.saving.register_keras_serializable(package="keras_sp")
class FeatureRegularized(keras.Model):
    """A model fine-tuned with feature-space transfer regularisers.

    The total training loss is

        L(y, model(x)) + model.losses + sum_t term_t(x, y)

    with L the compiled loss on the target logits, `model.losses` the
    weight penalties the model carries (L2-SP from `keras_sp.regularize`,
    added once) and the terms among DELTA (Li et al., ICLR 2019), BSS (Chen
    et al., NeurIPS 2019), LwF (Li & Hoiem, ECCV 2016) and Co-Tuning (You et
    al., NeurIPS 2020); see `keras_sp.feature_terms` for their formulas.

    At construction the wrapper makes a frozen copy of `model` (and of
    `source_head` when LwF is used): same weights, `trainable=False`
    (BatchNormalization in inference mode), no variable shared. The
    pretrained feature maps FM(w0, x) are that copy's, on the same batch.
    `model` and `source_head` themselves are trained; nothing else about
    them changes.

    Called with `training=True` (as `fit` does) the wrapper returns
    `{"target_logits": ..., "feature_terms": {...}}`; otherwise the target
    logits only, so `evaluate`, `predict` and metrics see the model's
    output.

    Args:
        model: a built `keras.Model` (pretrained backbone + target head)
            producing the target logits.
        terms: a list of `DELTA`, `BSS`, `LwF`, `CoTuning` terms.
        source_head: the pretrained model's original classifier (a built
            layer or model taking the feature tensor and returning source
            logits), kept beside the target head and trained; needed by
            `LwF` and `CoTuning`, shared by both.
        features: the name of the layer whose output is the feature tensor
            (what BSS penalises and the source head reads); None for the
            input of the model's last layer (the target head).
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    >>> import keras, numpy as np
    >>> from keras_sp import feature_space as fs
    >>> inputs = keras.Input((4,))
    >>> h = keras.layers.Dense(8, activation="relu", name="features")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    >>> regularized = fs.FeatureRegularized(
    ...     model, terms=[fs.DELTA(["features"], alpha=0.1),
    ...                   fs.BSS(eta=0.001, k=1)])
    >>> regularized.compile("sgd", keras.losses.SparseCategoricalCrossentropy(
    ...     from_logits=True))
    >>> x = np.ones((6, 4), "float32"); y = np.zeros(6, "int32")
    >>> _ = regularized.fit(x, y, epochs=1, verbose=0)
    >>> regularized.predict(x, verbose=0).shape
    (6, 3)

    References: see `keras_sp.feature_terms`.
    """

    def __init__(self, model, terms, source_head=None, features=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"`model` must be a keras.Model. Received: model={model!r}"
            )
        if not model.built:
            raise ValueError(
                "`model` must be built (it holds the pretrained weights the "
                f"terms compare with). Received: model={model.name!r}, not "
                "built"
            )
        if not isinstance(terms, (list, tuple)) or not all(
            isinstance(term, FeatureTerm) for term in terms
        ):
            raise ValueError(
                "`terms` must be a list of keras_sp.feature_space terms "
                f"(DELTA, BSS, LwF, CoTuning). Received: terms={terms!r}"
            )
        if features is not None and not isinstance(features, str):
            if isinstance(features, keras.layers.Layer):
                features = features.name
            else:
                raise ValueError(
                    "`features` must be None or a layer name. "
                    f"Received: features={features!r}"
                )
        needs_head = [t for t in terms if t.uses_source_head]
        if needs_head and source_head is None:
            raise ValueError(
                f"{type(needs_head[0]).__name__} trains the source classifier "
                "beside the target head: pass the pretrained classifier as "
                "`source_head`. Received: source_head=None"
            )
        if source_head is not None:
            if not isinstance(source_head, keras.layers.Layer):
                raise ValueError(
                    "`source_head` must be a Keras layer or model. "
                    f"Received: source_head={source_head!r}"
                )
            if not source_head.built:
                raise ValueError(
                    "`source_head` must be built (it is the pretrained "
                    "classifier). Received: source_head="
                    f"{source_head.name!r}, not built"
                )
        self.model = model
        self.terms = list(terms)
        self.source_head = source_head
        self.features = features

        uses_reference = any(t.uses_reference for t in terms)
        uses_reference_head = any(t.uses_reference_source_head for t in terms)
        self.reference = None
        if uses_reference:
            self.reference = frozen_copy(model, f"{model.name}_reference")
        self.reference_source_head = None
        if uses_reference_head:
            self.reference_source_head = frozen_copy(
                source_head, f"{source_head.name}_reference"
            )
        self._taps = _Taps(self, terms)
        self._shapes_checked = False
        self.built = True

    def _run(self, network, taps, feature_layer, inputs, training):
        """`network(inputs)`, the outputs of the layers in `taps` and the
        feature tensor read at `feature_layer` (None: not read)."""
        watched = list(taps.values())
        if feature_layer is not None:
            watched.append(feature_layer)
        with _keras_private.recorded_calls(watched) as records:
            outputs = network(inputs, training=training)
        maps = {
            name: _single_call(records, layer, "A feature-space term")[1]
            for name, layer in taps.items()
        }
        features = None
        if feature_layer is not None:
            call_inputs, call_outputs = _single_call(
                records, feature_layer, "`features`"
            )
            features = call_inputs if self.features is None else call_outputs
        return outputs, maps, features

    def call(self, inputs, training=None):
        if not training:
            return self.model(inputs, training=training)
        taps = self._taps
        logits, maps, features = self._run(
            self.model, taps.model, taps.feature, inputs, True
        )
        extras = {"model": maps, "features": features}
        if self.reference is not None:
            _, reference_maps, reference_features = self._run(
                self.reference,
                taps.reference,
                taps.reference_feature,
                inputs,
                False,
            )
            extras["reference"] = reference_maps
            if reference_features is not None:
                extras["reference_features"] = reference_features
        if self.source_head is not None:
            extras["source_logits"] = self.source_head(features, training=True)
        if self.reference_source_head is not None:
            extras["reference_source_logits"] = ops.stop_gradient(
                self.reference_source_head(
                    extras["reference_features"], training=False
                )
            )
        if not self._shapes_checked:
            for term in self.terms:
                term.check_shapes(extras, logits)
            self._shapes_checked = True
        return {_LOGITS: logits, _EXTRAS: extras}

    def fit(self, *args, **kwargs):
        if self._shapes_checked or keras.backend.backend() != "jax":
            return super().fit(*args, **kwargs)
        # JAX's `fit` moves the variables' values into its own state before
        # tracing the first step, and puts them back only after a step ran:
        # a bad shape a term finds while tracing would leave them empty.
        saved = [
            (variable, np.array(ops.convert_to_numpy(variable.value)))
            for variable in self.variables
        ]
        try:
            return super().fit(*args, **kwargs)
        except Exception:
            if not self._shapes_checked:
                for variable, value in saved:
                    variable.assign(value)
            raise

    def feature_penalties(self, y_pred, y):
        """`{term name: value}` of every term on one training forward pass
        (`y_pred = regularized(x, training=True)`) and its labels."""
        extras = y_pred[_EXTRAS]
        return {term.name: term.penalty(extras, y) for term in self.terms}

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        logits, extras = _split(y_pred)
        loss = super().compute_loss(
            x, y, logits, sample_weight, training=training
        )
        if extras is not None:
            for term in self.terms:
                value = term.penalty(extras, y)
                loss = loss + ops.cast(value, loss.dtype)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logits, _ = _split(y_pred)
        return super().compute_metrics(x, y, logits, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "terms": [
                    keras.saving.serialize_keras_object(term)
                    for term in self.terms
                ],
                "source_head": None
                if self.source_head is None
                else keras.saving.serialize_keras_object(self.source_head),
                "features": self.features,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("model", "source_head"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        config["terms"] = [
            keras.saving.deserialize_keras_object(
                term, custom_objects=custom_objects
            )
            for term in config["terms"]
        ]
        return cls(**config)


class _Taps:
    """The layers a `FeatureRegularized` forward pass records, found once;
    a plain object, so Keras neither tracks nor saves them twice."""

    def __init__(self, wrapper, terms):
        model, reference = wrapper.model, wrapper.reference
        features = wrapper.features
        self.feature = (
            _last_layer(model)
            if features is None
            else _find_layer(model, features, "features")
        )
        self.model = {}
        self.reference = {}
        for term in terms:
            argument = "layers" if isinstance(term, DELTA) else "layer"
            for name in term.model_layers():
                self.model[name] = _find_layer(model, name, argument)
            for name in term.reference_layers():
                self.reference[name] = _find_layer(reference, name, argument)
        self.reference_feature = None
        if wrapper.reference_source_head is not None:
            self.reference_feature = (
                _last_layer(reference)
                if features is None
                else _find_layer(reference, features, "features")
            )


def _split(y_pred):
    """`(target logits, extras or None)` from what `call` returned."""
    if isinstance(y_pred, dict) and _EXTRAS in y_pred and _LOGITS in y_pred:
        return y_pred[_LOGITS], y_pred[_EXTRAS]
    return y_pred, None
