"""Every use of Keras internals in keras-sp, in one place.

Each helper says why public Keras is not enough.
`tests/library/keras_private_test.py` fails if a Keras release changes what
these helpers rely on.
"""

import contextlib
import threading

import keras
from keras.src.models.functional import Functional
from keras.src.saving.keras_saveable import KerasSaveable

__all__ = [
    "KerasSaveable",
    "acknowledge_trainable_state",
    "all_layers",
    "is_functional",
    "keras_logits",
    "optimizer_variables",
    "own_trainable_variables",
    "own_variables",
    "overridden",
    "pfor_converter_registry",
    "pfor_wrap",
    "recorded_calls",
    "rebuild_optimizer",
    "rebuilds_in_place",
    "restore_call",
    "run_in_inference_mode",
    "sync_training_state",
]

# `keras.saving` walks a model's attributes and saves the variables of every
# `KerasSaveable` it meets (layers, optimizers, metrics...). A regularizer that
# derives from it and names an object type the walk knows is saved with the
# layer that holds it as `kernel_regularizer`: its starting point and Fisher
# land in the `.keras` / `.weights.h5` file and never in a config. There is
# no public hook for this.
SAVEABLE_OBJ_TYPE = "Loss"


def all_layers(model):
    """Every layer inside `model`, nested models and sublayers flattened.

    Public Keras only lists the direct layers of a functional or Sequential
    model; `_flatten_layers` also reaches sublayers of custom layers (such as
    the layer a `keras.layers.Wrapper` holds).
    """
    return list(model._flatten_layers(include_self=False, recursive=True))


def own_variables(layer):
    """The variables `layer` created itself, trainable or not.

    `layer.weights` also lists sublayers' variables, and once a layer is
    frozen `variable.trainable` no longer says which variables it trains.
    """
    return list(layer._trainable_variables) + list(
        layer._non_trainable_variables
    )


def own_trainable_variables(layer):
    """The variables `layer` trains when it is trainable (frozen or not)."""
    return list(layer._trainable_variables)


def is_functional(model):
    """Whether `model` is a graph of layers built with `keras.Model(inputs,
    outputs)` (or a `keras.applications` model), not a subclassed model.

    Public Keras does not export the class of such models; `keras_sp.widen`
    and `keras_sp.deepen` can only copy a model layer by layer through its
    graph.
    """
    return isinstance(model, Functional)


def optimizer_variables(optimizer):
    """The model variables a built optimizer updates, in its order.

    Keras optimizers are built once for a list of variables and refuse
    others afterwards; public Keras does not expose that list.
    """
    return list(optimizer._trainable_variables)


def rebuilds_in_place(optimizer):
    """Whether `rebuild_optimizer` can rebuild `optimizer` in place.

    Optimizers that wrap others (`LossScaleOptimizer`, `MultiOptimizer`)
    keep their state in the optimizers they wrap.
    """
    return isinstance(optimizer, keras.optimizers.Optimizer) and not isinstance(
        optimizer,
        (keras.optimizers.LossScaleOptimizer, keras.optimizers.MultiOptimizer),
    )


def _build_recording_references(optimizer, variables):
    """Builds `optimizer` for `variables`; returns `(reference, variable)` for
    every variable the build made with `add_variable_from_reference`."""
    made = []
    original = optimizer.add_variable_from_reference

    def add_variable_from_reference(reference_variable, *args, **kwargs):
        variable = original(reference_variable, *args, **kwargs)
        made.append((reference_variable, variable))
        return variable

    # Set on the instance without the optimizer's attribute tracking.
    optimizer.__dict__["add_variable_from_reference"] = (
        add_variable_from_reference
    )
    try:
        optimizer.build(variables)
    finally:
        del optimizer.__dict__["add_variable_from_reference"]
    return made


def _same_kind(a, b):
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype


