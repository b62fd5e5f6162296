"""Patches: named functions that change one implementation detail of a loaded HF model.

A variant lists patches by name; each is a function `patch(engine) -> str` that modifies
`engine.model` (or how inputs reach it) and returns a one-line description of what it did,
recorded in run.json. They encode the usual HF-vs-native-code differences, so an ablation
can say which of them actually moves the numbers. User patches are named as
"package.module:function" and imported only because the experiment names them.

The attention patches use transformers' own extension point (AttentionInterface): one
function, registered as "crossengine_sdpa", reads per-module flags that the patches set, so
patches compose and no transformers code is monkey-patched.
"""

from __future__ import annotations

from collections.abc import Callable

from . import import_ref

PatchFn = Callable[[object], str]
BUILTIN: dict[str, PatchFn] = {}
ATTENTION_NAME = "crossengine_sdpa"


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
    return import_ref(ref)


def apply_patches(engine, refs: list[str]) -> dict[str, str]:
    return {ref: resolve(ref)(engine) for ref in refs}


# --------------------------------------------------------------------------- attention


def crossengine_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA call, with the choices the attention patches control made explicit."""
    import torch

    flags = getattr(module, "_crossengine_flags", {})
    groups = getattr(module, "num_key_value_groups", 1)
    sdpa_kwargs = {}
    if groups > 1:
        if flags.get("repeat_interleave") or attention_mask is not None:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        else:
            sdpa_kwargs["enable_gqa"] = True
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if flags.get("is_causal_prefill") and causal and q_len == kv_len and q_len > 1 and _is_plain_causal(attention_mask):
        attention_mask, use_is_causal = None, True  # SDPA's own causal path, no materialised mask
    else:
        use_is_causal = bool(causal and attention_mask is None and q_len > 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=use_is_causal, **sdpa_kwargs)
    return out.transpose(1, 2).contiguous(), None


def _is_plain_causal(mask) -> bool:
    """True when a materialised mask is exactly the lower-triangular causal mask (no padding, no windows)."""
    import torch

    if mask is None:
        return True
    m = mask[0, 0] if mask.dim() == 4 else mask
    allowed = m if m.dtype == torch.bool else m == 0
    q, k = allowed.shape[-2], allowed.shape[-1]
    tril = torch.ones(q, k, dtype=torch.bool, device=allowed.device).tril(k - q)
    return bool(mask.shape[0] == 1 and torch.equal(allowed, tril))


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "is_causal")]


def _use_crossengine_attention(engine, flag: str) -> int:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, crossengine_sdpa)
    if getattr(engine.model.config, "_attn_implementation", None) != ATTENTION_NAME:
        engine.model.set_attn_implementation(ATTENTION_NAME)
    modules = _attention_modules(engine.model)
    for m in modules:
        m._crossengine_flags = {**getattr(m, "_crossengine_flags", {}), flag: True}
    return len(modules)


@register("sdpa_is_causal_prefill")
def sdpa_is_causal_prefill(engine) -> str:
    """Prefill without an explicit mask: SDPA's is_causal, as most training code calls it."""
    n = _use_crossengine_attention(engine, "is_causal_prefill")
    return f"{n} attention modules: prefill uses SDPA is_causal=True instead of a materialised causal mask"


@register("gqa_repeat_interleave")
def gqa_repeat_interleave(engine) -> str:
    """Expand K/V heads with repeat_interleave before SDPA instead of SDPA's enable_gqa."""
    n = _use_crossengine_attention(engine, "repeat_interleave")
    return f"{n} attention modules: K/V heads expanded with repeat_interleave, no enable_gqa"


# --------------------------------------------------------------------------- rotary


@register("rope_on_device")
def rope_on_device(engine) -> str:
    """Recompute RoPE inverse frequencies on the input's device in every forward.

    Training code often computes them where the activations live; a loaded checkpoint carries
    frequencies computed at construction, on the CPU (or left unset on the meta device).
    """
    patched = 0
    for module in engine.model.modules():
        if not (hasattr(module, "inv_freq") and hasattr(module, "rope_type") and hasattr(module, "config")):
            continue
        original = module.forward

        def forward(x, position_ids, *args, _module=module, _original=original, **kwargs):
            _module.inv_freq = _inv_freq_on(_module, x.device)
            return _original(x, position_ids, *args, **kwargs)

        module.forward = forward
        patched += 1
    return f"{patched} rotary modules recompute inv_freq on the input's device in forward"


def _inv_freq_on(module, device):
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if module.rope_type != "default":
        return ROPE_INIT_FUNCTIONS[module.rope_type](module.config, device)[0].to(device)
    cfg = module.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))


# --------------------------------------------------------------------------- inputs


@register("pixels_on_device")
def pixels_on_device(engine) -> str:
    """Send uint8 pixels to the device and rescale/normalise there, as native code often does."""
    engine.pixels_on_device = True
    return "pixel_values rebuilt from uint8 images, rescaled and normalised on the device in the model dtype"


@register("drop_token_type_ids")
def drop_token_type_ids(engine) -> str:
    """Withhold token_type_ids (Gemma3 then builds a causal mask over images)."""
    engine.dropped_inputs.add("token_type_ids")
    return "token_type_ids removed from the model inputs"
