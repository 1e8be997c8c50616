"""Render the config reference (docs/configuration.md) from the JSON Schema of the models.

The page is generated, so it cannot drift from the models; a test compares the checked-in
page with this output.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.config.settings import ENV_PREFIX, NESTING_DELIMITER, AppConfig

HEADER = """\
# Configuration reference

Generated from the config models by `appliance schema --format markdown`; do not edit by hand.

Every key can come from the config file (YAML, TOML or JSON), from an environment variable, or
from a file in the secrets folder named like that variable. Precedence, highest first:
environment, secrets folder, config file, default. Names in `listeners` and `upstreams` are
yours to choose; the variable names below use `NAME` for them. An environment variable set
to the empty string counts as unset.

A variable or secret file for a list, a section or a map of entries contains JSON, marked
"JSON list" or "JSON object" below: for example
`APPLIANCE_LISTENERS__NAME__PROXY_PROTOCOL__TRUSTED_NETWORKS='["10.0.0.0/8"]'` or
`APPLIANCE_LIMITS='{"max_connections": 5}'`. The keys of a section and of a map entry also
have variables of their own, such as `APPLIANCE_LIMITS__MAX_CONNECTIONS=5`, which take
plain text and win over the same key in the JSON, whatever the order of the variables.
List items have none, so a list is set as a whole.

Fields of type integer or number take numbers, such as `30` or `1.5`, and environment
variables give them as text. A boolean in such a field is rejected, and so are YAML's `yes`,
`no`, `on` and `off`, which YAML reads as booleans.
"""


def render_reference() -> str:
    """Return the Markdown config reference."""
    schema = AppConfig.model_json_schema(by_alias=True)
    definitions = schema.get("$defs", {})
    lines = [HEADER]
    lines += _section("Top level", schema, definitions, ())
    for key, prefix in (
        ("listeners", ("listeners", "NAME")),
        ("upstreams", ("upstreams", "NAME")),
        ("known_servers", ("known_servers", "N")),
    ):
        model = _item_model(schema["properties"][key], definitions)
        if model is not None:
            lines += _section(f"`{key}` entries", definitions[model], definitions, prefix)
            lines += _nested_sections(definitions[model], definitions, prefix)
    for key, value in schema["properties"].items():
        model = _ref_name(value)
        if model is not None and key not in ("listeners", "upstreams", "known_servers"):
            lines += _section(f"`{key}`", definitions[model], definitions, (key,))
    return "\n".join(lines).rstrip() + "\n"


def _section(
    title: str, model: dict[str, Any], definitions: dict[str, Any], prefix: tuple[str, ...]
) -> list[str]:
    lines = [f"## {title}", ""]
    if model.get("description"):
        lines += [_one_line(model["description"]), ""]
    lines += [
        "| key | type | default | environment variable | description |",
        "|---|---|---|---|---|",
    ]
    required = set(model.get("required", []))
    for key, field in model.get("properties", {}).items():
        default = "required" if key in required else _format_default(field.get("default"))
        if "default" not in field and key not in required:
            default = "empty" if "$ref" not in field else "see below"
        variable = "`" + ENV_PREFIX + NESTING_DELIMITER.join((*prefix, key)).upper() + "`"
        json_kind = _json_kind(field)
        if json_kind is not None:
            variable += f" ({json_kind})"
        if "N" in prefix:
            # Lists have no per-item variables; the whole list is one JSON value.
            list_path = NESTING_DELIMITER.join(prefix[: prefix.index("N")]).upper()
            variable = f"in `{ENV_PREFIX}{list_path}` (JSON list)"
        lines.append(
            f"| `{key}` | {_type_of(field, definitions)} | {default} | {variable} | "
            f"{_one_line(field.get('description', ''))} |"
        )
    lines.append("")
    return lines


def _nested_sections(
    model: dict[str, Any], definitions: dict[str, Any], prefix: tuple[str, ...]
) -> list[str]:
    """Return sections for the fields of an entry that are sections or lists of them."""
    lines: list[str] = []
    for key, field in model.get("properties", {}).items():
        options = field.get("anyOf", [field])
        for option in options:
            name = _ref_name(option)
            path = (*prefix, key)
            if name is None and isinstance(option.get("items"), dict):
                name = _ref_name(option["items"])
                path = (*path, "N")
            if name is None:
                continue
            title = ".".join(part for part in path if part != "N")
            suffix = " entries" if path[-1] == "N" else ""
            heading = f"`{title}`{suffix}"
            lines += _section(heading, definitions[name], definitions, path)
            lines += _nested_sections(definitions[name], definitions, path)
    return lines


def _type_of(field: dict[str, Any], definitions: dict[str, Any]) -> str:
    if "enum" in field:
        # Lower-case aliases of upper-case values (log levels) are listed once.
        values = [v for v in field["enum"] if not (str(v).islower() and str(v).upper() in field["enum"])]
        return " \\| ".join(f"`{v}`" for v in values)
    if "const" in field:
        return f"`{field['const']}`"
    if "anyOf" in field:
        kinds = [_type_of(option, definitions) for option in field["anyOf"]]
        named = " or ".join(kind for kind in kinds if kind != "null")
        return named + (" or null" if "null" in kinds else "")
    if "$ref" in field:
        return "section"
    kind = field.get("type", "any")
    if kind == "object" and "additionalProperties" in field:
        return "map of entries"
    if kind == "array":
        item_kind = field.get("items", {}).get("type")
        return f"list of {item_kind}s" if item_kind == "string" else "list of entries"
    bounds = []
    if "minimum" in field:
        bounds.append(f">= {field['minimum']}")
    if "exclusiveMinimum" in field:
        bounds.append(f"> {field['exclusiveMinimum']}")
    if "maximum" in field:
        bounds.append(f"<= {field['maximum']}")
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _json_kind(field: dict[str, Any]) -> str | None:
    """Return the kind of JSON that a variable for this field takes, or None for text."""
    for option in field.get("anyOf", [field]):
        if "$ref" in option or option.get("type") == "object":
            return "JSON object"
        if option.get("type") == "array":
            return "JSON list"
    return None


def _format_default(value: Any) -> str:
    if value is None:
        return "unset"
    if value == {} or value == []:
        return "empty"
    return f"`{json.dumps(value)}`"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _ref_name(field: dict[str, Any]) -> str | None:
    ref = field.get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _item_model(field: dict[str, Any], definitions: dict[str, Any]) -> str | None:
    for key in ("additionalProperties", "items"):
        if isinstance(field.get(key), dict):
            return _ref_name(field[key])
    return None