def rebuild_optimizer(optimizer, variables):
    """Rebuilds a built optimizer, in place, for exactly `variables`.

    The optimizer object, its `iterations` and its learning rate stay. Every
    variable its `build` made is dropped and made again for `variables`, in
    their order (JAX's stateless step needs one set of slots per trainable
    variable, in the model's order). A slot made for a model variable the
    optimizer already updated (SGD's momentum, Adam's m and v...) takes the
    value of the old slot of that same variable (same object) and kind;
    slots of variables it did not update start at their initial value
    (zero). A variable `build` made without a reference variable takes the
    value of the old one of the same name when that name is unique.

    Keras optimizers are built once and offer no public way to change the
    variables they update; this relies on `_variables`,
    `_trainable_variables`, `_trainable_variables_indices`, `_iterations`,
    `_learning_rate`, `_untrack_variable` and on the slot name
    `add_variable_from_reference` gives (`{path with "_"}_{name}`).
    """
    old_references = list(optimizer._trainable_variables)
    kept = {id(optimizer._iterations), id(optimizer._learning_rate)}
    old_made = [v for v in optimizer._variables if id(v) not in kept]
    old_attributes = {
        name: value
        for name, value in vars(optimizer).items()
        if isinstance(value, keras.Variable) and id(value) not in kept
    }
    for variable in old_made:
        optimizer._untrack_variable(variable)
    optimizer._trainable_variables = []
    optimizer._trainable_variables_indices = {}
    optimizer.built = False
    made = _build_recording_references(optimizer, list(variables))

    # An old slot is found by its name; when several model variables share
    # a path, by the rank of its variable among them (build order).
    old_by_name = {}
    for variable in old_made:
        old_by_name.setdefault(variable.name, []).append(variable)
    old_ids = {id(v) for v in old_references}
    for reference, variable in made:
        if id(reference) not in old_ids:
            continue
        twins = [id(v) for v in old_references if v.path == reference.path]
        candidates = old_by_name.get(variable.name, [])
        if len(candidates) != len(twins):
            continue
        old = candidates[twins.index(id(reference))]
        if _same_kind(old, variable):
            variable.assign(old.value)
    made_ids = {id(v) for _, v in made}
    for variable in optimizer._variables:
        if id(variable) in kept or id(variable) in made_ids:
            continue
        same_name = [v for v in optimizer._variables if v.name == variable.name]
        candidates = old_by_name.get(variable.name, [])
        if len(same_name) == 1 and len(candidates) == 1:
            if _same_kind(candidates[0], variable):
                variable.assign(candidates[0].value)
    for name, value in vars(optimizer).items():
        old = old_attributes.get(name)
        if (
            isinstance(value, keras.Variable)
            and old is not None
            and old is not value
            and id(value) not in made_ids
            and _same_kind(old, value)
        ):
            value.assign(old.value)


