"""Looking inside torch engines: module outputs (for localisation) and a buffer audit.

Both run inside the engine's worker, on the loaded model, and return plain numpy/dicts.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

# Module names worth capturing by default: embeddings, each block, its attention and MLP,
# the final norm and the output head, in HF and OLMo-core spellings.
DEFAULT_MODULES = [
    r"(.*\.)?embed_tokens$", r"^embeddings$",
    r"(.*\.)?layers\.\d+$", r"(.*\.)?layers\.\d+\.(self_attn|mlp)$",
    r"^blocks\.\d+$", r"^blocks\.\d+\.(attention|feed_forward)$",
    r"(.*\.)?norm$", r"^lm_head(\.norm)?$",
]


def capture_outputs(model, run_forward, patterns: list[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """Outputs [T, H] of the matching modules, in the order their forward finished."""
    import torch

    regexes = [re.compile(p) for p in (patterns or DEFAULT_MODULES)]
    captured: list[tuple[str, np.ndarray]] = []
    handles = []

    def hook(name):
        def fn(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            if isinstance(out, torch.Tensor) and out.dim() >= 2:
                x = out[0] if out.dim() == 3 else out
                captured.append((name, x.detach().float().cpu().numpy()))

        return fn

    for name, module in model.named_modules():
        if name and any(r.match(name) for r in regexes):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        run_forward()
    finally:
        for h in handles:
            h.remove()
    return captured


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
        if not buf.is_floating_point():
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
                "module": name.rpartition(".")[0],
                "persistent": name in persistent,
                "shape": list(x.shape),
                "max_abs_diff_vs_fresh": max_diff,
                "issues": issues,
                "ok": not issues,
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
