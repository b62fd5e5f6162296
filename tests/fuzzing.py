"""Structured mutations of valid input files, for the parsers' fuzz tests and bench/fuzz.py.

A mutation starts from a valid file and changes one thing a user (or a broken writer) could:
a value swapped for another type, a key dropped or added, unicode, huge numbers, NaN and
infinity, deep nesting; or the bytes themselves: truncated, invalid UTF-8. The oracle is the same
for every parser: either the input is accepted, or exactly one line names the file (with its line
or row) and what is wrong; never a traceback, nothing written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

ODD_VALUES = st.sampled_from(
    [
        None,
        True,
        0,
        -1,
        10**30,
        -(10**30),
        1.5,
        math.nan,
        math.inf,
        -math.inf,
        "",
        "ünïcødé ✓ 😀",
        "a" * 2000,
        "\x00\x01",
        "1e-3",
        [],
        [1, "two", None],
        {},
        {"nested": {"deeper": [1, [2, [3, [4, [5]]]]]}},
        [[[[[[[[[[["deep"]]]]]]]]]]],
    ]
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a nested mapping/list, the root excluded."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _parent(obj: Any, path: tuple) -> Any:
    for p in path[:-1]:
        obj = obj[p]
    return obj


@st.composite
def mutated(draw, base: dict) -> dict:
    """`base` with one structural change at a drawn location."""
    obj = json.loads(json.dumps(base))
    paths = _paths(obj)
    path = draw(st.sampled_from(paths))
    parent, key = _parent(obj, path), path[-1]
    how = draw(st.sampled_from(["replace", "drop", "add", "wrap"]))
    if how == "replace":
        parent[key] = draw(ODD_VALUES)
    elif how == "drop":
        del parent[key]
    elif how == "add" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["colour", "ünknown", "", "0"]))] = draw(ODD_VALUES)
    elif how == "add":
        parent.append(draw(ODD_VALUES))
    else:
        parent[key] = [parent[key]] if draw(st.booleans()) else {"value": parent[key]}
    return obj


def yaml_text(obj: Any) -> str:
    return yaml.safe_dump(obj, allow_unicode=True, sort_keys=False)


@st.composite
def spoilt_bytes(draw, text: str) -> bytes:
    """The file's bytes, truncated or with a byte that is not UTF-8 at a drawn place."""
    data = text.encode()
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if draw(st.booleans()):
        return data[:at]
    return data[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x00", b"\t"])) + data[at:]


def one_line_naming(message: str, path: Path) -> bool:
    """The oracle's error side: one line, starting with `error: ` and the file's name, saying something after it."""
    lines = message.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith(f"error: {path}") and len(lines[0]) > len(f"error: {path}: ") and "Traceback" not in message
