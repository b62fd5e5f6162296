"""Patches: named functions that change one implementation detail of a loaded model.

A variant lists patches by name; each is a function `patch(engine) -> str` that modifies
`engine.model` (or how inputs reach it) and returns a one-line description of what it did,
recorded in run.json. User patches are named as "package.module:function" and imported only
because the experiment names them.
"""

from __future__ import annotations

import importlib
from typing import Callable

PatchFn = Callable[[object], str]
BUILTIN: dict[str, PatchFn] = {}


def register(name: str):
    def wrap(fn: PatchFn) -> PatchFn:
        BUILTIN[name] = fn
        return fn

    return wrap


def resolve(ref: str) -> PatchFn:
    if ref in BUILTIN:
        return BUILTIN[ref]
    if ":" not in ref:
        raise ValueError(f"unknown patch {ref!r}; built-in patches: {sorted(BUILTIN)}, or give 'module:function'")
    module, _, fn = ref.partition(":")
    return getattr(importlib.import_module(module), fn)


def apply_patches(engine, refs: list[str]) -> dict[str, str]:
    return {ref: resolve(ref)(engine) for ref in refs}
