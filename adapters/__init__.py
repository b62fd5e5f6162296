"""Engines behind one interface (see base.py); shipped as `crossengine.adapters`.

The registry maps an engine type to a lazy "module:Class" string, as lm-evaluation-harness
does, so that importing crossengine never imports vLLM or torch-heavy engine code: the class
is resolved inside the Ray worker that runs it.
"""

from __future__ import annotations

import importlib

ENGINES: dict[str, str] = {
    "hf": "crossengine.adapters.hf:HFEngine",
    "vllm": "crossengine.adapters.vllm:VLLMEngine",
    "native": "crossengine.adapters.native:NativeEngine",
}


def engine_class(kind: str):
    """Import and return the engine class registered under `kind`."""
    module, _, cls = ENGINES[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


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
