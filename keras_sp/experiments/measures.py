"""The experiments' measurements: activation R², source task, McNemar.

How much of the pretrained features the fine-tuned network keeps
(`activation_r2`, Figure 4 of the paper), how much source-task accuracy it
keeps (`source_task_accuracy`, `source_task_drop`, Table 3), and the paired
test of two classifiers on the same test examples (`mcnemar_test`). The
library's own measurements are `keras_sp.weight_drift`,
`keras_sp.unit_drift` and `keras_sp.reestimate_batchnorm`.

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, section 4.4.
"""

import math

import keras
import numpy as np

from keras_sp.batchnorm import reestimate_batchnorm

__all__ = [
    "activation_r2",
    "cross_entropy",
    "mcnemar_test",
    "predict",
    "source_task_accuracy",
    "source_task_drop",
]


def predict(model, x, batch_size=256):
    """`model(x)` in inference mode, batch by batch, as a NumPy array.

    Unlike `model.predict`, it traces nothing, so calling it on many freshly
    built models (one per run) costs no retracing.
    """
    outputs = [
        keras.ops.convert_to_numpy(model(x[i : i + batch_size], training=False))
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs)


def cross_entropy(logits, labels):
    """Per-example cross-entropy `-log softmax(logits)[label]`, in float64.

    The log-softmax is computed from logits shifted by their maximum, so
    large logits do not overflow.

    Example:

    >>> cross_entropy(np.log([[0.25, 0.75]]), [1]).round(6).tolist()
    [0.287682]
    """
    logits = np.asarray(logits, dtype="float64")
    labels = np.asarray(labels).reshape(-1)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probabilities = shifted - np.log(
        np.exp(shifted).sum(axis=-1, keepdims=True)
    )
    return -log_probabilities[np.arange(len(labels)), labels]


def source_task_accuracy(
    backbone, source_head, x, y, *, batchnorm="as_trained", batch_size=256
):
    """Accuracy on the source task of a fine-tuned backbone (Table 3).

    The fine-tuned backbone is evaluated with the original classification
    layer of the source task, without retraining, as in the paper's Table 3.
    BatchNormalization moving statistics drift toward the target task during
    fine-tuning and cost much source accuracy on their own, so say which
    ones a reported number uses:

    - `"as_trained"`: the moving statistics as fine-tuning left them;
    - `"reestimated"`: recomputed on `x` first
      (`keras_sp.reestimate_batchnorm`), on a copy of the backbone; the
      given backbone is not changed.

    Args:
        backbone: the fine-tuned feature extractor (a `keras.Model`).
        source_head: the source task's classifier (a layer or model mapping
            the backbone's output to source-class scores).
        x: source-task inputs (NumPy).
        y: integer source-task labels.
        batchnorm: `"as_trained"` or `"reestimated"`.
        batch_size: batch size of the forward passes.

    Returns:
        The top-1 accuracy, a float.

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, Table 3.
    """
    if batchnorm not in ("as_trained", "reestimated"):
        raise ValueError(
            "`batchnorm` must be 'as_trained' or 'reestimated'. Received: "
            f"batchnorm={batchnorm!r}"
        )
    if batchnorm == "reestimated":
        copy = keras.models.clone_model(backbone)
        copy.set_weights(backbone.get_weights())
        reestimate_batchnorm(copy, x, batch_size)
        backbone = copy
    features = predict(backbone, x, batch_size)
    scores = keras.ops.convert_to_numpy(source_head(features))
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(y)))


