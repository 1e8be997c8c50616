"""JSON values of environment variables and secret files for list and mapping fields.

A variable or secret file that sets a list, a section or a map of entries contains JSON,
such as `["10.0.0.0/8"]` or `{"max_connections": 5}`. This module finds which names need JSON
and describes a value that is not JSON of the expected shape, naming the variable or file
and the fix.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

# Field names whose values are never printed, in errors or in the effective config.
SECRET_FIELDS = frozenset({"password", "secret", "token"})

# Maximum length of a value quoted in a message; longer values are cut and end in "...".
MAX_SHOWN_LENGTH = 60

# Maximum items of a list example built from a value that is not JSON.
MAX_EXAMPLE_ITEMS = 4


@dataclass(frozen=True)
class JsonField:
    """A field that a variable or secret file sets with one JSON value."""

    kind: Literal["list", "section", "map"]
    """`list` for lists, `section` for a model, `map` for a dict of entries by name."""
    item: Any
    """Item type of a list, or value type of a map; the model itself for a section."""
    examples: tuple[Any, ...] = ()
    """Example values of the field, from its `Field(examples=...)`, if any."""


def json_field(model: type[BaseModel], path: Sequence[str]) -> JsonField | None:
    """Return the field at `path` (keys in any case) if it takes JSON, else None.

    A key of a map stands for an entry name, so `("listeners", "imap", "proxy_protocol")`
    reaches the `proxy_protocol` section of any listener. A path into a list item, or
    to a key that no model has, returns None, and validation reports it later.
    """
    found = _field_at(model, path)
    if found is None:
        return None
    annotation, examples = found
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        items = get_args(annotation)
        return JsonField("list", items[0] if items else Any, examples)
    if origin is dict:
        return JsonField("map", get_args(annotation)[1], examples)
    if _is_model(annotation):
        return JsonField("section", annotation, examples)
    return None


def is_single_value_field(model: type[BaseModel], path: Sequence[str]) -> bool:
    """Return whether `path` (keys in any case) names a field that takes no JSON.

    Such a field, such as a port or a host name, takes its value as text, so a variable
    or secret file cannot set it to null.
    """
    return _field_at(model, path) is not None and json_field(model, path) is None


def _field_at(
    model: type[BaseModel], path: Sequence[str]
) -> tuple[Any, tuple[Any, ...]] | None:
    """Return the unwrapped annotation and examples of the field at `path`, or None.

    None means that `path` leads into a list item or names no field.
    """
    if not all(path):
        # An empty part, as in APPLIANCE_LISTENERS__, names no field or entry.
        return None
    annotation: Any = model
    examples: tuple[Any, ...] = ()
    for key in path:
        annotation = _unwrap(annotation)
        if get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
            examples = ()
            continue
        if not _is_model(annotation):
            return None
        found = _model_field(annotation, key)
        if found is None:
            return None
        annotation, examples = found
    return _unwrap(annotation), examples


def list_field_depth(model: type[BaseModel], path: Sequence[str]) -> int | None:
    """Return the length of the part of `path` that names a list field, or None.

    None means that no leading part of `path`, shorter than `path` itself, names a list
    field. So `("known_servers", "0", "port")` returns 1, and `("known_servers",)`
    returns None, because a variable or secret file may set the whole list.
    """
    for depth in range(1, len(path)):
        field = json_field(model, path[:depth])
        if field is not None and field.kind == "list":
            return depth
    return None


def _model_field(model: type[BaseModel], key: str) -> tuple[Any, tuple[Any, ...]] | None:
    """Return the annotation and examples of the field named `key` or aliased so."""
    for name, info in model.model_fields.items():
        if key.lower() in (name.lower(), (info.alias or name).lower()):
            return info.annotation, tuple(info.examples or ())
    return None


def _unwrap(annotation: Any) -> Any:
    """Strip `Annotated` and `| None` from an annotation, keeping other unions."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def is_secret_path(path: Sequence[str]) -> bool:
    """Return whether a field path names a secret, whose value is never printed."""
    return any(part.lower() in SECRET_FIELDS for part in path)


