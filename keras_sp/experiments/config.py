"""Experiment configs: JSON files checked against a dataclass schema.

Each config belongs to one `keras-sp` subcommand. A schema says which with
its class attribute `COMMAND` (e.g. `FinetuneConfig.COMMAND == "finetune"`),
and a config file may say it with the key `"command"`: every config shipped
in `keras_sp/configs/` does. A subcommand lists and finds by name only the
shipped configs whose `"command"` is its own (`shipped_configs`,
`config_path`), and `load_config` refuses a config whose `"command"` names
another subcommand, with an error naming that subcommand. The `"command"`
key is not a field of the schema: it is left out of the loaded config.
"""

import dataclasses
import json
import os
import types
import typing

__all__ = [
    "ConfigError",
    "config_path",
    "load_config",
    "shipped_configs",
]

# The key of a config file naming the subcommand it is for.
COMMAND_KEY = "command"
# The configs shipped with keras-sp.
CONFIG_DIRECTORY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"
)


class ConfigError(ValueError):
    """A config file or value that cannot be used, with the key named."""


def _check_command(what, schema, command):
    """Raises ConfigError if a config's `command` is not `schema.COMMAND`."""
    expected = getattr(schema, "COMMAND", None)
    if command is None or expected is None:
        return
    if not isinstance(command, str):
        raise ConfigError(
            f"Config key '{COMMAND_KEY}' must be str. Received: "
            f"{COMMAND_KEY}={command!r}"
        )
    if command != expected:
        raise ConfigError(
            f"{what} is a config of `keras-sp {command}`, not of `keras-sp "
            f"{expected}`: run it with `keras-sp {command} --config`. "
            f"Received: {COMMAND_KEY}={command!r}"
        )


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


def _shipped():
    """`{name: command}` of every config in `CONFIG_DIRECTORY`."""
    commands = {}
    for file in sorted(os.listdir(CONFIG_DIRECTORY)):
        if file.endswith(".json"):
            with open(os.path.join(CONFIG_DIRECTORY, file)) as handle:
                commands[file[:-5]] = json.load(handle).get(COMMAND_KEY)
    return commands


def shipped_configs(command):
    """The names of the configs shipped with keras-sp for `command`.

    Args:
        command: a `keras-sp` subcommand, e.g. `"finetune"`.

    Returns:
        A sorted list of names (file names without `.json`) whose
        `"command"` key is `command`.

    Example:

    >>> shipped_configs("transferability")
    ['transferability_fashion_mnist', 'transferability_imagenet']
    """
    return [name for name, owner in _shipped().items() if owner == command]


def config_path(name, command):
    """A config file for `command`: `name` itself, or a shipped config.

    Args:
        name: a path to a JSON file, the name of a config shipped in
            `keras_sp/configs/` for `command` (with or without `.json`), or
            None (no config: returns None).
        command: the `keras-sp` subcommand that will run it.

    Returns:
        The path of the file. A path that does not exist is returned as is
        when `command` has no shipped configs (`load_config` then says the
        file cannot be read).

    Raises:
        ConfigError: for the name of a shipped config of another
            subcommand (naming it), or a name that is neither a file nor
            one of `command`'s shipped configs (listing them).

    Example:

    >>> os.path.basename(config_path("caltech256_30", "finetune"))
    'caltech256_30.json'
    """
    if name is None or os.path.exists(name):
        return name
    stem = name[:-5] if name.endswith(".json") else name
    shipped = _shipped()
    own = [config for config, owner in shipped.items() if owner == command]
    if stem in shipped and shipped[stem] != command:
        listing = f" (whose configs are {own})" if own else ""
        raise ConfigError(
            f"Config {name!r} is a config of `keras-sp {shipped[stem]}`, not "
            f"of `keras-sp {command}`{listing}: run `keras-sp "
            f"{shipped[stem]} --config {stem}`. Received: config={name!r}"
        )
    if stem in own:
        return os.path.join(CONFIG_DIRECTORY, stem + ".json")
    if not own:
        return name
    raise ConfigError(
        f"Config file {name!r} does not exist and is not one of keras-sp's "
        f"`{command}` configs {own}. Received: config={name!r}"
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
        ConfigError: for an unreadable file, a `"command"` key naming
            another subcommand than `schema.COMMAND`, an unknown key (named,
            with the allowed keys), a missing required key or a value of
            the wrong type (named with the value received).
    """
    what = "Config"
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
        what = f"Config file {path!r}"
    _check_command(what, schema, values.pop(COMMAND_KEY, None))
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
