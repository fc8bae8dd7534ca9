"""Variable paths: the one rule keras-sp uses to match arrays to variables.

Starting points and Fisher weights are keyed by `variable.path`. A source
model nested in the target (or the target's backbone used alone as the
source), and Keras's own path change on save/load, give paths that differ by
a leading scope; they match as a '/'-aligned suffix, the exact path first.
"""


class _Missing:
    def __repr__(self):
        return "MISSING"


MISSING = _Missing()


class PathDict(dict):
    """A dict keyed by `variable.path` whose lookups survive a Keras path
    change.

    Keras may give a variable another path after a save/load (a nested
    model's scope dropped: `"backbone/c1/kernel"` becomes `"c1/kernel"`).
    `d[path]`, `path in d` and `d.get(path)` find the entry whose key equals
    `path` or is a '/'-aligned suffix of it (or the reverse), as
    `keras_sp.regularize` matches starting points and Fisher weights. An
    ambiguous path (several keys match) raises a `KeyError` naming them.

    Example:

    >>> d = PathDict({"c1/kernel": 1})
    >>> d["backbone/c1/kernel"], "backbone/c1/kernel" in d
    (1, True)
    """

    def _key(self, path):
        if dict.__contains__(self, path):
            return path
        if not isinstance(path, str):
            return MISSING
        candidates = matching_keys(self, path)
        if len(candidates) > 1:
            raise KeyError(
                f"'{path}' matches several entries: {sorted(candidates)}; "
                "use the exact path"
            )
        return candidates[0] if candidates else MISSING

    def __getitem__(self, path):
        key = self._key(path)
        if key is MISSING:
            raise KeyError(path)
        return dict.__getitem__(self, key)

    def __contains__(self, path):
        return self._key(path) is not MISSING

    def get(self, path, default=None):
        key = self._key(path)
        return default if key is MISSING else dict.__getitem__(self, key)


def matching_keys(mapping, path):
    """The keys of `mapping` for a variable `path`: exactly, or as a
    '/'-aligned suffix.

    A source model nested in the target (or the target's backbone used alone
    as the source) gives paths that differ by a leading scope, so
    `"resnet50/conv1_conv/kernel"` matches `"conv1_conv/kernel"`. The
    Fisher module matches saved Fisher files by the same rule.
    """
    if (
        dict.__contains__(mapping, path)
        if isinstance(mapping, dict)
        else (path in mapping)
    ):
        return [path]
    return [
        key
        for key in list(mapping)
        if path.endswith("/" + key) or key.endswith("/" + path)
    ]


def lookup(mapping, path, argument):
    """Finds `path` in `mapping` (see `matching_keys`), or `MISSING`."""
    candidates = matching_keys(mapping, path)
    if len(candidates) > 1:
        raise ValueError(
            f"`{argument}` has several entries matching variable '{path}': "
            f"{sorted(candidates)}. Pass a mapping keyed by the exact "
            "`variable.path` of the model's variables."
        )
    if candidates:
        return mapping[candidates[0]]
    return MISSING


def check_unique_paths(model):
    counts = {}
    for variable in model.weights:
        counts[variable.path] = counts.get(variable.path, 0) + 1
    repeated = sorted(path for path, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(
            f"Model '{model.name}' has several variables with the same path "
            f"({repeated[:3]}); keras-sp keys starting points and Fisher "
            "weights by `variable.path`. Give the layers unique names."
        )