def shorten(value: str) -> str:
    """Return a value cut to MAX_SHOWN_LENGTH characters for a message."""
    if len(value) <= MAX_SHOWN_LENGTH:
        return value
    return value[: MAX_SHOWN_LENGTH - 3] + "..."


@dataclass(frozen=True)
class JsonOrigin:
    """Source of a JSON value: an environment variable or a secret file."""

    kind: Literal["variable", "secret file"]
    name: str
    """Variable name, such as APPLIANCE_LIMITS, or the secret file's name."""
    label: str
    """Source as messages name it, such as `env APPLIANCE_LIMITS`."""
    show_value: bool
    """Whether the value may appear in messages; never for secret files."""


def decode_json_value(
    text: str, field: JsonField, path: Sequence[str], origin: JsonOrigin
) -> tuple[Any, str | None]:
    """Decode the JSON value of a list or mapping field.

    Returns the decoded value and None, or the text and a problem line that names the
    field path, the variable or file, what is wrong and the fix. JSON null passes, so
    that validation can accept it for an optional field or reject it with its own error.
    """
    where = ".".join(path)
    value_text = f" value {shorten(text)!r}" if origin.show_value else " the value"
    try:
        decoded = json.loads(text)
    except ValueError as exc:
        detail = ""
        if isinstance(exc, json.JSONDecodeError) and text.lstrip()[:1] in ("[", "{"):
            # Only a value that was meant as JSON gets the parser's reason.
            detail = f" ({exc.msg.lower()} at character {exc.pos})"
        problem = (
            f"{where}:{value_text} (from {origin.label}) is not valid JSON{detail}; "
            f"{_fix(text, field, origin)}"
        )
        return text, problem
    expected = list if field.kind == "list" else dict
    if decoded is not None and not isinstance(decoded, expected):
        article = "a JSON list" if field.kind == "list" else "a JSON object"
        problem = (
            f"{where}:{value_text} (from {origin.label}) is JSON but not {article}; "
            f"{_fix(text, field, origin)}"
        )
        return text, problem
    return decoded, None


def _fix(text: str, field: JsonField, origin: JsonOrigin) -> str:
    """Describe the expected JSON value of a field, with an example where one exists."""
    if field.kind == "list":
        example = _list_example(text, field, origin)
        such_as = f", such as {json.dumps(example)!r}" if example is not None else ""
        return f"this field is a list, so give a JSON list{such_as}"
    if field.kind == "section":
        keys = list(field.item.model_fields)
        key_name = f"{origin.name}__{keys[0].upper()}" if keys else f"{origin.name}__KEY"
        return (
            "this field is a section, so give a JSON object of its keys, or set each "
            f"key with its own {origin.kind}, such as {key_name}"
        )
    entry_name = f"{origin.name}__NAME"
    if _is_model(field.item) and field.item.model_fields:
        entry_name += "__" + next(iter(field.item.model_fields)).upper()
    return (
        "this field is a map of entries by name, so give a JSON object of entries, "
        f"or set each key of an entry with its own {origin.kind}, such as {entry_name}"
    )


_LIST_SEPARATORS = re.compile(r"[,\s]+")


def _list_example(text: str, field: JsonField, origin: JsonOrigin) -> Any | None:
    """Return an example list: the field's own, or the value's items when they show.

    A list of plain values written without JSON, such as `10.0.0.0/8, 192.0.2.0/24`,
    becomes the JSON list of those items, which is most likely what was meant.
    """
    if origin.show_value and not _is_model(_unwrap(field.item)):
        items = [part.strip("[]\"' ") for part in _LIST_SEPARATORS.split(text)]
        items = [item for item in items if item][:MAX_EXAMPLE_ITEMS]
        if items:
            return items
    return field.examples[0] if field.examples else None
