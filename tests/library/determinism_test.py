"""The same seed gives the same numbers twice on CPU, bit for bit.

Covers `keras_sp.regularize` + `model.fit` for every kind of penalty and
`keras_sp.fisher.diagonal_fisher` in every mode (the runners:
`tests/experiments/determinism_runners_test.py`). Each check has a control
that changes the seed and must change the numbers, so that equality is not
vacuous.
"""

import keras
import numpy as np
import pytest

import keras_sp
from keras_sp import fisher

# (1) regularize + fit, every kind.


def train(kind, seed):
    """A small classifier with dropout, regularized with `kind`, fit for 2
    shuffled epochs; returns its weights."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="shared"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3, name="head"),
        ]
    )
    weights = None
    if kind in ("l2_sp_fisher", "group_lasso_sp_fisher"):
        weights = {
            v.path: np.linspace(0.5, 2.0, int(np.prod(v.shape)))
            .reshape(v.shape)
            .astype("float32")
            for v in model.trainable_variables
        }
    keras_sp.regularize(
        model, kind, alpha=0.1, beta=0.01, new_layers=["head"], fisher=weights
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = rng.integers(0, 3, 40)
    start = [np.array(w) for w in model.get_weights()]
    model.fit(x, y, batch_size=8, epochs=2, shuffle=True, verbose=0)
    final = model.get_weights()
    assert any(
        not np.array_equal(a, b) for a, b in zip(start, final, strict=True)
    )
    return final


@pytest.mark.parametrize("kind", keras_sp.penalties.KINDS)
def test_regularize_and_fit_twice_with_one_seed(kind):
    for a, b in zip(train(kind, 0), train(kind, 0), strict=True):
        np.testing.assert_array_equal(a, b)


def test_another_seed_gives_other_weights():
    """The control: the seed reaches the initialization, dropout and the
    shuffling, so the equality above is not vacuous."""
    first, other = train("l2_sp", 0), train("l2_sp", 1)
    assert any(
        not np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


# (2) diagonal_fisher, every mode.


@pytest.fixture(scope="module")
def source():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.Dense(4, activation="softmax", name="head"),
        ]
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 5)).astype("float32")
    y = rng.integers(0, 4, 12)
    return model, x, y


def assert_same_fisher(one, two):
    assert list(one) == list(two)
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])


def differs(one, two):
    return any(not np.array_equal(one[key], two[key]) for key in one)


@pytest.mark.parametrize(
    "mode, options",
    [
        ("exact", {}),
        ("empirical", {}),
        ("sampled", {"seed": 3, "samples": 2}),
    ],
)
def test_diagonal_fisher_twice(source, mode, options):
    model, x, y = source

    def compute(**extra):
        return fisher.diagonal_fisher(
            model, (x, y), mode=mode, batch_size=5, **{**options, **extra}
        )

    first = compute()
    assert_same_fisher(first, compute())
    assert all(np.all(value > 0) for value in first.values())
    if mode == "sampled":
        assert differs(first, compute(seed=4))


def test_sampled_fisher_without_a_seed_follows_the_global_seed(source):
    """seed=None draws from NumPy's global generator, which
    `keras.utils.set_random_seed` seeds."""
    model, x, _ = source
    results = []
    for seed in (7, 7, 8):
        keras.utils.set_random_seed(seed)
        results.append(fisher.diagonal_fisher(model, x, mode="sampled"))
    assert_same_fisher(results[0], results[1])
    assert differs(results[0], results[2])
