"""Render the effective config as YAML, each value annotated with its source."""

from __future__ import annotations

import json
from typing import Any

from appliance.config.json_values import SECRET_FIELDS
from appliance.config.loader import LoadedConfig

MASK = "********"


def render_effective_config(loaded: LoadedConfig) -> str:
    """Return the effective config as YAML text with a `# source` comment on each value."""
    dumped = loaded.config.model_dump(mode="json", by_alias=True)
    lines = [f"# config file: {loaded.path or 'none (environment and defaults only)'}"]
    _render(dumped, (), 0, loaded.sources, lines)
    return "\n".join(lines) + "\n"


def _render(
    value: Any,
    path: tuple[str, ...],
    depth: int,
    sources: dict[tuple[str, ...], str],
    lines: list[str],
) -> None:
    indent = "  " * depth
    for key, item in value.items():
        item_path = (*path, str(key))
        if isinstance(item, dict) and item:
            lines.append(f"{indent}{key}:")
            _render(item, item_path, depth + 1, sources, lines)
        elif isinstance(item, list) and item:
            lines.append(f"{indent}{key}:")
            for index, element in enumerate(item):
                element_path = (*item_path, str(index))
                if isinstance(element, dict):
                    lines.append(f"{indent}  -")
                    _render(element, element_path, depth + 2, sources, lines)
                else:
                    lines.append(f"{indent}  - {_scalar(element, element_path, sources)}")
        else:
            lines.append(f"{indent}{key}: {_scalar(item, item_path, sources)}")


def _scalar(value: Any, path: tuple[str, ...], sources: dict[tuple[str, ...], str]) -> str:
    source = sources.get(path, "default")
    secret = source.startswith("secret") or any(p.lower() in SECRET_FIELDS for p in path)
    text = json.dumps(MASK) if secret and value is not None else json.dumps(value)
    return f"{text}  # {source}"