def sync_training_state(model):
    """Writes the state a JAX `fit` holds outside the variables back into
    them.

    In the middle of an epoch, JAX's `fit` keeps the trainable, optimizer
    and other variables' values in a state it passes from step to step
    (the variables themselves hold none); the state is matched to
    `model.trainable_variables` by position, so it must be written back
    before any `trainable` flag changes. The next step then reads the new
    state from the variables. No-op on other backends.
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def acknowledge_trainable_state(model):
    """Records the model's current `trainable` flags as the compiled ones.

    `fit` and `evaluate` warn when a layer's `trainable` flag changed since
    `compile`, because the optimizer and the train function would not see the
    change. keras-sp rebuilds both after every change it makes, so the
    warning would be false; public Keras has no way to say so.
    """
    model._compiled_trainable_state = {
        layer: layer.trainable for layer in model._flatten_layers()
    }


def keras_logits(tensor):
    """The logits a Keras `softmax` (or `sigmoid`) computed `tensor` from.

    On the TensorFlow backend, `keras.activations.softmax` and
    `keras.ops.softmax` record their input on the symbolic output as
    `_keras_logits`, which Keras's crossentropy reads back to work from
    logits instead of log(0); there is no public accessor. Returns None for
    other tensors (and for eager tensors, which cannot carry it).
    """
    return getattr(tensor, "_keras_logits", None)


# Marks a layer whose `call` `run_in_inference_mode` replaced.
_INFERENCE_CALL = "_keras_sp_inference_call"


def run_in_inference_mode(layer):
    """Makes `layer` (a BatchNormalization) run as with `training=False`,
    whatever `training` it is called with: it normalises with its moving
    statistics and leaves them unchanged.

    Public Keras ties this to `layer.trainable = False`, which also freezes
    gamma and beta. `Layer.__call__` calls `self.call`, which is looked up
    on the instance first; the replacement is set there. `restore_call`
    undoes it.
    """
    if layer.__dict__.get(_INFERENCE_CALL):
        return
    call = type(layer).call

    def call_in_inference_mode(inputs, training=None, mask=None):
        return call(layer, inputs, training=False, mask=mask)

    layer.call = call_in_inference_mode
    layer.__dict__[_INFERENCE_CALL] = True


# Replacing attributes of layer instances is not thread-safe by itself.
_OVERRIDE_LOCK = threading.RLock()


@contextlib.contextmanager
def overridden(replacements):
    """Inside the block, each `(layer, name, replace)` of `replacements`
    sets `layer.<name>` on the instance to `replace(current value)`; on
    exit every layer gets back exactly what its instance held.

    `Layer.__call__` looks `call` (or `quantized_call`, and a layer's
    `activation`) up on the instance first, so this changes what one layer
    computes for the duration of a pass, without touching its class, its
    config or its variables. Public Keras has no hook for it.
    """
    with _OVERRIDE_LOCK:
        saved = []
        try:
            for layer, name, replace in replacements:
                had = name in layer.__dict__
                saved.append((layer, name, had, layer.__dict__.get(name)))
                layer.__dict__[name] = replace(getattr(layer, name))
            yield
        finally:
            for layer, name, had, previous in reversed(saved):
                if had:
                    layer.__dict__[name] = previous
                else:
                    layer.__dict__.pop(name, None)


def restore_call(layer):
    """Gives `layer` back its class's `call` (undoes
    `run_in_inference_mode`)."""
    layer.__dict__.pop("call", None)
    layer.__dict__.pop(_INFERENCE_CALL, None)


def pfor_converter_registry():
    """TensorFlow's table of `tf.vectorized_map` (pfor) converters, op type
    to converter, or None if TensorFlow no longer has it.

    TensorFlow has no public hook to give an op another batched form;
    `keras_sp._fisher_tensorflow` swaps a few entries while it traces.
    """
    from tensorflow.python.ops.parallel_for import pfor

    return getattr(pfor, "_pfor_converter_registry", None)


def pfor_wrap(tensor, stacked=True):
    """The value a pfor converter returns for `tensor` (stacked: one slice
    per loop iteration on its first axis)."""
    from tensorflow.python.ops.parallel_for import pfor

    return pfor.wrap(tensor, stacked)


@contextlib.contextmanager
def recorded_calls(layers):
    """Within the block, every call of a layer in `layers` is recorded.

    Yields `{id(layer): [(inputs, outputs), ...]}`, one entry per call, in
    call order; `inputs` is the first argument of the call. Public Keras has
    no forward hook: `Layer.__call__` calls `self.call`, which is looked up
    on the instance first, so a recording `call` is set there for the
    block and the layer's own (class or instance) `call` is restored after.
    Used by `keras_sp.FeatureRegularized` to read feature maps from the
    forward pass it runs anyway.
    """
    records = {id(layer): [] for layer in layers}
    saved = []
    try:
        for layer in layers:
            if id(layer) in {id(done) for done, _ in saved}:
                continue
            previous = layer.__dict__.get("call", _NO_CALL)
            saved.append((layer, previous))
            layer.__dict__["call"] = _recording(layer.call, records[id(layer)])
        yield records
    finally:
        for layer, previous in reversed(saved):
            if previous is _NO_CALL:
                layer.__dict__.pop("call", None)
            else:
                layer.__dict__["call"] = previous


_NO_CALL = object()


def _recording(call, record):
    def recording_call(*args, **kwargs):
        outputs = call(*args, **kwargs)
        inputs = args[0] if args else next(iter(kwargs.values()))
        record.append((inputs, outputs))
        return outputs

    return recording_call
