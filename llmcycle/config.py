"""Recipes: YAML files that hold a whole stage configuration, checked before any work starts.

A recipe maps onto nested dataclasses. `load_config` reads the YAML, applies command-line overrides
(`train.lr=3e-4`, values parsed as YAML scalars), and builds the dataclasses, refusing unknown keys,
wrong types and invalid choices with the key's dotted name and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from llmcycle.errors import ConfigError

T = TypeVar("T")

PACKAGE_RECIPES = Path(__file__).parent / "recipes"


def resolve_recipe(path: str | Path) -> Path:
    """A recipe path as given, or the name of one shipped with llmcycle (`tiny`, `recipes/tiny.yaml`)."""
    p = Path(path)
    if p.exists():
        return p
    for candidate in (PACKAGE_RECIPES / p.name, PACKAGE_RECIPES / f"{p.name}.yaml"):
        if candidate.exists():
            return candidate
    shipped = sorted(f.stem for f in PACKAGE_RECIPES.glob("*.yaml"))
    raise ConfigError(f"recipe {str(path)!r} not found{did_you_mean(p.stem, shipped)} "
                      f"(shipped recipes: {', '.join(shipped)}).")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    data: dict[str, Any] = {}
    source = "key=value overrides"  # with no recipe file, a wrong key can only have come from them
    if path is not None:
        p = resolve_recipe(path)
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e}).") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a recipe must be a mapping of keys to values, got {type(loaded).__name__}.")
        data = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (for example train.lr=3e-4).")
        _set_dotted(data, key.strip(), _parse_scalar(raw))
    return build(cls, data, source=source)


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def build(cls: type[T], data: dict[str, Any], source: str = "recipe", prefix: str = "", base: T | None = None) -> T:
    """`cls` from a recipe mapping, checked. Keys the recipe leaves out keep their defaults: those of `base`
    when given, else the field defaults; a nested section starts from its field's default instance, so a
    config can give a shared section its own defaults (`field(default_factory=lambda: Section(lr=...))`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'recipe'} must be a mapping, got {data!r}.")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'{did_you_mean(unknown[0], fields, prefix)}; "
            f"valid keys at {where}: {', '.join(fields)}."
        )
    kwargs = {}
    for name, value in data.items():
        start = _default_instance(fields[name], base) if dataclasses.is_dataclass(hints[name]) else None
        kwargs[name] = _convert(hints[name], value, f"{prefix}{name}", source, start)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _default_instance(f: dataclasses.Field, parent: Any = None) -> Any:
    """A nested section's default: the parent's value when there is a parent instance, else the field's."""
    if parent is not None:
        return getattr(parent, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def did_you_mean(word: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    """` (did you mean 'prefix.close'?)` for the nearest choice to a misspelled `word`, else ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _convert(tp: Any, value: Any, key: str, source: str, base: Any = None) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, source, prefix=key + ".",
                     base=base if isinstance(base, tp) else None)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, source, base)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{source}: {key} = {value!r} has the wrong type; expected {_describe(tp)}.")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{source}: {key} = {value!r} is not a valid choice; choose one of: "
                f"{', '.join(map(str, choices))}."
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}.")
        (item,) = get_args(tp) or (Any,)
        return [_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}.")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e4 in YAML
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: {key} = {value!r} has the wrong type; expected {_describe(tp)}.")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe_fields(cls: type, prefix: str = "", base: Any = None) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every leaf field: used by `--help` to list options. Defaults
    are those of `base` when given; a nested section's are its field's default instance's."""
    rows = []
    hints = get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, prefix + f.name + ".", _default_instance(f, base)))
            continue
        default = _default_instance(f, base)
        rows.append((prefix + f.name, _describe(tp), default, help_text))
    return rows


def field_help(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with help text shown by `llmcycle <stage> --help`."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: typing.cast(Any, default).copy(), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help}, **kw)
