"""Reading the files a user writes (YAML, UTF-8 text) so that every problem can name its file, line and field.

Why apart from the loader: the experiment loader, the sweep loader and the dump samples all report
problems the same way (FILE:LINE: field: message), from the YAML node tree kept beside the data.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from crossengine.errors import ExperimentError


def line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """The 1-based line of the deepest YAML node the pydantic location reaches."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == str(part):
                    nxt, line = v, k.start_mark.line + 1
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


def is_file(p: Path) -> bool:
    """Path.is_file() for a path a user wrote: a name the OS refuses (too long, say) is simply no file."""
    try:
        return p.is_file()
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False


def is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False


def exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return False


def duplicate_key(node: yaml.Node | None, loc: tuple = ()) -> tuple[tuple, int] | None:
    """The path and line of the first key given twice in one mapping (YAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            if k.value in seen:
                return loc + (k.value,), k.start_mark.line + 1
            seen.add(k.value)
            found = duplicate_key(v, loc + (k.value,))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            found = duplicate_key(v, loc + (i,))
            if found:
                return found
    return None


def read_text(path: Path, field: str) -> str:
    """A UTF-8 text file; another encoding is one line naming the file, line and column of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        raise ExperimentError(str(path), data.count(b"\n", 0, e.start) + 1, field, f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {e.start - line_start + 1}; save the file as UTF-8") from None


def read_yaml(path: Path) -> tuple[object, yaml.Node | None]:
    """A YAML file's data (yaml.safe_load) and its node tree (for line numbers); a syntax error or a key
    given twice in one mapping (YAML would silently keep the last) is one line naming the file and line."""
    text = read_text(path, "<file>")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        duplicate = duplicate_key(root)
        if duplicate:
            loc, line = duplicate
            raise ExperimentError(str(path), line, field_path(loc), f"duplicate key {loc[-1]!r} (YAML would silently keep the last)")
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = (e.problem or str(e)).strip()
        raise ExperimentError(str(path), line, "<yaml>", f"YAML error: {problem}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (a NUL, a control byte)
        line = text.count("\n", 0, e.position) + 1
        raise ExperimentError(str(path), line, "<yaml>", f"YAML error: character {e.character!r} at position {e.position} is not allowed in YAML") from None
    return data, root


def read_mapping(path: Path, kind: str, shape: str) -> tuple[dict, yaml.Node | None]:
    """read_yaml of a file that must exist and hold a mapping (an experiment, a sweep); else one line saying `shape`."""
    if not is_file(path):
        raise ExperimentError(str(path), None, "<file>", f"no such {kind} file")
    data, root = read_yaml(path)
    if not isinstance(data, dict):
        raise ExperimentError(str(path), 1, "<top>", shape)
    return data, root