def source_task_drop(
    backbone,
    source_head,
    x,
    y,
    *,
    pretrained_backbone=None,
    pretrained_accuracy=None,
    batchnorm="as_trained",
    batch_size=256,
):
    """The change of source-task accuracy caused by fine-tuning (Table 3).

    `drop = accuracy(fine-tuned backbone + source head) - accuracy(pretrained
    backbone + source head)`, both on the source task's validation data
    `(x, y)`, with the original source classifier and no retraining. The
    fine-tuned accuracy uses the BatchNormalization statistics `batchnorm`
    says (see `source_task_accuracy`); the pretrained one always uses the
    pretrained model's own statistics, so both columns of a table share the
    same reference.

    Args:
        backbone: the fine-tuned feature extractor.
        source_head: the source task's classifier (applied to the features).
        x: source-task inputs (NumPy).
        y: integer source-task labels.
        pretrained_backbone: the backbone before fine-tuning; or
        pretrained_accuracy: its source accuracy, already measured (give
            exactly one of the two).
        batchnorm: `"as_trained"` or `"reestimated"`.
        batch_size: batch size of the forward passes.

    Returns:
        A dict with `"pretrained"`, `"fine_tuned"` (accuracies) and `"drop"`
        (their difference, negative when accuracy is lost).

    Example:

    >>> import keras, numpy as np
    >>> backbone = keras.Sequential(
    ...     [keras.Input((2,)), keras.layers.Activation("linear")])
    >>> head = keras.layers.Dense(2, kernel_initializer="identity")
    >>> x = np.eye(2, dtype="float32"); y = np.array([0, 0])
    >>> source_task_drop(backbone, head, x, y, pretrained_accuracy=1.0)
    {'pretrained': 1.0, 'fine_tuned': 0.5, 'drop': -0.5}

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, Table 3.
    """
    if (pretrained_backbone is None) == (pretrained_accuracy is None):
        raise ValueError(
            "Give exactly one of `pretrained_backbone` and "
            "`pretrained_accuracy`. Received: pretrained_backbone="
            f"{getattr(pretrained_backbone, 'name', pretrained_backbone)!r}"
            f", pretrained_accuracy={pretrained_accuracy!r}"
        )
    if pretrained_accuracy is None:
        pretrained_accuracy = source_task_accuracy(
            pretrained_backbone, source_head, x, y, batch_size=batch_size
        )
    fine_tuned = source_task_accuracy(
        backbone, source_head, x, y, batchnorm=batchnorm, batch_size=batch_size
    )
    pretrained_accuracy = float(pretrained_accuracy)
    return {
        "pretrained": pretrained_accuracy,
        "fine_tuned": fine_tuned,
        "drop": fine_tuned - pretrained_accuracy,
    }


