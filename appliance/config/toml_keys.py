"""Name the key in tomllib's errors about a key or table that is set twice.

tomllib (checked with Python 3.11 to 3.13) reports a repeated key as "Cannot overwrite a
value (at line 8, column 19)", without the key. The statement that failed is found again by
parsing the lines that end at the reported line, and its table by parsing the lines
before it, so that the message can name the full key, such as `upstreams.mail.host`.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

# tomllib's messages for a key or table header that repeats an earlier one.
_REPEATED_KEY_MESSAGES = (
    "Cannot overwrite a value",
    "Cannot declare ",
    "Duplicate inline table key ",
)
_POSITION = re.compile(r" \(at line (\d+), column \d+\)$")

# Lines searched back from the reported line for the start of the failed statement. A
# multi-line array or string in a config file spans far fewer lines.
MAX_STATEMENT_LINES = 200

# A bare key, unknown to the config models, that is added after the lines before the
# failed statement to find the table that the statement belongs to.
_PROBE_KEY = "appliance-toml-probe-7f3a"

REPEATED_KEY_FIX = "merge the two entries or rename one"


def describe_toml_error(text: str, exc: tomllib.TOMLDecodeError) -> str:
    """Return tomllib's message for `text`, naming the key and the fix if a key repeats."""
    message = " ".join(str(exc).split())
    position = _POSITION.search(message)
    if position is None or not message.startswith(_REPEATED_KEY_MESSAGES):
        return message
    lines = text.split("\n")
    found = _failed_statement(lines, int(position.group(1)))
    if found is None:
        return f"{message}; a key or table is given twice, so {REPEATED_KEY_FIX}"
    start, key = found
    return (
        f"key {'.'.join(key)!r} on line {start} repeats a key set earlier in the file; "
        f"{REPEATED_KEY_FIX}"
    )


def _failed_statement(lines: list[str], end: int) -> tuple[int, list[str]] | None:
    """Return the first line and the full key of the statement that ends on line `end`.

    The shortest run of lines ending there that parses on its own is the statement,
    because the tail of a multi-line array or string does not parse without its start.
    Returns None when no such run is found, or when the lines before it do not parse.
    """
    for start in range(end, max(end - MAX_STATEMENT_LINES, 0), -1):
        statement = "\n".join(lines[start - 1 : end])
        try:
            parsed = tomllib.loads(statement)
        except tomllib.TOMLDecodeError:
            continue
        if not parsed:
            continue
        before = "\n".join(lines[: start - 1])
        if statement.lstrip().startswith("["):
            key = _header_key(parsed)
        else:
            table = _table_of_next_line(before)
            relative = _assigned_key(statement)
            if table is None or relative is None:
                return None
            key = table + relative
        return start, _existing_part(before, key)
    return None


def _header_key(parsed: dict[str, Any]) -> list[str]:
    """Return the key of a parsed `[table]` or `[[array]]` header."""
    key: list[str] = []
    value: Any = parsed
    while isinstance(value, dict) and len(value) == 1:
        name, value = next(iter(value.items()))
        key.append(name)
    return key


def _assigned_key(statement: str) -> list[str] | None:
    """Return the dotted key of a `key = value` statement, relative to its table.

    The key ends at the first `=` after which a plain value parses, because a quoted
    key may contain `=` itself.
    """
    first_line = statement.split("\n", 1)[0]
    for index, character in enumerate(first_line):
        if character != "=":
            continue
        try:
            value: Any = tomllib.loads(first_line[:index] + "= 0")
        except tomllib.TOMLDecodeError:
            continue
        key = []
        while isinstance(value, dict):
            name, value = next(iter(value.items()))
            key.append(name)
        return key
    return None


def _table_of_next_line(before: str) -> list[str] | None:
    """Return the key of the table that a statement after `before` belongs to.

    An item of an array of tables appears as its index.
    """
    try:
        document = tomllib.loads(f"{before}\n{_PROBE_KEY} = 0\n")
    except tomllib.TOMLDecodeError:
        return None
    return _find_probe(document)


def _find_probe(value: Any) -> list[str] | None:
    if isinstance(value, dict):
        if _PROBE_KEY in value:
            return []
        items = list(value.items())
    elif isinstance(value, list):
        items = [(str(index), item) for index, item in enumerate(value)]
    else:
        return None
    for name, item in items:
        found = _find_probe(item)
        if found is not None:
            return [name, *found]
    return None


def _existing_part(before: str, key: list[str]) -> list[str]:
    """Return the part of `key` that the lines before the statement already set.

    For `a = 1` followed by `a.b = 2`, that is `a`. For a key that is set twice, it is
    the whole key.
    """
    try:
        value: Any = tomllib.loads(before)
    except tomllib.TOMLDecodeError:
        return key
    for depth, name in enumerate(key):
        if isinstance(value, list) and name.isdigit() and int(name) < len(value):
            value = value[int(name)]
        elif isinstance(value, dict) and name in value:
            value = value[name]
        else:
            return key
        if not isinstance(value, (dict, list)):
            return key[: depth + 1]
    return key
