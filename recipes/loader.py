"""The one strict recipe loader: YAML → frozen dataclasses, with `a.b=value` overrides applied last.

Every user mistake is a `RecipeError` whose message names the file, the key's dotted place and
what would be right; the CLI prints it and exits with code 2, without a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import Range

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class RecipeError(ConfigError):
    """A mistake in a recipe or an override: printed to the user as is, exit code 2."""


class OutOfRange(RecipeError):
    """A number of the right type outside its field's range (or not finite)."""


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of settings; anything this large is a mistake


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter: a key given twice in one mapping is an error (plain YAML keeps the last
    silently), and anchors / aliases are refused (nothing in a recipe needs them, and nested aliases expand
    exponentially: a few lines can ask for gigabytes)."""

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(
                f"line {mark.line + 1}: YAML aliases (*name) are not allowed in recipes; write the value out"
            )
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise yaml.YAMLError(
                f"line {event.start_mark.line + 1}: YAML anchors (&{event.anchor}) are not allowed in recipes"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.YAMLError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} given twice in one section "
                    f"(first on line {seen[key]}); keep one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: str) -> Any:
    """Parse YAML with the strict loader (see ``_StrictLoader``); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {len(raw):,} bytes is no recipe (the limit is {MAX_RECIPE_BYTES:,})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r}); save it as UTF-8"
        ) from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` → (['optim', 'lr'], 0.0003). The value is parsed as YAML (`true`, `[1, 2]`, ...)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like section.key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists → tuples, dicts → dataclasses).
    ``Annotated[T, Range(...)]`` checks the converted value's range too (pretrain/ranges.py)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        converted = _convert(value, base, where, source)
        for extra in extras:
            if isinstance(extra, Range) and converted is not None and not extra.holds(converted):
                kind = "an integer" if base is int else "a finite number"
                raise OutOfRange(f"{source}: {where} must be {kind} {extra.describe()}, got {value!r}")
        return converted
    bad = RecipeError(f"{source}: {where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        out_of_range = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where, source)
            except OutOfRange as e:  # the right type, a wrong value: say so rather than "must be int | null"
                out_of_range = out_of_range or e
            except RecipeError:
                continue
        raise out_of_range or bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {where} must be a section (mapping), got {type(value).__name__}")
        return build(tp, value, where, source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            number = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        else:
            raise bad
        if not math.isfinite(number):
            raise OutOfRange(f"{source}: {where} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, tp):
        return value
    raise bad


def build(cls: type, data: dict[str, Any], where: str = "", source: str = "recipe") -> Any:
    """Build the dataclass `cls` from `data`, strictly: unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        place = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            section = f"section '{where}'" if where else "the top level"
            raise RecipeError(
                f"{source}: unknown key '{place}' in {section}{hint}; allowed keys: {', '.join(fields)}"
            )
        kwargs[key] = _convert(value, hints[key], place, source)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        places = ", ".join(f"{where}.{m}" if where else m for m in missing)
        raise RecipeError(f"{source}: missing required key(s): {places}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{source}: section '{where or cls.__name__}': {e}") from None


def to_plain(obj: Any) -> Any:
    """Dataclasses → dicts, tuples → lists: the resolved config as written into a run folder."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        yaml.safe_dump(to_plain(obj), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
