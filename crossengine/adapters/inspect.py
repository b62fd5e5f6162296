"""Looking inside torch engines: module outputs (for localisation) and a buffer audit.

Both run inside the engine's worker, on the loaded model, and return plain numpy/dicts.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np


def _first_tensor(value):
    """The tensor a module hands on: itself, the first of a tuple/list, or a ModelOutput's first field."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        fields = value.to_tuple()
        return _first_tensor(fields[0]) if fields else None
    return None


def _as_rows(x, max_positions: int) -> np.ndarray:
    """[B, T, ...] or [T, ...] -> float32 [min(T, max_positions), features] of the first sequence."""
    x = x[0] if x.dim() >= 3 else x
    x = x[:max_positions]
    return x.detach().float().reshape(x.shape[0], -1).cpu().numpy()


def capture_outputs(model, run_forward, patterns: list[str] | None = None, max_positions: int = 512) -> list[dict[str, Any]]:
    """Every matching module's output (and the input it got), in the order their forward finished.

    With no `patterns`, every module is captured whose forward returns a tensor (or a
    tuple/ModelOutput led by one): the whole tree, leaves and containers alike, whatever the
    model calls them. Memory is bounded by keeping the first `max_positions` positions.
    A module called more than once (a shared rotary embedding) is kept at its first call.
    """
    regexes = [re.compile(p) for p in patterns] if patterns else None
    captured: list[dict[str, Any]] = []
    seen: set[str] = set()
    handles = []

    def hook(name: str, leaf: bool):
        def fn(_module, args, kwargs, output):
            out = _first_tensor(output)
            if name in seen or out is None or out.dim() < 2 or not out.is_floating_point():
                return
            seen.add(name)
            inp = _first_tensor(args) if args else _first_tensor(next(iter(kwargs.values()), None)) if kwargs else None
            usable = inp is not None and inp.dim() >= 2 and inp.is_floating_point()
            captured.append({"name": name, "leaf": leaf, "output": _as_rows(out, max_positions), "input": _as_rows(inp, max_positions) if usable else None})

        return fn

    for name, module in model.named_modules():
        if name and (regexes is None or any(r.match(name) for r in regexes)):
            leaf = next(module.children(), None) is None
            handles.append(module.register_forward_hook(hook(name, leaf), with_kwargs=True))
    try:
        run_forward()
    finally:
        for h in handles:
            h.remove()
    return captured


def audit_weights(model, missing_keys: list[str]) -> list[dict[str, Any]]:
    """Parameters and buffers the checkpoint did not fill: still on the meta device, or
    missing from the checkpoint and so left at whatever the model's init gave them."""
    rows = []
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    flagged = {}
    for name in missing_keys:
        flagged.setdefault(name, []).append("missing from the checkpoint: left at its init value")
    for name, t in named.items():
        if t.is_meta:
            flagged.setdefault(name, []).append("still on the meta device (never loaded)")
    for name, issues in flagged.items():
        t = named.get(name)
        rows.append(
            {
                "buffer": name,
                "kind": "parameter" if name in dict(model.named_parameters()) else "buffer",
                "module": name.rpartition(".")[0],
                "persistent": True,
                "shape": list(t.shape) if t is not None else [],
                "max_abs_diff_vs_fresh": None,
                "issues": issues,
                "ok": False,
                "against": "the checkpoint",
            }
        )
    return rows


def audit_buffers(model, config, device: str) -> list[dict[str, Any]]:
    """Every registered buffer after loading vs a fresh construction of the model on `device`.

    Non-persistent buffers are not in the checkpoint: whatever __init__ computed is all they
    have, and meta-device loading (transformers 5) can leave them uninitialised. Each finding
    names the module path.
    """
    import torch

    persistent = {name for name in model.state_dict()}
    fresh_buffers = _fresh_buffers(model, config, device)
    findings = []
    for name, buf in model.named_buffers():
        if not buf.is_floating_point() or buf.is_meta:  # meta ones are audit_weights' finding
            continue
        x = buf.detach().float().cpu()
        issues = []
        if torch.isnan(x).any():
            issues.append("NaN")
        if x.numel() and (x == 0).all():
            issues.append("all zeros")
        finite = x[torch.isfinite(x)]
        if finite.numel() and finite.abs().max() > 1e30:
            issues.append(f"huge values (max |x| {finite.abs().max().item():.3g})")
        tiny = (finite != 0) & (finite.abs() < torch.finfo(torch.float32).tiny)
        if tiny.any():
            issues.append(f"{int(tiny.sum())} denormal values")
        ref = fresh_buffers.get(name)
        max_diff = None
        if ref is not None and ref.shape == x.shape:
            max_diff = float((x - ref).abs().nan_to_num(math.inf).max()) if x.numel() else 0.0
            if max_diff > 1e-6 * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0):
                issues.append(f"differs from a fresh construction (max |Δ| {max_diff:.3g})")
        findings.append(
            {
                "buffer": name,
                "kind": "buffer",
                "module": name.rpartition(".")[0],
                "persistent": name in persistent,
                "shape": list(x.shape),
                "max_abs_diff_vs_fresh": max_diff,
                "issues": issues,
                "ok": not issues,
                "against": "a fresh construction",
            }
        )
    return findings


def _fresh_buffers(model, config, device: str) -> dict[str, Any]:
    """Buffers as the model's own __init__ computes them, on the target device, no checkpoint."""
    import torch

    try:
        with torch.device(device):
            fresh = type(model)(config)
    except Exception:  # noqa: BLE001 - not rebuildable from this config (OLMo-core, user factories): value checks only
        return {}
    return {name: b.detach().float().cpu() for name, b in fresh.named_buffers()}
