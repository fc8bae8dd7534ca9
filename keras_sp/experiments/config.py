"""Experiment configs: JSON files checked against a dataclass schema."""

import dataclasses
import json
import os
import types
import typing

__all__ = [
    "ConfigError",
    "load_config",
]


class ConfigError(ValueError):
    """A config file or value that cannot be used, with the key named."""


def _type_name(expected):
    return getattr(expected, "__name__", None) or str(expected).replace(
        "typing.", ""
    )


def _check(key, value, expected):
    """Returns `value` converted to `expected`, or raises ConfigError."""
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _check(key, value, option)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(
            f"Config key '{key}' must be {_type_name(expected)}. Received: "
            f"{key}={value!r}"
        )
    if expected is type(None):
        if value is None:
            return None
    elif expected is typing.Any:
        return value
    elif expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else typing.Any
            return [_check(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif origin is dict or expected is dict:
        if isinstance(value, dict):
            value_type = args[1] if len(args) == 2 else typing.Any
            return {
                str(k): _check(f"{key}.{k}", v, value_type)
                for k, v in value.items()
            }
    else:
        raise TypeError(f"Unsupported config type {expected!r} for '{key}'")
    raise ConfigError(
        f"Config key '{key}' must be {_type_name(expected)}. Received: "
        f"{key}={value!r}"
    )


def load_config(source, schema, **overrides):
    """Reads a config and checks every key and type against `schema`.

    Args:
        source: a path to a JSON file, a dict, or None (all defaults).
        schema: a dataclass type whose fields (with type hints and defaults)
            are the allowed keys.
        **overrides: values that replace the file's (for command-line flags).

    Returns:
        An instance of `schema`.

    Raises:
        ConfigError: for an unreadable file, an unknown key (named, with the
            allowed keys), a missing required key or a value of the wrong
            type (named with the value received).
    """
    if source is None:
        values = {}
    elif isinstance(source, dict):
        values = dict(source)
    else:
        path = os.fspath(source)
        try:
            with open(path) as handle:
                values = json.load(handle)
        except OSError as error:
            raise ConfigError(
                f"Cannot read config file {path!r}: {error.strerror}"
            ) from None
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"Config file {path!r} is not valid JSON: {error}"
            ) from None
        if not isinstance(values, dict):
            raise ConfigError(
                f"Config file {path!r} must hold a JSON object. Received: "
                f"{type(values).__name__}"
            )
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(schema)
    fields = {field.name: field for field in dataclasses.fields(schema)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown config key '{unknown[0]}'. Allowed keys: "
            f"{sorted(fields)}. Received: {unknown[0]}={values[unknown[0]]!r}"
        )
    checked = {}
    for name, field in fields.items():
        if name in values:
            checked[name] = _check(name, values[name], hints[name])
        elif (
            field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"Config key '{name}' is required.")
    config = schema(**checked)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config
