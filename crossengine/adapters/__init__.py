"""Engines behind one interface (see base.py); shipped as `crossengine.adapters`.

The registry maps an engine type to a lazy "module:Class" string, as lm-evaluation-harness
does, so that importing crossengine never imports vLLM or torch: an adapter module imports
its heavy libraries inside the engine, in the Ray worker that runs it. Three sources, in
order: the built-in engines below, installed packages' entry points in the group
`crossengine.engines` (name = "package.module:Class"), and a `type: "package.module:Class"`
written in the experiment itself. Each class is checked when resolved (a subclass of
`Engine`, with `EngineTraits` and a `Spec` model that fit), so a wrong one is one line
before anything starts.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from functools import cache, lru_cache
from importlib.metadata import entry_points
from pathlib import Path

from .base import check_traits

BUILTIN: dict[str, str] = {
    "hf": "crossengine.adapters.hf:HFEngine",
    "vllm": "crossengine.adapters.vllm:VLLMEngine",
    "native": "crossengine.adapters.native:NativeEngine",
    "logprobs": "crossengine.adapters.logprobs:LogprobsEngine",
}
ENTRY_POINT_GROUP = "crossengine.engines"


class UnknownEngine(ValueError):
    """An engine type that names no registered engine, or a class that cannot be one (one line)."""


@lru_cache(maxsize=1)
def registered() -> dict[str, str]:
    """Every engine type by name: the built-in ones, then installed packages' entry points (a built-in name wins)."""

    out = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep.value)
    return out


def _known() -> str:
    return ", ".join(repr(k) for k in sorted(registered()))


@cache
def engine_class(kind: str):
    """The engine class of a type: a registered name or 'package.module:Class'; UnknownEngine (one line) otherwise."""

    ref = registered().get(kind) or (kind if ":" in kind else None)
    if ref is None:
        raise UnknownEngine(f"unknown engine type {kind!r}: registered engines are {_known()} (crossengine engines), or give 'package.module:Class'")
    try:
        cls = import_ref(ref)
    except ImportError as exc:
        raise UnknownEngine(f"engine type {kind!r}: {exc}") from None
    problem = check_traits(cls)
    if problem:
        raise UnknownEngine(f"engine type {kind!r}: {problem}")
    return cls


def spec_model(kind: str):
    """The pydantic model of an engine type's fields (its class's `Spec`)."""
    return engine_class(kind).Spec


def make_spec(data: dict):
    """An engine spec from a mapping with `type`, validated by that engine's own model."""
    return spec_model(data["type"]).model_validate(data)


def import_ref(ref: str):
    """The object a user's "package.module:function" names; ImportError with one clear line if it does not import.

    The one place user code is imported: only ever a reference the experiment spells out.
    """
    module, sep, name = ref.partition(":")
    if not sep or not module or not name:
        raise ImportError(f"{ref!r} is not of the form 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import {ref!r}: {exc}") from None


def user_code_paths(experiment_folder: Path) -> list[str]:
    """Where user code named by an experiment imports from: the folder crossengine runs in, then the
    experiment's own folder. The driver (validate, run) and every engine worker use exactly these."""
    return [os.getcwd(), str(Path(experiment_folder).absolute())]


@contextlib.contextmanager
def importable_from(experiment_folder: Path):
    """Imports inside see `user_code_paths` first, as a worker does; sys.path is restored after."""
    added = [p for p in user_code_paths(experiment_folder) if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
