"""mkdocs hooks: the reference pages' tables are generated from the code they describe.

Why generated: a hand-copied field list drifts the day a field is added; these tables are read
from the pydantic schema, the typer app, the Arrow schemas, the engines' traits and the modules'
own docstrings each time the site is built (`mkdocs build --strict`, run by the test suite).
A page asks for a table with an HTML comment such as `<!-- gen:cli -->`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import types
import typing

import typer.main
from pydantic import BaseModel

from crossengine import schemas
from crossengine.adapters import engine_class, registered
from crossengine.adapters.base import EngineTraits
from crossengine.cli import app
from crossengine.compare import keys as framework_keys
from crossengine.experiment.schema import Experiment

_MARK = re.compile(r"<!-- gen:(\w+)(?: ([\w.]+))? -->")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type_name(annotation: object) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    return re.sub(r"\b(typing|crossengine)\.[\w.]*?(\w+)\b", r"\2", text).replace("NoneType", "None")


def _models(model: type[BaseModel], prefix: str, seen: set) -> list[tuple[str, type[BaseModel]]]:
    """The model and every nested model its fields hold, depth first, each once."""
    out = [(prefix, model)]
    seen.add(model)
    for name, field in model.model_fields.items():
        for arg in _flatten(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                out += _models(arg, f"{prefix}.{name}" if prefix else name, seen)
    return out


def _flatten(annotation) -> list:
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [a for arg in args for a in _flatten(arg)]


def experiment_tables(_: str | None) -> str:
    parts = []
    for path, model in _models(Experiment, "", set()):
        title = path or "top level"
        parts.append(f"### `{title}` ({model.__name__})\n\n| field | type | default | what |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            parts.append(f"| `{name}` | {_cell(_type_name(field.annotation))} | {_cell(default)} | {_cell(field.description or '')} |")
        parts.append("")
    return "\n".join(parts)


def cli_tables(_: str | None) -> str:
    root = typer.main.get_command(app)
    parts = []

    def walk(cmd, words: list[str]) -> None:
        if getattr(cmd, "commands", None):  # a group (typer's own click types, not click's)
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], [*words, name])
            return
        ctx = cmd.context_class(cmd, info_name=" ".join(words))
        parts.append(f"### `{' '.join(words)}`\n\n{(cmd.help or '').strip()}\n\n```\n{cmd.get_usage(ctx)}\n```\n")
        rows = []
        for p in cmd.params:
            record = p.get_help_record(ctx)
            if record:
                rows.append(f"| `{_cell(record[0])}` | {_cell(record[1])} |")
            elif p.param_type_name == "argument":
                rows.append(f"| `{p.human_readable_name}` | argument |")
        if rows:
            parts.append("| option | what |\n|---|---|\n" + "\n".join(rows) + "\n")

    walk(root, ["crossengine"])
    return "\n".join(parts)


def parquet_tables(_: str | None) -> str:
    parts = [f"Schema version {schemas.SCHEMA_VERSION}.\n"]
    for name in sorted(n for n in dir(schemas) if n.endswith("_SCHEMA")):
        schema = getattr(schemas, name)
        parts.append(f"### `{name}`\n\n| column | Arrow type |\n|---|---|")
        parts += [f"| `{f.name}` | {_cell(f.type)} |" for f in schema]
        parts.append("")
    return "\n".join(parts)


def trait_table(_: str | None) -> str:
    names = sorted(registered())
    fields = [f for f in dataclasses.fields(EngineTraits)]
    rows = ["| trait | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    traits = {n: engine_class(n).traits for n in names}
    for f in fields:
        rows.append(f"| `{f.name}` | " + " | ".join(_cell(getattr(traits[n], f.name)) for n in names) + " |")
    return "\n".join(rows) + "\n"


def module_docstrings(package: str | None) -> str:
    """Each module's docstring under its name: the contracts as the code states them."""
    pkg = importlib.import_module(package or "crossengine")
    parts = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        mod: types.ModuleType = importlib.import_module(f"{pkg.__name__}.{info.name}")
        doc = (mod.__doc__ or "").strip()
        first, _, rest = doc.partition("\n")
        parts.append(f"### `{mod.__name__}`\n\n**{first}**\n\n```text\n{rest.strip()}\n```\n" if rest.strip() else f"### `{mod.__name__}`\n\n{first}\n")
    return "\n".join(parts)


def keys_table(_: str | None) -> str:
    """Each framework's keys (`--keys`) and the crossengine metric that holds each, from compare/keys.py, with its sources."""
    rows = ["| `--keys` | the framework's key | crossengine's column |", "|---|---|---|"]
    rows += [f"| `{fw}` | `{theirs}` | `{ours}` |" for fw, table in framework_keys.KEYS.items() for theirs, ours in table.items()]
    doc = (framework_keys.__doc__ or "").split("\n\n", 1)[-1].strip()
    return "\n".join(rows) + "\n\n" + doc + "\n"


GENERATORS = {"keys": keys_table, "cli": cli_tables, "experiment": experiment_tables, "parquet": parquet_tables, "traits": trait_table, "modules": module_docstrings}


def on_page_markdown(markdown: str, **_) -> str:
    return _MARK.sub(lambda m: GENERATORS[m.group(1)](m.group(2)), markdown)