class _Moments:
    """Running sums of two paired feature arrays, shifted for accuracy."""

    def __init__(self, a, b):
        channels = a.shape[-1]
        a = a.reshape(-1, channels)
        b = b.reshape(-1, channels)
        self.shift_a = np.where(np.isfinite(a), a, 0.0).mean(axis=0)
        self.shift_b = np.where(np.isfinite(b), b, 0.0).mean(axis=0)
        self.count = 0
        self.sums = np.zeros((5, channels))
        self.finite = np.ones(channels, dtype=bool)

    def add(self, a, b):
        a = a.reshape(-1, a.shape[-1])
        b = b.reshape(-1, b.shape[-1])
        finite = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
        self.finite &= finite
        a = np.where(finite, a, 0.0) - self.shift_a
        b = np.where(finite, b, 0.0) - self.shift_b
        self.count += len(a)
        self.sums += np.stack(
            [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)]
        )

    def r2(self):
        n = self.count
        sum_a, sum_b, sum_aa, sum_bb, sum_ab = self.sums
        var_a = sum_aa / n - (sum_a / n) ** 2
        var_b = sum_bb / n - (sum_b / n) ** 2
        cov = sum_ab / n - (sum_a / n) * (sum_b / n)
        scale_a = sum_aa / n + self.shift_a**2
        scale_b = sum_bb / n + self.shift_b**2
        constant = (var_a <= 1e-12 * np.maximum(scale_a, 1e-30)) | (
            var_b <= 1e-12 * np.maximum(scale_b, 1e-30)
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = cov**2 / (var_a * var_b)
        r2 = np.clip(r2, 0.0, 1.0)
        r2[constant | ~self.finite] = np.nan
        return r2


def activation_r2(reference, model, x, batch_size=64):
    """Per-feature R² of a model's activations against a reference's.

    For each output of the two models (e.g. the activations of each depth
    unit of the pretrained and of the fine-tuned network) and each feature
    (last axis) j, the activations a_j (reference) and b_j (model) are
    paired over all examples and spatial positions, and

        R²_j = cov(a_j, b_j)² / (var(a_j) var(b_j))

    the coefficient of determination of the least-squares line b_j ≈ u a_j
    + v (the squared Pearson correlation). R² = 1 when fine-tuning changed
    feature j by an affine map at most; a feature constant in either model
    (a dead ReLU channel), or not finite (a diverged model), gets NaN. Both
    models run in inference mode.

    Args:
        reference: a `keras.Model` (the pretrained network) with one output
            or a list of outputs.
        model: a `keras.Model` with outputs of the same shapes (the
            fine-tuned network).
        x: NumPy array of inputs.
        batch_size: batch size of the forward passes.

    Returns:
        A list with one float64 array of per-feature R² per output.

    Example:

    >>> import keras, numpy as np
    >>> inputs = keras.Input((3,))
    >>> reference = keras.Model(inputs, inputs)
    >>> model = keras.Model(inputs, 2.0 * inputs + 1.0)
    >>> x = np.random.default_rng(0).normal(size=(10, 3))
    >>> activation_r2(reference, model, x)[0].round(6).tolist()
    [1.0, 1.0, 1.0]

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, section 4.4 and Figure 4.
    """
    from keras import ops

    x = np.asarray(x)
    if len(x) < 2:
        raise ValueError(
            "`x` must hold at least 2 examples to compute an R². Received: "
            f"x of shape {x.shape}"
        )
    moments = None
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        outputs_a = reference(batch, training=False)
        outputs_b = model(batch, training=False)
        if not isinstance(outputs_a, (list, tuple)):
            outputs_a, outputs_b = [outputs_a], [outputs_b]
        outputs_a = [
            ops.convert_to_numpy(o).astype("float64") for o in outputs_a
        ]
        outputs_b = [
            ops.convert_to_numpy(o).astype("float64") for o in outputs_b
        ]
        if moments is None:
            if len(outputs_a) != len(outputs_b) or any(
                a.shape != b.shape
                for a, b in zip(outputs_a, outputs_b, strict=True)
            ):
                raise ValueError(
                    "`reference` and `model` must have outputs of the same "
                    "shapes. Received: "
                    f"{[a.shape[1:] for a in outputs_a]} and "
                    f"{[b.shape[1:] for b in outputs_b]}"
                )
            moments = [
                _Moments(a, b)
                for a, b in zip(outputs_a, outputs_b, strict=True)
            ]
        for moment, a, b in zip(moments, outputs_a, outputs_b, strict=True):
            moment.add(a, b)
    return [moment.r2() for moment in moments]


def mcnemar_test(correct_a, correct_b):
    """McNemar's exact paired test of two classifiers on the same examples.

    Of the examples where exactly one classifier is right, `n_a` are those
    only A gets right and `n_b` those only B gets right. Under the null
    hypothesis that both classifiers have the same accuracy, `n_a` is
    Binomial(n_a + n_b, 1/2), and the two-sided exact p-value is

        p = min(1, 2 * sum_{k <= min(n_a, n_b)} C(n, k) / 2^n),  n = n_a + n_b

    (p = 1 when no example is discordant).

    Args:
        correct_a: boolean array, whether A classifies each example right.
        correct_b: boolean array of the same length for B.

    Returns:
        A dict with `"a_only"` (n_a), `"b_only"` (n_b) and `"p_value"`.

    Example:

    >>> mcnemar_test([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], [0] * 9 + [1])
    {'a_only': 9, 'b_only': 1, 'p_value': 0.021484375}

    Reference:
        McNemar. "Note on the sampling error of the difference between
        correlated proportions or percentages." Psychometrika 12(2), 1947.
        Dietterich. "Approximate statistical tests for comparing supervised
        classification learning algorithms." Neural Computation, 1998.
    """
    correct_a = np.asarray(correct_a)
    correct_b = np.asarray(correct_b)
    if correct_a.ndim != 1 or correct_a.shape != correct_b.shape:
        raise ValueError(
            "`correct_a` and `correct_b` must be 1-D arrays of the same "
            f"length. Received: shapes {correct_a.shape} and "
            f"{correct_b.shape}"
        )
    correct_a = correct_a.astype(bool)
    correct_b = correct_b.astype(bool)
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    n = a_only + b_only
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1))
    p_value = min(1.0, float(2 * tail / 2**n)) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": p_value}
